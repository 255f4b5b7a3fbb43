"""The gateway application: routes, and the lifetimes of its client session and NATS link."""

import json
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from faas_gateway.core.functions import Registry
from faas_gateway.http.callbacks import CallbackSender
from faas_gateway.http.client import UpstreamClient
from faas_gateway.nats.function_store import FunctionWatch
from gateway.activations import ActivationQueries
from gateway.auth import Handler, load_credentials, require_auth
from gateway.callback_urls import CallbackUrls
from gateway.handlers.activations import ActivationApi
from gateway.handlers.enqueue import AsyncInvoker
from gateway.handlers.functions import FunctionsApi
from gateway.handlers.reliability import ReliabilityApi
from gateway.handlers.sync import SyncProxy
from gateway.handlers.turn_async import Demotions
from gateway.loops import Hops
from gateway.metrics import GatewayMetrics
from gateway.openapi import document_route
from gateway.queue import Publisher
from gateway.queues import ServedQueues
from gateway.request import CallContext
from gateway.routes import by_method, invocation, json_errors, no_such_route, read_only, system
from gateway.settings import GatewaySettings

SETTINGS = web.AppKey("settings", GatewaySettings)
REGISTRY = web.AppKey("registry", Registry)
METRICS = web.AppKey("metrics", GatewayMetrics)
PUBLISHER = web.AppKey("publisher", Publisher)
UPSTREAM_CLIENT = web.AppKey("upstream_client", UpstreamClient)
SYNC_PROXY = web.AppKey("sync_proxy", SyncProxy)
ASYNC_INVOKER = web.AppKey("async_invoker", AsyncInvoker)
ACTIVATION_API = web.AppKey("activation_api", ActivationApi)
RELIABILITY_API = web.AppKey("reliability_api", ReliabilityApi)
CALLBACK_URLS = web.AppKey("callback_urls", CallbackUrls)
FUNCTION_WATCH = web.AppKey("function_watch", FunctionWatch)
FUNCTIONS_API = web.AppKey("functions_api", FunctionsApi)
QUERIES = web.AppKey("activation_queries", ActivationQueries)
SERVED_QUEUES = web.AppKey("served_queues", ServedQueues)
HOPS = web.AppKey("hops", Hops)

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def create_app(
    settings: GatewaySettings, registry: Registry, metrics: GatewayMetrics | None = None
) -> web.Application:
    # Request bodies pass through as sent: a gzip upload reaches the function still gzipped.
    app = web.Application(handler_args={"auto_decompress": False})
    app[SETTINGS] = settings
    app[REGISTRY] = registry
    app[METRICS] = metrics or GatewayMetrics()
    app[CALLBACK_URLS] = CallbackUrls(settings.callback_allowed_hosts)
    app[FUNCTION_WATCH] = FunctionWatch(registry, settings)
    app[HOPS] = Hops()  # this process's Via entry, on both invocation routes
    app[METRICS].count_services(registry)
    # Cleaned up in reverse: calls that turned async finish while NATS and the client live.
    app.cleanup_ctx.append(_upstream_client)
    app.cleanup_ctx.append(_queue_publisher)
    app.cleanup_ctx.append(_sync_proxy)

    # Without basic_auth the handlers are registered as they are: no per-request check.
    guard_system: Callable[[Handler], Handler] = _as_is
    guard_calls: Callable[[Handler], Handler] = _as_is
    if settings.basic_auth:
        credentials = load_credentials(settings)  # AuthSetupError stops start-up

        def guard_system(handle: Handler) -> Handler:
            return require_auth(handle, credentials)

        if settings.basic_auth_invocations:
            guard_calls = guard_system

    def route(methods: str, pattern: str, handle: Handler) -> None:
        app.router.add_route(methods, pattern, handle)

    sync_call = guard_calls(invocation(_sync_call))
    async_call = guard_calls(invocation(_async_call))
    sub = "{path:(?s:.*)}"  # (?s): a sub-path's %0A is decoded to a newline before matching
    for pattern in ("/function/{name}", "/function/{name}/", f"/function/{{name}}/{sub}"):
        route("*", pattern, sync_call)
    # Before the invocation route of the same path, which answers other methods with 405.
    # Cancelling reaches another caller's call: it takes the /system credentials.
    route("DELETE", "/async-function/{call_id}", guard_system(json_errors(_cancel)))
    for pattern in ("/async-function/{name}", f"/async-function/{{name}}/{sub}"):
        route("*", pattern, async_call)
    functions = by_method(
        {"GET": _list_functions, "POST": _deploy, "PUT": _update, "DELETE": _delete}
    )
    route("*", "/system/functions", guard_system(functions))
    route("*", "/system/function/{name}", guard_system(system(_function)))
    route("*", "/system/info", guard_system(system(_info)))
    route("*", "/system/namespaces", guard_system(system(_namespaces)))
    route("*", "/system/activations", guard_system(system(_list_activations)))
    route("*", "/system/activations/{call_id}", guard_system(system(_activation)))
    route("*", "/system/activations/{call_id}/result", guard_system(system(_activation_result)))
    # "*": other methods get by_method's 405, not the catch-all's 404 (no such path).
    route("*", "/system/activations/{call_id}/retry", guard_system(by_method({"POST": _retry})))
    route("*", "/system/dead-letters", guard_system(system(_dead_letters)))
    app.router.add_route("*", "/healthz", read_only(_healthz))
    app.router.add_route("*", "/metrics", read_only(_metrics))
    app.router.add_route("*", "/openapi.json", read_only(document_route()))
    app.router.add_route("*", "/{tail:(?s:.*)}", no_such_route)
    return app


