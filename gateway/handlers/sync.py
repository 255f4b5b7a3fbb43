"""Synchronous invocation: stream the request to the function and its response back."""

import asyncio
import functools
import logging
from typing import Protocol

from aiohttp import web
from multidict import CIMultiDict, MultiMapping
from yarl import URL

from faas_gateway.core.functions import FunctionSpec, Registry
from faas_gateway.core.headers import CALL_ID, CALLBACK_URL, START_TIME, end_to_end
from faas_gateway.http.client import (
    Timeouts,
    UpstreamClient,
    UpstreamError,
    UpstreamResponse,
    failure_for_caller,
)
from faas_gateway.http.client import UpstreamTimeoutError as ClientTimeoutError
from faas_gateway.runtime.logs import call_context
from gateway.errors import (
    ClientGoneError,
    GatewayError,
    TooManyRequestsError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from gateway.handlers.turn_async import AsyncAfter, Hold, TurnAsync
from gateway.loops import VIA, Hops
from gateway.metrics import UNKNOWN_FUNCTION, GatewayMetrics
from gateway.request import (
    CallContext,
    check_subpath,
    forwarded_headers,
    forwarded_headers_of,
    queued_call,
    raw_subpath,
    resolve_function,
)
from gateway.request_bodies import StreamedBody, failure_of, read_body

log = logging.getLogger("faas.gateway")

REQUEST_HEADERS_NOT_FORWARDED = frozenset({"host", "expect"})
# Bodies up to this size, with a known length, are read whole rather than streamed; larger ones
# and those of unknown length (chunked, event streams) are streamed in both directions.
SMALL_BODY_BYTES = 64 * 1024
# What a 429 for a busy function tells the client to wait: calls are usually shorter.
RETRY_AFTER_BUSY_S = 1


class WholeRequest(Protocol):
    """An invocation as the lean server holds it (gateway/invocation_server.py), and where
    its answer goes."""

    name: str  # the function's name, as in /function/<name>
    subpath: str  # the rest of the path, still percent-encoded: '' or '/...'
    method: str
    raw_query: str
    headers: "CIMultiDict[str]"
    remote: str | None
    host: str
    body_length: int  # its Content-Length, 0 without one

    async def body(self) -> bytes | None:
        """The whole body (None: there is none), each wait for more bytes bounded by
        request_body_timeout; raises the client's failure as a GatewayError."""
        ...

    def answer(self, status: int, reason: str, headers: "CIMultiDict[str]", body: bytes) -> None:
        """The whole response, in one write."""
        ...

    async def start_answer(self, status: int, reason: str, headers: "CIMultiDict[str]") -> None:
        """Status and headers of a streamed response; ConnectionError once the client left."""
        ...

    async def write(self, chunk: bytes) -> None:
        """The next piece of a streamed response; ConnectionError once the client left."""
        ...

    async def end_answer(self) -> None: ...

    def cut_short(self) -> None:
        """The function broke off a streamed response: close the connection, so the client
        sees a cut response rather than a whole one."""
        ...


class SyncProxy:
    def __init__(
        self,
        registry: Registry,
        client: UpstreamClient,
        metrics: GatewayMetrics,
        turn_async: TurnAsync,
        hops: Hops,
        *,
        defaults: Timeouts,
        body_timeout_s: float,
        strip_authorization: bool,
    ) -> None:
        # With basic_auth_invocations the client's Authorization is the gateway's credential.
        self._not_forwarded = REQUEST_HEADERS_NOT_FORWARDED | (
            {"authorization"} if strip_authorization else frozenset()
        )
        self._registry = registry
        self._client = client
        self._metrics = metrics
        self._turn_async = turn_async
        self._hops = hops
        self._defaults = defaults  # for functions that set no timeouts of their own
        self._body_timeout_s = body_timeout_s
        self._timeouts_by_name: dict[str, tuple[FunctionSpec, Timeouts]] = {}
        # Sync calls running now per function with a max_inflight annotation, this process.
        self._inflight_by_name: dict[str, int] = {}

    async def handle(self, request: web.Request, call: CallContext) -> web.StreamResponse:
        name = request.match_info["name"]
        function, subpath, via, hold = self.admit(name, call, request.headers, raw_subpath(request))
        try:
            response = await self._forward(request, function, call, subpath, via, hold)
        except GatewayError as exc:
            self.failed(exc, name, function, call)
            raise
        finally:
            hold.release()  # unless a call that turned async took it over
        return response

    async def handle_whole(self, request: WholeRequest, call: CallContext) -> None:
        """A call the lean server (gateway/invocation_server.py) took whole: a body of known
        length within SMALL_BODY_BYTES, that cannot turn async. The same steps as handle,
        with the answer going to ``request`` instead of an aiohttp response."""
        name = request.name
        function, subpath, via, hold = self.admit(name, call, request.headers, request.subpath)
        try:
            await self._forward_whole(request, function, call, subpath, via)
        except GatewayError as exc:
            self.failed(exc, name, function, call)
            raise
        finally:
            hold.release()

    def admit(
        self, name: str, call: CallContext, headers: MultiMapping[str], subpath: str
    ) -> tuple[FunctionSpec, str, str, Hold]:
        """The function, the checked sub-path and the Via entry of a call, and its place
        under the function's max_inflight; a refusal is counted and raised."""
        try:
            function = resolve_function(self._registry, name)
        except GatewayError as exc:
            self._metrics.observe_sync(UNKNOWN_FUNCTION, exc.status, call.elapsed_s())
            raise
        try:
            checked = check_subpath(subpath)
            via = self._hops.via_for(headers, function.name)
        except GatewayError as exc:
            self._metrics.observe_sync(function.name, exc.status, call.elapsed_s())
            raise
        hold = self.hold(function, call)
        self._metrics.started(function.name)
        return function, checked, via, hold

    def failed(
        self, exc: GatewayError, name: str, function: FunctionSpec, call: CallContext
    ) -> None:
        """Count and log a call that failed after it was admitted."""
        if isinstance(exc, ClientGoneError):
            # Nobody to answer, and nothing wrong with the function or with us.
            self._client_failed(exc, function, call)
            return
        self._metrics.observe_sync(function.name, exc.status, call.elapsed_s())
        # The cause, kept from the client, may name the function's address: the log has it.
        cause = exc.__cause__
        detail = f" ({type(cause).__name__}: {cause})" if cause and str(cause) else ""
        log.info(
            "sync call failed: %s%s",
            exc.message,
            detail,
            extra=call_context(call.call_id, name),
        )

    def hold(self, function: FunctionSpec, call: CallContext) -> Hold:
        """Count the call against its function's max_inflight on this process, or 429."""
        limit = function.max_inflight
        if limit is None:
            return Hold(None)
        running = self._inflight_by_name.get(function.name, 0)
        if running >= limit:
            self._metrics.observe_sync(function.name, 429, call.elapsed_s())
            raise TooManyRequestsError(
                f"function {function.name!r} is running its max_inflight of {limit} calls "
                f"on this gateway; try again",
                {"Retry-After": str(RETRY_AFTER_BUSY_S)},
            )
        self._inflight_by_name[function.name] = running + 1
        return Hold(functools.partial(self._release_inflight, function.name))

    def _release_inflight(self, name: str) -> None:
        self._inflight_by_name[name] -= 1

    async def _forward(
        self,
        request: web.Request,
        function: FunctionSpec,
        call: CallContext,
        subpath: str,
        via: str,
        hold: Hold,
    ) -> web.StreamResponse:
        headers = forwarded_headers(request, self._not_forwarded)
        headers[CALL_ID] = call.call_id
        headers[START_TIME] = str(call.start_ns)
        headers[VIA] = via
        url = function.url_for(subpath, request.rel_url.raw_query_string)
        after = self._turn_async.wait_before_async(request)
        body: bytes | StreamedBody | None = None  # None too when a call that may turn async read it
        if after is not None and self._turn_async.fits(request):
            turned = await self._call_may_turn_async(
                request, function, call, headers, url, subpath, after, hold
            )
            if isinstance(turned, web.StreamResponse):
                self._metrics.observe_sync(function.name, turned.status, call.elapsed_s())
                return turned
            upstream = turned
        else:
            body = await request_body(request, self._body_timeout_s)
            try:
                upstream = await self._client.request(
                    request.method, url, headers.items(), body, self.timeouts(function)
                )
            except (UpstreamError, ValueError) as exc:
                # A body the client stalled or abandoned breaks the upload too: its fault.
                raise failure_of(body) or as_gateway_error(function, exc, "did not answer") from exc

        async with upstream:
            self._metrics.observe_sync(function.name, upstream.status, call.elapsed_s())
            response_headers = end_to_end(upstream.headers)
            call.apply_to(response_headers)
            if is_small_and_whole(request, upstream):
                # One read and one write instead of a chunk loop: most function responses are
                # small, and this path is the gateway's hot path. Nothing was sent yet, so a
                # function that breaks off still gets a clean 502 rather than a cut body.
                try:
                    whole = await upstream.read()
                except UpstreamError as exc:
                    failed = failure_of(body)
                    raise failed or as_gateway_error(
                        function, exc, "broke off its response"
                    ) from exc
                return web.Response(
                    status=upstream.status,
                    reason=upstream.reason,
                    headers=response_headers,
                    body=whole,
                )
            return await self._stream_back(
                request, upstream, response_headers, function, call, body
            )

    async def _call_may_turn_async(
        self,
        request: web.Request,
        function: FunctionSpec,
        call: CallContext,
        headers: CIMultiDict[str],
        url: URL,
        subpath: str,
        after: AsyncAfter,
        hold: Hold,
    ) -> UpstreamResponse | web.StreamResponse:
        """Call the function; if it has not answered after ``after.wait_s``, a 202 instead.

        The request body is read whole first: once the client has its 202 it may hang up,
        and the function must still get the whole request.
        """
        turn_async = self._turn_async
        turn_async.raise_if_full()
        callback_url = await turn_async.callback_urls.validate(request.headers.get(CALLBACK_URL))
        body = await read_body(request, self._body_timeout_s) if request.body_exists else b""
        queued = queued_call(call, request, function, subpath, headers, body, callback_url)
        if call.chosen_by_client:
            # The call id may name a call already (this one, posted again, or another).
            same_call = await turn_async.posted_before(queued, after)
            if same_call is not None:
                return same_call
        pending = asyncio.create_task(
            self._client.request(
                request.method, url, headers.items(), body or None, self.timeouts(function)
            )
        )
        try:
            done, _ = await asyncio.wait({pending}, timeout=after.wait_s)
            if not done:
                response = await turn_async.demote(call, queued, function, pending, after, hold)
                if response is not None:
                    return response
            return await pending
        except (UpstreamError, ValueError) as exc:
            raise as_gateway_error(function, exc, "did not answer") from exc
        except asyncio.CancelledError:
            pending.cancel()  # the client left before the call turned async
            raise

    async def _stream_back(
        self,
        request: web.Request,
        upstream: UpstreamResponse,
        headers: CIMultiDict[str],
        function: FunctionSpec,
        call: CallContext,
        body: object,
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.extend(headers)
        try:
            await response.prepare(request)
            chunks = upstream.chunks()
            while True:
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                except UpstreamError as exc:
                    failed = failure_of(body)
                    if failed is not None:
                        # The function was answering while the client's body broke off
                        # (which closed the function's connection). Headers are gone already:
                        # the response is cut short, quietly, by closing the connection.
                        self._client_failed(failed, function, call)
                        if request.transport is not None:
                            request.transport.close()
                        return response
                    # Headers are gone already; all that is left is to cut the response short.
                    log.warning(
                        "function response broke off: %s",
                        exc,
                        extra=call_context(call.call_id, function.name),
                    )
                    raise
                await response.write(chunk)
            await response.write_eof()
        except ConnectionError:
            # Only writes to the client raise this here (reads from the function are handled
            # above): the client left, which is neither the function's fault nor ours.
            self._metrics.client_disconnected(function.name)
            log.info(
                "client went away during the response",
                extra=call_context(call.call_id, function.name),
            )
        return response

    async def _forward_whole(
        self,
        request: "WholeRequest",
        function: FunctionSpec,
        call: CallContext,
        subpath: str,
        via: str,
    ) -> None:
        headers = forwarded_headers_of(
            request.headers, request.remote, request.host, self._not_forwarded
        )
        headers[CALL_ID] = call.call_id
        headers[START_TIME] = str(call.start_ns)
        headers[VIA] = via
        url = function.url_for(subpath, request.raw_query)
        body = await request.body()
        try:
            upstream = await self._client.request(
                request.method, url, headers.items(), body, self.timeouts(function)
            )
        except (UpstreamError, ValueError) as exc:
            raise as_gateway_error(function, exc, "did not answer") from exc
        async with upstream:
            self._metrics.observe_sync(function.name, upstream.status, call.elapsed_s())
            response_headers = end_to_end(upstream.headers)
            call.apply_to(response_headers)
            length = upstream.content_length
            if (
                length is not None
                and length <= SMALL_BODY_BYTES
                and upstream.status not in (204, 304)
            ):
                try:
                    whole = await upstream.read()
                except UpstreamError as exc:
                    raise as_gateway_error(function, exc, "broke off its response") from exc
                request.answer(upstream.status, upstream.reason, response_headers, whole)
                return
            try:
                await request.start_answer(upstream.status, upstream.reason, response_headers)
                chunks = upstream.chunks()
                while True:
                    try:
                        chunk = await anext(chunks)
                    except StopAsyncIteration:
                        break
                    except UpstreamError as exc:
                        log.warning(
                            "function response broke off: %s",
                            exc,
                            extra=call_context(call.call_id, function.name),
                        )
                        request.cut_short()  # headers are gone already
                        return
                    await request.write(chunk)
                await request.end_answer()
            except ConnectionError:
                self._metrics.client_disconnected(function.name)
                log.info(
                    "client went away during the response",
                    extra=call_context(call.call_id, function.name),
                )

    def _client_failed(
        self, error: GatewayError, function: FunctionSpec, call: CallContext
    ) -> None:
        context = call_context(call.call_id, function.name)
        if isinstance(error, ClientGoneError):
            self._metrics.client_disconnected(function.name)
            log.debug("%s", error.message, extra=context)
        else:
            log.info("sync call cut short: %s", error.message, extra=context)

    def timeouts(self, function: FunctionSpec) -> Timeouts:
        """The whole call, body included, within the function's exec_timeout (else
        upstream_timeout), as OpenFaaS's gateway limits it; connecting within write_timeout;
        each wait for bytes within read_timeout."""
        cached = self._timeouts_by_name.get(function.name)
        if cached is not None and cached[0] is function:
            return cached[1]
        timeouts = Timeouts(
            connect_s=function.write_timeout_s or self._defaults.connect_s,
            read_s=function.read_timeout_s or self._defaults.read_s,
            total_s=function.exec_timeout_s or self._defaults.total_s,
        )
        self._timeouts_by_name[function.name] = (function, timeouts)
        return timeouts


def as_gateway_error(function: FunctionSpec, exc: Exception, what: str) -> GatewayError:
    """The client's error says what went wrong, never where the function listens; raise it
    ``from exc``, and the log line of the failed call has the rest."""
    if isinstance(exc, ClientTimeoutError):
        return UpstreamTimeoutError(f"function {function.name!r} did not answer within its timeout")
    return UpstreamUnavailableError(f"function {function.name!r} {what}: {failure_for_caller(exc)}")


async def request_body(request: web.Request, timeout_s: float) -> bytes | StreamedBody | None:
    """Small bodies of known length are read at once; anything else streams through. Either
    way each wait for the client's next bytes is bounded by ``timeout_s``."""
    if not request.body_exists:
        return None
    length = request.content_length
    if length is not None and length <= SMALL_BODY_BYTES:
        return await read_body(request, timeout_s)
    return StreamedBody(request, timeout_s)


def is_small_and_whole(request: web.Request, upstream: UpstreamResponse) -> bool:
    """A response that may be read whole before it is sent on, without changing its meaning."""
    length = upstream.content_length
    return (
        length is not None
        and length <= SMALL_BODY_BYTES
        and request.method != "HEAD"  # its Content-Length describes a body that is not sent
        and upstream.status not in (204, 304)
    )
