"""The gateway application: its composition root.

``create_app`` builds every object first, with no I/O (the NATS link connects later, in the
background), then registers their bound methods as routes, guarded by Basic auth where the
settings say so. The one lifetime hook starts and stops what holds connections; the
shutdown hook starts the one grace that running calls of both kinds share.
"""

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from faas_gateway.core.events import subject_spaces
from faas_gateway.core.functions import Registry
from faas_gateway.http.callbacks import CallbackSender
from faas_gateway.http.client import Timeouts, UpstreamClient
from faas_gateway.nats.activations import ActivationStore
from faas_gateway.nats.cancellations import Cancellations
from faas_gateway.nats.dead_letters import DeadLetters
from faas_gateway.nats.events import EventStore, EventWatch
from faas_gateway.nats.function_store import FunctionStore, FunctionWatch
from faas_gateway.nats.link import NatsLink
from faas_gateway.nats.names import Names
from faas_gateway.nats.provision import Plan
from gateway.auth import Credentials, Handler, load_credentials, require_auth
from gateway.callback_urls import CallbackUrls
from gateway.events.fanout import FanOut
from gateway.events.fires import Fires
from gateway.events.scheduler import Scheduler
from gateway.events.subjects import SubjectFeeds
from gateway.handlers.activations import Activations
from gateway.handlers.enqueue import Enqueue
from gateway.handlers.feeds import Feeds
from gateway.handlers.functions import Functions
from gateway.handlers.openwhisk import OpenWhisk
from gateway.handlers.reliability import Reliability
from gateway.handlers.sync import SyncProxy
from gateway.handlers.system import System
from gateway.handlers.triggers import Triggers
from gateway.handlers.turn_async import TurnAsync
from gateway.invocation_server import INVOCATIONS, Invocations
from gateway.loops import Hops
from gateway.metrics import GatewayMetrics
from gateway.queue import GatewayQueue
from gateway.queues import ServedQueues
from gateway.routes import (
    by_method,
    invocation,
    json_errors,
    no_such_route,
    openwhisk,
    read_only,
    system,
)
from gateway.settings import GatewaySettings

log = logging.getLogger("faas.gateway")