def _as_is(handle: Handler) -> Handler:
    return handle


def _gateway_checks_invocations(settings: GatewaySettings) -> bool:
    """Whether a client's Authorization on an invocation is the gateway's own credential."""
    return settings.basic_auth and settings.basic_auth_invocations


async def _upstream_client(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    # Keeps no cookies and never decompresses: bodies pass through byte for byte, and
    # nothing of one caller's call can reach another's.
    client = UpstreamClient(keepalive_s=settings.upstream_keepalive_s)
    app[UPSTREAM_CLIENT] = client
    try:
        yield
    finally:
        await client.close()


async def _queue_publisher(app: web.Application) -> AsyncIterator[None]:
    publisher = Publisher(
        app[SETTINGS], app[FUNCTION_WATCH], on_reconnected=app[METRICS].nats_reconnects.inc
    )
    app[PUBLISHER] = publisher
    queues = ServedQueues(app[SETTINGS], app[REGISTRY], publisher)
    app[SERVED_QUEUES] = queues
    app[METRICS].watch_queues(queues.served)
    app[FUNCTIONS_API] = FunctionsApi(
        app[SETTINGS], app[REGISTRY], publisher, app[FUNCTION_WATCH], app[METRICS], queues
    )
    queries = ActivationQueries(app[SETTINGS], publisher)
    app[QUERIES] = queries
    app[ACTIVATION_API] = ActivationApi(queries)
    app[ASYNC_INVOKER] = AsyncInvoker(
        app[SETTINGS],
        app[REGISTRY],
        publisher,
        queries,
        app[CALLBACK_URLS],
        app[METRICS],
        app[HOPS],
        strip_authorization=_gateway_checks_invocations(app[SETTINGS]),
    )
    app[RELIABILITY_API] = ReliabilityApi(app[SETTINGS], app[REGISTRY], publisher, queries)
    try:
        await publisher.start()
        yield
    finally:
        await app[FUNCTION_WATCH].close()
        await publisher.close()


async def _sync_proxy(app: web.Application) -> AsyncIterator[None]:
    settings, client = app[SETTINGS], app[UPSTREAM_CLIENT]
    demotions = Demotions(
        settings,
        app[PUBLISHER],
        app[QUERIES],
        CallbackSender(settings, client, app[PUBLISHER].results),
        app[CALLBACK_URLS],
    )
    app[SYNC_PROXY] = SyncProxy(
        settings,
        app[REGISTRY],
        client,
        app[METRICS],
        demotions,
        app[HOPS],
        strip_authorization=_gateway_checks_invocations(settings),
    )
    try:
        yield
    finally:
        await demotions.close()


async def _sync_call(request: web.Request, call: CallContext) -> web.StreamResponse:
    return await request.app[SYNC_PROXY].handle(request, call)


async def _async_call(request: web.Request, call: CallContext) -> web.StreamResponse:
    return await request.app[ASYNC_INVOKER].handle(request, call)


async def _list_functions(request: web.Request) -> web.StreamResponse:
    return await request.app[FUNCTIONS_API].list_functions(request)


async def _function(request: web.Request) -> web.StreamResponse:
    return await request.app[FUNCTIONS_API].get_function(request)


async def _deploy(request: web.Request) -> web.StreamResponse:
    return await request.app[FUNCTIONS_API].deploy(request)


async def _update(request: web.Request) -> web.StreamResponse:
    return await request.app[FUNCTIONS_API].update(request)


async def _delete(request: web.Request) -> web.StreamResponse:
    return await request.app[FUNCTIONS_API].delete(request)


async def _info(request: web.Request) -> web.StreamResponse:
    return await request.app[FUNCTIONS_API].info(request)


async def _namespaces(request: web.Request) -> web.StreamResponse:
    return await request.app[FUNCTIONS_API].namespaces(request)


async def _list_activations(request: web.Request) -> web.StreamResponse:
    return await request.app[ACTIVATION_API].newest(request)


async def _activation(request: web.Request) -> web.StreamResponse:
    return await request.app[ACTIVATION_API].record(request)


async def _activation_result(request: web.Request) -> web.StreamResponse:
    return await request.app[ACTIVATION_API].result(request)


async def _cancel(request: web.Request) -> web.StreamResponse:
    return await request.app[RELIABILITY_API].cancel(request)


async def _retry(request: web.Request) -> web.StreamResponse:
    return await request.app[RELIABILITY_API].retry(request)


async def _dead_letters(request: web.Request) -> web.StreamResponse:
    return await request.app[RELIABILITY_API].dead_letters(request)


async def _healthz(request: web.Request) -> web.StreamResponse:
    healthy, details = await request.app[PUBLISHER].health()
    details["status"] = "ok" if healthy else "unavailable"
    return web.Response(
        status=200 if healthy else 503,
        body=json.dumps(details).encode(),
        content_type="application/json",
    )


async def _metrics(request: web.Request) -> web.StreamResponse:
    await request.app[SERVED_QUEUES].refresh()  # at most every few seconds
    response = web.Response(body=request.app[METRICS].render())
    response.headers["Content-Type"] = PROMETHEUS_CONTENT_TYPE
    return response
