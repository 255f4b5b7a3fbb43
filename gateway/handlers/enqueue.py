"""POST /async-function/<name>[/<path>]: validate, read the body within the limit, record and
queue the call durably (gateway/queue.py), answer 202 (or, with Prefer: wait, its result)."""

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from multidict import MultiMapping

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
from gateway.handlers.sync import WholeRequest
from gateway.loops import VIA, Hops
from gateway.metrics import UNKNOWN_FUNCTION, GatewayMetrics
from gateway.queue import GatewayQueue
from gateway.request import (
    PREFER,
    CallContext,
    RequestLine,
    check_subpath,
    forwarded_headers_of,
    parse_prefer,
    queued_call_of,
    raw_subpath,
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
        async def body(limit_bytes: int) -> bytes:
            return await read_body_within(request, limit_bytes, self._body_timeout_s)

        if request.method != "POST":
            method_error = MethodNotAllowedError(
                "async invocation accepts POST only", headers={"Allow": allowed(request)}
            )
            self._metrics.observe_async(UNKNOWN_FUNCTION, method_error.status)
            raise method_error
        request_line = RequestLine(
            request.match_info["name"],
            raw_subpath(request),
            request.method,
            request.rel_url.raw_query_string,
        )
        await self._enqueue(call, request_line, request.headers, request.remote, request.host, body)
        wait_s = parse_prefer(request.headers.getall(PREFER, [])).wait_s
        if wait_s is None:
            return accepted(call.call_id)
        wait_s = min(wait_s, self._max_wait_s)
        return await waited_response(
            self._records, call.call_id, wait_s, applied_to_result=wait_applied(wait_s)
        )

    async def handle_whole(self, request: WholeRequest, call: CallContext) -> web.Response:
        """A POST the lean server (gateway/invocation_server.py) took whole: a body of known
        length within its limit, no Prefer. The same steps as handle."""

        async def body(limit_bytes: int) -> bytes:
            if request.body_length > limit_bytes:
                raise too_large_for_async(limit_bytes)
            return await request.body() or b""

        request_line = RequestLine(request.name, request.subpath, "POST", request.raw_query)
        await self._enqueue(call, request_line, request.headers, request.remote, request.host, body)
        return accepted(call.call_id)

    async def _enqueue(
        self,
        call: CallContext,
        request_line: RequestLine,
        incoming: MultiMapping[str],
        remote: str | None,
        host: str,
        read_body: Callable[[int], Awaitable[bytes]],
    ) -> None:
        """Check, read, record and queue a call; count the outcome."""
        label = UNKNOWN_FUNCTION
        try:
            function = resolve_function(self._registry, request_line.name)
            label = function.name
            subpath = check_subpath(request_line.subpath)
            callback_url = await self._callback_urls.validate(incoming.get(CALLBACK_URL))
            headers = forwarded_headers_of(incoming, remote, host, self._not_queued)
            # In the queued headers, so the worker's call carries it to the function too.
            headers[VIA] = self._hops.via_for(incoming, function.name)
            self._queue.raise_unless_ready()
            body = await read_body(self._queue.max_body_bytes())
            queued = queued_call_of(
                call, request_line, function, subpath, headers, body, callback_url
            )
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


def allowed(request: web.Request) -> str:
    """What Allow lists: /async-function/{x} also takes DELETE, which cancels call x."""
    return "POST" if "path" in request.match_info else "DELETE, POST"


async def read_body_within(request: web.Request, limit_bytes: int, timeout_s: float) -> bytes:
    """The whole body, at most ``limit_bytes``; each wait for more within ``timeout_s``."""
    too_large = too_large_for_async(limit_bytes)
    declared = request.content_length
    if declared is not None and declared > limit_bytes:
        raise too_large
    return await read_body(request, timeout_s, limit_bytes, too_large)


def too_large_for_async(limit_bytes: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"the request body is larger than {limit_bytes} bytes, the most an async call can carry"
    )