def create_app(
    settings: GatewaySettings, registry: Registry, metrics: GatewayMetrics | None = None
) -> web.Application:
    metrics = metrics or GatewayMetrics()
    names = Names.of(settings)

    # NATS: one link, the stores over it, and the queue that sets them up.
    link = NatsLink(
        settings,
        "faas-gateway",
        # A publish made while disconnected fails at once instead of going out after a
        # reconnect: a request answered 503 must never be queued later.
        buffer_while_reconnecting=False,
        request_timeout_s=settings.publish_timeout_s,
    )
    link.on_reconnected.append(metrics.count_reconnect)
    records = ActivationStore(
        link, names, settings.activation_max_result_bytes, settings.activation_retention_s
    )
    watch = FunctionWatch(registry, link, names)
    # The triggers, rules and built-in feeds, watched like the functions (docs/events.md).
    event_watch = EventWatch(link, names)
    plan = Plan.of(settings)
    queue = GatewayQueue(
        link,
        plan,
        records if settings.record_activations else None,
        watch,
        publish_timeout_s=settings.publish_timeout_s,
        startup_wait_s=settings.nats_startup_wait_s,
        max_async_body_bytes=settings.max_async_body_bytes,
        duplicate_window_s=settings.duplicate_window_s,
        nats_url=settings.nats_url,
        watches=event_watch.watches,
    )
    served_queues = ServedQueues(registry, link, names)
    metrics.count_services(registry)
    metrics.watch_queues(served_queues.served)

    # Calling functions: one client, which keeps no cookies and never decompresses, so bodies
    # pass through byte for byte and nothing of one caller's call can reach another's.
    client = UpstreamClient(keepalive_s=settings.upstream_keepalive_s)
    callback_urls = CallbackUrls(settings.callback_allowed_hosts)
    hops = Hops()  # this process's Via entry, on both invocation routes
    # With basic_auth_invocations the client's Authorization is the gateway's own credential.
    strip_authorization = settings.basic_auth and settings.basic_auth_invocations
    turn_async = TurnAsync(
        queue,
        records,
        CallbackSender(settings, client, records.results),
        callback_urls,
        max_turned_async=settings.max_turned_async,
        max_wait_s=settings.max_wait_s,
        sync_async_after_s=settings.sync_async_after_s,
        shutdown_grace_s=settings.shutdown_grace_s,
        max_held_bytes=settings.max_held_response_bytes,
    )

    # The handlers.
    sync_proxy = SyncProxy(
        registry,
        client,
        metrics,
        turn_async,
        hops,
        defaults=Timeouts(
            connect_s=settings.write_timeout_s,
            read_s=settings.read_timeout_s,
            total_s=settings.upstream_timeout_s,
        ),
        body_timeout_s=settings.request_body_timeout_s,
        strip_authorization=strip_authorization,
    )
    enqueue = Enqueue(
        registry,
        queue,
        records,
        callback_urls,
        metrics,
        hops,
        max_wait_s=settings.max_wait_s,
        body_timeout_s=settings.request_body_timeout_s,
        strip_authorization=strip_authorization,
    )
    activations = Activations(records)
    reliability = Reliability(
        registry, queue, records, DeadLetters(link, names), Cancellations(link, names)
    )
    functions = Functions(
        registry,
        FunctionStore(link, names),
        watch,
        metrics,
        served_queues,
        namespace=settings.function_namespace,
        url_template=settings.function_url_template,
        functions_file=settings.functions_file,
        body_timeout_s=settings.request_body_timeout_s,
        gateway_host=settings.gateway_host,
        gateway_port=settings.gateway_port,
    )
    status = System(queue, metrics, served_queues)
    whisk = OpenWhisk(
        registry,
        functions,
        queue,
        records,
        sync_proxy,
        turn_async,
        client,
        metrics,
        hops,
        namespace=settings.openwhisk_namespace,
        max_result_bytes=settings.activation_max_result_bytes,
        max_held_bytes=settings.max_held_response_bytes,
        body_timeout_s=settings.request_body_timeout_s,
        record_calls=settings.record_activations,
    )

    # Events: triggers and rules, feeds, and what turns fires into queued calls.
    event_store = EventStore(link, names)
    spaces = subject_spaces(settings.event_subjects)
    fires = Fires(queue, plan, event_watch, metrics)
    feeds = Feeds(
        event_store,
        event_watch,
        registry,
        whisk,
        namespace=settings.openwhisk_namespace,
        spaces=spaces,
        body_timeout_s=settings.request_body_timeout_s,
    )
    triggers = Triggers(
        event_store,
        event_watch,
        registry,
        feeds,
        fires,
        queue,
        namespace=settings.openwhisk_namespace,
        body_timeout_s=settings.request_body_timeout_s,
    )
    events = Events(
        FanOut(
            link,
            names,
            queue,
            records if settings.record_activations else None,
            registry,
            whisk,
            metrics,
            namespace=settings.openwhisk_namespace,
        ),
        Scheduler(fires, event_watch, registry, queue, metrics, triggers.delete_after_fire),
        SubjectFeeds(link, fires, event_watch, registry, queue, spaces),
    )

    # Request bodies pass through as sent: a gzip upload reaches the function still gzipped.
    app = web.Application(handler_args={"auto_decompress": False})
    app.cleanup_ctx.append(_lifetime(queue, client, turn_async, whisk, events))
    app.on_shutdown.append(_stopping(turn_async, settings.shutdown_grace_s))

    # Without basic_auth the handlers are registered as they are: no per-request check.
    guard_system: Callable[[Handler], Handler] = _as_is
    guard_calls: Callable[[Handler], Handler] = _as_is
    credentials: Credentials | None = None
    if settings.basic_auth:
        credentials = load_credentials(settings)  # AuthSetupError stops start-up
        known = credentials

        def guard_system(handle: Handler) -> Handler:
            return require_auth(handle, known)

        if settings.basic_auth_invocations:
            guard_calls = guard_system

    def route(methods: str, pattern: str, handle: Handler) -> None:
        app.router.add_route(methods, pattern, handle)

    sync_call = guard_calls(invocation(sync_proxy.handle))
    async_call = guard_calls(invocation(enqueue.handle))
    sub = "{path:(?s:.*)}"  # (?s): a sub-path's %0A is decoded to a newline before matching
    for pattern in ("/function/{name}", "/function/{name}/", f"/function/{{name}}/{sub}"):
        route("*", pattern, sync_call)
    # Before the invocation route of the same path, which answers other methods with 405.
    # Cancelling reaches another caller's call: it takes the /system credentials.
    route("DELETE", "/async-function/{call_id}", guard_system(json_errors(reliability.cancel)))
    for pattern in ("/async-function/{name}", f"/async-function/{{name}}/{sub}"):
        route("*", pattern, async_call)
    manage = by_method(
        {
            "GET": functions.list_functions,
            "POST": functions.deploy,
            "PUT": functions.update,
            "DELETE": functions.delete,
        }
    )
    route("*", "/system/functions", guard_system(manage))
    route("*", "/system/function/{name}", guard_system(system(functions.get_function)))
    route("*", "/system/info", guard_system(system(functions.info)))
    route("*", "/system/namespaces", guard_system(system(functions.namespaces)))
    route("*", "/system/namespace/{namespace}", guard_system(system(functions.namespace)))
    # faas-cli logs, secret and scale: a JSON 501 that says why and what to do instead.
    route("*", "/system/logs", guard_system(system(functions.logs)))
    secrets: dict[str, Handler] = {m: functions.secrets for m in ("GET", "POST", "PUT", "DELETE")}
    route("*", "/system/secrets", guard_system(by_method(secrets)))
    scale = by_method({"POST": functions.scale})
    route("*", "/system/scale-function/{name}", guard_system(scale))
    route("*", "/system/activations", guard_system(system(activations.newest)))
    route("*", "/system/activations/{call_id}", guard_system(system(activations.record)))
    route("*", "/system/activations/{call_id}/result", guard_system(system(activations.result)))
    # "*": other methods get by_method's 405, not the catch-all's 404 (no such path).
    retry = by_method({"POST": reliability.retry})
    route("*", "/system/activations/{call_id}/retry", guard_system(retry))
    route("*", "/system/dead-letters", guard_system(system(reliability.dead_letters)))
    route("*", "/healthz", read_only(status.healthz))
    route("*", "/metrics", read_only(status.metrics))
    route("*", "/openapi.json", read_only(status.openapi))

    # OpenWhisk's API: the /system credentials are the API key (user:password); its info
    # document is open, as OpenWhisk's is.
    route("*", "/api/v1", openwhisk({"GET": whisk.info}, None))
    route("*", "/api/v1/namespaces", openwhisk({"GET": whisk.namespaces}, credentials))
    namespace = "/api/v1/namespaces/{namespace}"
    # The built-in feed actions, before the actions of the caller's namespace.
    builtin_feed = openwhisk({"GET": feeds.get_builtin, "POST": feeds.invoke_builtin}, credentials)
    route("*", "/api/v1/namespaces/whisk.system/actions/{package}/{name}", builtin_feed)
    actions = {"GET": whisk.get_action, "PUT": whisk.put_action, "POST": whisk.invoke}
    actions["DELETE"] = whisk.delete_action
    action = openwhisk(actions, credentials)
    route("*", f"{namespace}/actions", openwhisk({"GET": whisk.list_actions}, credentials))
    route("*", f"{namespace}/actions/{{name}}", action)
    route("*", f"{namespace}/actions/{{package}}/{{name}}", action)
    activation = f"{namespace}/activations/{{activation_id}}"
    route("*", f"{namespace}/activations", openwhisk({"GET": whisk.list_activations}, credentials))
    route("*", activation, openwhisk({"GET": whisk.activation}, credentials))
    route("*", f"{activation}/result", openwhisk({"GET": whisk.activation_result}, credentials))
    route("*", f"{activation}/logs", openwhisk({"GET": whisk.activation_logs}, credentials))
    trigger = {"GET": triggers.get_trigger, "PUT": triggers.put_trigger, "POST": triggers.fire}
    trigger["DELETE"] = triggers.delete_trigger
    rule = {"GET": triggers.get_rule, "PUT": triggers.put_rule, "POST": triggers.set_rule_status}
    rule["DELETE"] = triggers.delete_rule
    route("*", f"{namespace}/triggers", openwhisk({"GET": triggers.list_triggers}, credentials))
    route("*", f"{namespace}/triggers/{{name}}", openwhisk(trigger, credentials))
    route("*", f"{namespace}/rules", openwhisk({"GET": triggers.list_rules}, credentials))
    route("*", f"{namespace}/rules/{{name}}", openwhisk(rule, credentials))
    route("*", "/{tail:(?s:.*)}", no_such_route)
    # What the lean server in front of aiohttp needs to serve /function/* itself
    # (gateway/invocation_server.py): the same proxy, the same guard.
    app[INVOCATIONS] = Invocations(
        sync_proxy,
        enqueue,
        turn_async,
        credentials if settings.basic_auth_invocations else None,
        settings.request_body_timeout_s,
        triggers=triggers,
        openwhisk=whisk,
        api_credentials=credentials,
    )
    return app


