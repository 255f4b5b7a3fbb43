"""POST /async-function/<name>[/<path>]: validate, read the body within the limit, record and
queue the call durably (gateway/queue.py), answer 202 (or, with Prefer: wait, its result)."""

import logging

from aiohttp import web

from faas_gateway.core.functions import Registry
from faas_gateway.core.headers import CALLBACK_URL
from faas_gateway.nats.activations import ActivationStore
from faas_gateway.runtime.logs import call_context
from gateway.callback_urls import CallbackUrls
from gateway.errors import (
    MAPPED_ERRORS,
    ClientGoneError,
    MethodNotAllowedError,
    PayloadTooLargeError,
    http_error,
)
from gateway.loops import VIA, Hops
from gateway.metrics import UNKNOWN_FUNCTION, GatewayMetrics
from gateway.queue import GatewayQueue
from gateway.request import (
    PREFER,
    CallContext,
    checked_subpath,
    forwarded_headers,
    parse_prefer,
    queued_call,
    resolve_function,
    wait_applied,
)
from gateway.request_bodies import read_body
from gateway.responses import accepted, waited_response

log = logging.getLogger("faas.gateway")

# Headers that describe the client's connection to us, not the call; the worker sets its own.
HEADERS_NOT_QUEUED = frozenset({"host", "content-length", "expect"})


class Enqueue:
    def __init__(
        self,
        registry: Registry,
        queue: GatewayQueue,
        records: ActivationStore,
        callback_urls: CallbackUrls,
        metrics: GatewayMetrics,
        hops: Hops,
        *,
        max_wait_s: float,
        body_timeout_s: float,
        strip_authorization: bool,
    ) -> None:
        self._registry = registry
        self._queue = queue
        self._records = records
        self._callback_urls = callback_urls
        self._metrics = metrics
        self._hops = hops
        self._max_wait_s = max_wait_s
        self._body_timeout_s = body_timeout_s
        # With basic_auth_invocations the client's Authorization is the gateway's credential:
        # it must never reach a function, the stream or a dead letter.
        self._not_queued = HEADERS_NOT_QUEUED | (
            {"authorization"} if strip_authorization else frozenset()
        )

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
            callback_url = await self._callback_urls.validate(request.headers.get(CALLBACK_URL))
            headers = forwarded_headers(request, self._not_queued)
            # In the queued headers, so the worker's call carries it to the function too.
            headers[VIA] = self._hops.via_for(request.headers, function.name)
            self._queue.raise_unless_ready()
            body = await read_body_within(
                request, self._queue.max_body_bytes(), self._body_timeout_s
            )
            queued = queued_call(call, request, function, subpath, headers, body, callback_url)
            await self._queue.enqueue(queued, function.queue)
        except ClientGoneError as exc:
            # Nobody to answer; nothing was enqueued, and nothing failed here.
            self._metrics.client_disconnected(label)
            log.debug("%s", exc.message, extra=call_context(call.call_id, label))
            raise
        except MAPPED_ERRORS as exc:
            error = http_error(exc)
            self._metrics.observe_async(label, error.status)
            raise error from exc
        self._metrics.observe_async(label, 202)
        wait_s = parse_prefer(request.headers.getall(PREFER, [])).wait_s
        if wait_s is None:
            return accepted(call.call_id)
        wait_s = min(wait_s, self._max_wait_s)
        return await waited_response(
            self._records, call.call_id, wait_s, applied_to_result=wait_applied(wait_s)
        )


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
