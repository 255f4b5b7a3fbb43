"""Async invocation: validate, read the body within the limit, enqueue durably, answer 202."""

import logging

from aiohttp import web

from faas_gateway.core.call import QueuedCall
from faas_gateway.core.functions import Registry
from faas_gateway.core.headers import CALLBACK_URL
from faas_gateway.runtime.logs import call_context
from gateway.activations import ActivationQueries
from gateway.callback_urls import CallbackUrls
from gateway.errors import (
    ClientGoneError,
    GatewayError,
    MethodNotAllowedError,
    PayloadTooLargeError,
)
from gateway.handlers.activations import location_of, result_response, unfinished_response
from gateway.loops import VIA, Hops
from gateway.metrics import UNKNOWN_FUNCTION, GatewayMetrics
from gateway.prefer import PREFER, PREFERENCE_APPLIED, parse_prefer, wait_applied
from gateway.queue import Publisher
from gateway.request import CallContext
from gateway.request_bodies import read_body
from gateway.routing import checked_subpath, forwarded_headers, resolve_function
from gateway.settings import GatewaySettings

log = logging.getLogger("faas.gateway")

# Headers that describe the client's connection to us, not the call; the worker sets its own.
HEADERS_NOT_QUEUED = frozenset({"host", "content-length", "expect"})


class AsyncInvoker:
    def __init__(
        self,
        settings: GatewaySettings,
        registry: Registry,
        publisher: Publisher,
        queries: ActivationQueries,
        callback_urls: CallbackUrls,
        metrics: GatewayMetrics,
        hops: Hops | None = None,
        strip_authorization: bool = False,
    ) -> None:
        # With basic_auth_invocations the client's Authorization is the gateway's credential:
        # it must never reach a function, the stream or a dead letter.
        self._not_queued = HEADERS_NOT_QUEUED | (
            {"authorization"} if strip_authorization else frozenset()
        )
        self._callback_urls = callback_urls
        self._hops = hops or Hops()
        self._settings = settings
        self._registry = registry
        self._publisher = publisher
        self._queries = queries
        self._metrics = metrics

    async def handle(self, request: web.Request, call: CallContext) -> web.StreamResponse:
        label = UNKNOWN_FUNCTION
        try:
            if request.method != "POST":
                raise MethodNotAllowedError(
                    "async invocation accepts POST only", headers={"Allow": allowed(request)}
                )
            function = resolve_function(self._registry, request.match_info["name"])
            label = function.name
            subpath = checked_subpath(request)
            # In the queued headers, so the worker's call carries it to the function too.
            via = self._hops.via_for(request.headers, function.name)
            callback_url = await self._callback_urls.validate(request.headers.get(CALLBACK_URL))
            self._publisher.raise_unless_ready()
            body = await read_body_within(
                request, self._publisher.max_body_bytes(), self._settings.request_body_timeout_s
            )
            headers = forwarded_headers(request, self._not_queued)
            headers[VIA] = via
            queued = QueuedCall(
                call_id=call.call_id,
                function=function.name,
                method=request.method,
                path=subpath,
                query=request.rel_url.raw_query_string,
                headers=list(headers.items()),
                body=body,
                callback_url=callback_url,
                accepted_at_ns=call.start_ns,
            )
            await self._publisher.enqueue(
                queued, self._settings.subject_for(function.queue, function.name)
            )
        except ClientGoneError as exc:
            # Nobody to answer; nothing was enqueued, and nothing failed here.
            self._metrics.client_disconnected(label)
            log.debug("%s", exc.message, extra=call_context(call.call_id, label))
            raise
        except GatewayError as exc:
            self._metrics.observe_async(label, exc.status)
            raise
        self._metrics.observe_async(label, 202)
        prefer = parse_prefer(request.headers.getall(PREFER, []))
        return await self.accepted(call.call_id, function.name, prefer.wait_s)

    async def accepted(
        self, call_id: str, function: str, wait_s: float | None
    ) -> web.StreamResponse:
        """202 with the call id, or with Prefer: wait=N the result if the call finishes within
        N seconds (capped by max_wait)."""
        if wait_s is not None:
            return await self._wait_for_result(call_id, function, min(wait_s, self._max_wait_s()))
        response = web.json_response({"callId": call_id}, status=202)
        response.headers["Location"] = location_of(call_id)
        return response

    def _max_wait_s(self) -> float:
        return self._settings.max_wait_s

    async def _wait_for_result(
        self, call_id: str, function: str, wait_s: float
    ) -> web.StreamResponse:
        """Prefer: wait=N: the result if the call finishes within N seconds, else a 202."""
        stored = await self._queries.wait_until_final(call_id, function, wait_s)
        if stored is not None and stored.is_final:
            response = await result_response(self._queries, stored)
            response.headers[PREFERENCE_APPLIED] = wait_applied(wait_s)
            return response
        if stored is None:
            response = web.json_response({"callId": call_id}, status=202)
            response.headers["Location"] = location_of(call_id)
            return response
        return unfinished_response(stored)


def allowed(request: web.Request) -> str:
    """What Allow lists: /async-function/{x} also takes DELETE, which cancels call x."""
    return "POST" if "path" in request.match_info else "DELETE, POST"


async def read_body_within(request: web.Request, limit_bytes: int, timeout_s: float) -> bytes:
    """The whole body, at most ``limit_bytes``; each wait for more within ``timeout_s``."""
    too_large = PayloadTooLargeError(
        f"the request body is larger than {limit_bytes} bytes, the most an async call can carry"
    )
    declared = request.content_length
    if declared is not None and declared > limit_bytes:
        raise too_large
    return await read_body(request, timeout_s, limit_bytes, too_large)