def _as_is(handle: Handler) -> Handler:
    return handle


class Events:
    """What runs in the background of every gateway process for events: the fan-out of fires,
    the alarms' scheduler and the NATS subject feeds."""

    def __init__(self, fanout: FanOut, scheduler: Scheduler, subjects: SubjectFeeds) -> None:
        self.fanout = fanout
        self.scheduler = scheduler
        self.subjects = subjects

    def start(self) -> None:
        self.fanout.start()
        self.scheduler.start()
        self.subjects.start()

    async def close(self) -> None:
        # No new events first; then the fires being fanned out finish or go back.
        await self.scheduler.close()
        await self.subjects.close()
        await self.fanout.close()


def _stopping(
    turn_async: TurnAsync, grace_s: float
) -> Callable[[web.Application], Awaitable[None]]:
    async def stopping(app: web.Application) -> None:
        # Runs before aiohttp waits for the running sync calls; the calls that turned async
        # share the same grace from here (TurnAsync.stopping).
        log.info("stopping: running calls have up to %.1f s to finish", grace_s)
        turn_async.stopping()

    return stopping


def _lifetime(
    queue: GatewayQueue,
    client: UpstreamClient,
    turn_async: TurnAsync,
    whisk: OpenWhisk,
    events: Events,
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        try:
            await queue.start()
        except BaseException:
            await queue.close()
            await client.close()
            raise
        events.start()  # each waits for NATS itself
        try:
            yield
        finally:
            await events.close()
            # Calls that turned async finish first, while NATS and the client still live.
            await turn_async.close()
            await whisk.close()
            await queue.close()
            await client.close()

    return lifetime
