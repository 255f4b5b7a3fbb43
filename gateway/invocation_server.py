"""A lean HTTP/1.1 server for invocations, in front of aiohttp's on the same port.

Profiles of the sync path (bench/README.md, "Round two") put most of the gateway's own CPU
per call in aiohttp's server: its request and response objects, its payload streams, its
writer. This protocol parses the request head with httptools (as uvicorn does) and serves
the common invocations itself: ``/function/<name>[/...]`` with a body of known length up to
SMALL_BODY_BYTES (or none), one that cannot turn async, a ``POST
/async-function/<name>[/...]`` of the same kind without ``Prefer``, and OpenWhisk's POSTs of a
trigger's fire and an action's invoke (with their credentials). The proxying is SyncProxy's
own (``handle_whole``), the queueing Enqueue's, the fire Triggers' and the invoke
OpenWhisk's; only the HTTP framing lives here.

Anything else is handed to aiohttp, with the bytes of the request as they came: the
connection's transport is given to an aiohttp request handler, which from then on serves
that connection whatever it asks (every route, /function/* included, is still registered
with aiohttp). So uploads of unknown length, ``Expect``, calls that may turn async, odd
paths, HEAD, malformed heads, and every other route behave exactly as aiohttp serves them,
and a client that never sends such a request never meets aiohttp's server at all.

Connections register with aiohttp's ``web.Server`` (``close``/``shutdown``/``_task_handler``,
as its request handlers do), so graceful shutdown waits for a running call here exactly as
for one of aiohttp's: up to ``shutdown_grace``, then it is cancelled.
"""

import asyncio
import contextlib
import logging
import socket
import time
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any, cast
from urllib.parse import parse_qsl

import httptools
from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE
from multidict import CIMultiDict, MultiDict

from faas_gateway.core.headers import CALL_ID
from faas_gateway.core.openwhisk import PACKAGE_SEPARATOR
from gateway.auth import CHALLENGE, Credentials
from gateway.errors import MAPPED_ERRORS, InvalidRequestError, error_response, http_error
from gateway.handlers.enqueue import Enqueue
from gateway.handlers.openwhisk import OpenWhisk
from gateway.handlers.sync import SMALL_BODY_BYTES, SyncProxy
from gateway.handlers.triggers import Triggers
from gateway.handlers.turn_async import TurnAsync
from gateway.request import CallContext, InvalidCallIdError, new_call_id, resolve_call_id
from gateway.request_bodies import client_failure
from gateway.routes import REQUEST_ID, invocation_error, openwhisk_error, request_id_from

log = logging.getLogger("faas.gateway")

FUNCTION_PREFIX = b"/function/"
ASYNC_PREFIX = b"/async-function/"
# POST /api/v1/namespaces/<namespace>/triggers/<name>: a trigger fired (docs/events.md);
# POST /api/v1/namespaces/<namespace>/actions/[<package>/]<name>: an action invoked.
WHISK_PREFIX = b"/api/v1/namespaces/"
TRIGGERS = "triggers"
ACTIONS = "actions"
# Query characters taken as they are; a query with escapes ('%', '+') is aiohttp's to decode.
PLAIN_QUERY = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~=&")
# A head longer than this, or with more headers, goes to aiohttp, which answers it or refuses
# it as it always has (its limits: lines and fields of 8190 bytes, 128 headers).
MAX_HEAD_BYTES = 8190
MAX_HEADERS = 100
# Bytes held while a call runs (a client that pipelines): past this, reading pauses.
MAX_BUFFERED_BYTES = SMALL_BODY_BYTES + MAX_HEAD_BYTES
# An idle kept-alive connection is closed after this long, as aiohttp's server does.
KEEPALIVE_S = 75.0
# Request headers that take a request to aiohttp: framing and protocol changes this server
# does not do, and preferences that may turn the call async.
HANDED_OVER_HEADERS = ("Transfer-Encoding", "Expect", "Upgrade", "Prefer")


@dataclass(frozen=True)
class Invocations:
    """What the lean server needs from the application (gateway/app.py builds it)."""

    sync_proxy: SyncProxy
    enqueue: Enqueue
    turn_async: TurnAsync
    credentials: Credentials | None  # basic_auth_invocations: the credentials to check
    body_timeout_s: float
    triggers: Triggers | None = None  # fires of triggers, under /api/v1
    openwhisk: OpenWhisk | None = None  # invokes of actions, under /api/v1
    api_credentials: Credentials | None = None  # basic_auth: what /api/v1 asks for


INVOCATIONS = web.AppKey("invocations", Invocations)


class _Head:
    """httptools' callbacks for one request head."""

    __slots__ = ("pairs", "url")

    def __init__(self) -> None:
        self.url = b""
        self.pairs: list[tuple[bytes, bytes]] = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.pairs.append((name, value))


class _Date:
    """The Date header, formatted once a second."""

    second = -1
    text = ""

    @classmethod
    def now(cls) -> str:
        second = int(time.time())
        if second != cls.second:
            cls.second, cls.text = second, formatdate(second, usegmt=True)
        return cls.text


_host_name: str | None = None


def _fqdn() -> str:
    # What aiohttp's request.host falls back to without a Host header.
    global _host_name
    if _host_name is None:
        _host_name = socket.getfqdn()
    return _host_name


class InvocationProtocol(asyncio.Protocol):
    """One client connection: sync invocations served here, the rest handed to aiohttp."""

    def __init__(self, invocations: Invocations, server: web.Server) -> None:
        self._invocations = invocations
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._remote: str | None = None
        # The call being served; aiohttp's web.Server reads it by this name when the
        # connection goes, and waits for it on shutdown.
        self._task_handler: asyncio.Task[None] | None = None
        self._waiter: asyncio.Future[None] | None = None  # for more body bytes
        self._drain: asyncio.Future[None] | None = None  # for the client to read
        self._writing_paused = False
        self._reading_paused = False
        self._lost = False
        self._closing = False  # close once the running call is answered
        # The idle timeout: one timer, moved on lazily (_idle_timeout) rather than made and
        # cancelled for every request, which cost 2-3% of the gateway's CPU per sync call.
        self._keepalive: asyncio.TimerHandle | None = None
        self._idle_since = 0.0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        peer = transport.get_extra_info("peername")
        self._remote = peer[0] if isinstance(peer, tuple | list) and peer else None
        self._server.connection_made(cast(Any, self), self._transport)
        self._idle_since = self._loop.time()
        self._keepalive = self._loop.call_later(KEEPALIVE_S, self._idle_timeout)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._task_handler is None:
            self._next_request()
            return
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        if len(self._buffer) > MAX_BUFFERED_BYTES and self._transport is not None:
            self._transport.pause_reading()
            self._reading_paused = True

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._transport = None
        if self._keepalive is not None:
            self._keepalive.cancel()
        gone = ConnectionResetError("the client closed the connection")
        for future in (self._waiter, self._drain):
            if future is not None and not future.done():
                future.set_exception(gone)
        if self._server.handler_cancellation and self._task_handler is not None:
            # As aiohttp's handlers with handler_cancellation (its TestServer); run_app's
            # default lets the call run on, to find the client gone when it answers.
            self._task_handler.cancel()
        self._server.connection_lost(cast(Any, self), exc)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # what aiohttp's web.Server calls on shutdown, as on its own request handlers

    def close(self) -> None:
        self._closing = True
        if self._task_handler is None and self._transport is not None:
            self._transport.close()

    async def shutdown(self, grace_s: float | None = 15.0) -> None:
        # web.Server.shutdown passes the runner's shutdown_timeout (shutdown_grace).
        self._closing = True
        task = self._task_handler
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=grace_s)
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._transport is not None:
            self._transport.close()

    # requests

    def _idle_timeout(self) -> None:
        self._keepalive = None
        if self._transport is None or self._task_handler is not None:
            return  # gone, or serving a call: _after starts the wait again
        left_s = self._idle_since + KEEPALIVE_S - self._loop.time()
        if left_s > 0:  # requests came and went since the timer was set
            self._keepalive = self._loop.call_later(left_s, self._idle_timeout)
        else:
            self._transport.close()

    def _next_request(self) -> None:
        """Start the next request if its head is complete; hand the connection to aiohttp
        if this server does not serve it."""
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 4)
        if end < 0:
            if len(buffer) >= MAX_HEAD_BYTES + 4:
                self._hand_over()
            return
        head_bytes = bytes(buffer[: end + 4])
        request = self._parse(head_bytes)
        if request is None:
            self._hand_over()
            return
        self._task_handler = self._loop.create_task(self._serve(request))

    def _parse(self, head_bytes: bytes) -> "_Request | None":
        """The request, if it is one this server takes whole; None for aiohttp."""
        target = head_bytes.find(b" ") + 1
        if head_bytes.startswith(FUNCTION_PREFIX, target):
            prefix = FUNCTION_PREFIX
        elif head_bytes.startswith(ASYNC_PREFIX, target):
            prefix = ASYNC_PREFIX
        elif (
            # Fires and invokes are POSTs: the rest of /api/v1 (activation polling, above
            # all) goes to aiohttp without being parsed here first only to be handed over.
            head_bytes.startswith(b"POST ")
            and head_bytes.startswith(WHISK_PREFIX, target)
            and (self._invocations.triggers or self._invocations.openwhisk)
        ):
            prefix = WHISK_PREFIX
        else:
            return None  # every other route, or not an origin-form target
        if not head_bytes.isascii():
            return None
        head = _Head()
        parser = httptools.HttpRequestParser(head)
        try:
            parser.feed_data(head_bytes)
        except httptools.HttpParserError:
            return None  # aiohttp says what is wrong with it
        if len(head.pairs) > MAX_HEADERS:
            return None
        method = parser.get_method().decode()
        version = parser.get_http_version()
        if method in ("HEAD", "CONNECT") or version not in ("1.1", "1.0"):
            return None
        if prefix is not FUNCTION_PREFIX and method != "POST":
            return None  # a DELETE cancels a call; anything else is aiohttp's 405
        raw_path, _, raw_query = head.url.partition(b"?")
        # Escapes, dot segments, doubled slashes, fragments and backslashes: aiohttp's
        # routing decodes and normalises paths, so such paths stay with it.
        if (
            b"%" in raw_path
            or b"/." in raw_path
            or b"//" in raw_path
            or b"\\" in raw_path
            or b"#" in head.url
        ):
            return None
        name, slash, rest = raw_path[len(prefix) :].partition(b"/")
        if not name:
            return None
        headers: CIMultiDict[str] = CIMultiDict(
            [(key.decode(), value.decode()) for key, value in head.pairs]
        )
        namespace = ""
        whisk: str | None = None
        if prefix is WHISK_PREFIX:
            # <namespace>/triggers/<name> and nothing more, no query, or
            # <namespace>/actions/[<package>/]<name> with a plain query; the rest of /api/v1
            # (and a call that is refused before its body is read) is aiohttp's.
            kind, _, rest = rest.partition(b"/")
            parts = rest.split(b"/")
            if not all(parts) or name == b"whisk.system":  # built-in feeds: aiohttp's
                return None
            if kind == b"triggers" and len(parts) == 1 and not raw_query:
                whisk = TRIGGERS
            elif kind == b"actions" and len(parts) <= 2 and PLAIN_QUERY.issuperset(raw_query):
                whisk = ACTIONS
            else:
                return None
            # A packaged action is the function <package>__<name> (function_name).
            namespace, name = name.decode(), PACKAGE_SEPARATOR.encode().join(parts)
            slash, rest = b"", b""
            credentials = self._invocations.api_credentials
            if credentials is not None and not credentials.accept(headers.get("Authorization")):
                return None
        for handed_over in HANDED_OVER_HEADERS:
            if handed_over in headers:
                return None
        lengths = headers.getall("Content-Length", ())
        length = 0
        if lengths:
            if len(lengths) > 1 or not lengths[0].isdigit():
                return None
            length = int(lengths[0])
            if length > SMALL_BODY_BYTES:
                return None  # streamed through by aiohttp's side
        triggers, openwhisk = self._invocations.triggers, self._invocations.openwhisk
        if whisk == TRIGGERS and (
            triggers is None or not triggers.takes_fire_whole(namespace, name.decode(), length)
        ):
            return None
        if whisk == ACTIONS and (
            openwhisk is None or not openwhisk.takes_invoke_whole(namespace, name.decode(), length)
        ):
            return None
        if (
            prefix is FUNCTION_PREFIX
            and self._invocations.turn_async.wait_before_async_for(headers) is not None
        ):
            return None  # sync_async_after: every call may turn async
        return _Request(
            self,
            queued=prefix is ASYNC_PREFIX,
            whisk=whisk,
            name=name.decode(),
            subpath=(slash + rest).decode(),
            method=method,
            raw_query=raw_query.decode(),
            headers=headers,
            head_length=len(head_bytes),
            body_length=length,
            http10=version == "1.0",
            keep_alive=parser.should_keep_alive(),
        )

    def _hand_over(self) -> None:
        """aiohttp's server takes this connection from here on, starting with the bytes
        of the request this server does not serve."""
        transport = self._transport
        if transport is None:
            return
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        self._server.connection_lost(cast(Any, self), None)
        handler = self._server()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._reading_paused:
            transport.resume_reading()
        data, self._buffer = bytes(self._buffer), bytearray()
        self._transport = None  # nothing here writes to it any more
        if data:
            handler.data_received(data)

    async def _serve(self, request: "_Request") -> None:
        try:
            await self._invoke(request)
        except asyncio.CancelledError:
            # Shutdown gave up on the call (shutdown_grace): cut the connection.
            self._close_now()
            raise
        except Exception:
            log.exception("error handling a sync call")
            if not request.started:
                request.send(500, "Internal Server Error", CIMultiDict(), b"", close=True)
            self._close_now()
        finally:
            self._task_handler = None
        self._after(request)

    async def _invoke(self, request: "_Request") -> None:
        invocations = self._invocations
        if request.whisk is not None:
            await self._whisk(request)
            return
        credentials = invocations.credentials
        if credentials is not None and not credentials.accept(request.headers.get("Authorization")):
            request.send_response(
                error_response(401, "authentication required", None, dict(CHALLENGE))
            )
            return
        requested = request.headers.get(CALL_ID)
        try:
            call = CallContext(resolve_call_id(requested), chosen_by_client=bool(requested))
        except InvalidCallIdError as exc:
            call = CallContext(new_call_id())
            request.send_response(invocation_error(InvalidRequestError(str(exc)), call))
            return
        try:
            if request.queued:
                response = await invocations.enqueue.handle_whole(request, call)
                call.apply_to(response.headers)
                request.send_response(response)
            else:
                await invocations.sync_proxy.handle_whole(request, call)
        except MAPPED_ERRORS as exc:
            if not request.started:
                request.send_response(invocation_error(http_error(exc), call))

    async def _whisk(self, request: "_Request") -> None:
        """A trigger fired or an action invoked, answered as its /api/v1 route does
        (gateway/routes.py openwhisk): OpenWhisk's error shape, the request id in
        X-Request-ID. Its credentials were checked when the head was read."""
        request_id = request_id_from(request.headers)
        try:
            if request.whisk == TRIGGERS:
                assert self._invocations.triggers is not None
                response = await self._invocations.triggers.fire_whole(request.name, request)
            else:
                assert self._invocations.openwhisk is not None
                query = MultiDict(parse_qsl(request.raw_query, keep_blank_values=True))
                response = await self._invocations.openwhisk.invoke_whole(
                    request.name, query, request
                )
        except MAPPED_ERRORS as exc:
            response = openwhisk_error(http_error(exc), request_id)
        response.headers[REQUEST_ID] = request_id
        request.send_response(response)

    def _after(self, request: "_Request") -> None:
        """The call is answered: on to the next request on this connection, or close."""
        if self._transport is None:
            return
        consumed = request.head_length + request.body_length
        if (
            not request.keep_alive
            or request.must_close
            or self._closing
            or len(self._buffer) < consumed  # a body not read to its end (an early answer)
        ):
            self._transport.close()
            return
        del self._buffer[:consumed]
        if self._reading_paused:
            self._reading_paused = False
            self._transport.resume_reading()
        self._idle_since = self._loop.time()
        if self._keepalive is None:
            self._keepalive = self._loop.call_later(KEEPALIVE_S, self._idle_timeout)
        if self._buffer:
            self._next_request()

    def _close_now(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    # what _Request uses

    def write(self, data: bytes) -> None:
        if self._transport is None or self._lost:
            raise ConnectionResetError("the client closed the connection")
        self._transport.write(data)

    async def drain(self) -> None:
        if self._lost:
            raise ConnectionResetError("the client closed the connection")
        if self._writing_paused:
            self._drain = self._loop.create_future()
            await self._drain

    async def more_bytes(self, wanted: int, timeout_s: float) -> None:
        """Wait until the buffer holds ``wanted`` bytes, each wait for more within
        ``timeout_s``."""
        while len(self._buffer) < wanted:
            if self._lost:
                raise ConnectionResetError("the client closed the connection")
            self._waiter = self._loop.create_future()
            try:
                async with asyncio.timeout(timeout_s):
                    await self._waiter
            finally:
                self._waiter = None

    def body_bytes(self, start: int, end: int) -> bytes:
        return bytes(self._buffer[start:end])

    @property
    def remote(self) -> str | None:
        return self._remote


class _Request:
    """One invocation taken whole: what SyncProxy.handle_whole reads and answers."""

    __slots__ = (
        "_chunked",
        "_connection",
        "body_length",
        "head_length",
        "headers",
        "host",
        "http10",
        "keep_alive",
        "method",
        "must_close",
        "name",
        "queued",
        "raw_query",
        "remote",
        "started",
        "subpath",
        "whisk",
    )

    def __init__(
        self,
        connection: InvocationProtocol,
        *,
        queued: bool,
        whisk: str | None,
        name: str,
        subpath: str,
        method: str,
        raw_query: str,
        headers: CIMultiDict[str],
        head_length: int,
        body_length: int,
        http10: bool,
        keep_alive: bool,
    ) -> None:
        self._connection = connection
        self.queued = queued  # /async-function/: recorded and queued, not proxied
        self.whisk = whisk  # under /api/v1: TRIGGERS (a fire) or ACTIONS (an invoke)
        self.name = name
        self.subpath = subpath
        self.method = method
        self.raw_query = raw_query
        self.headers = headers
        self.remote = connection.remote
        self.host = headers.get("Host") or _fqdn()
        self.head_length = head_length
        self.body_length = body_length
        self.http10 = http10
        self.keep_alive = keep_alive
        self.must_close = False
        self.started = False  # status and headers sent
        self._chunked = False

    async def body(self) -> bytes | None:
        if not self.body_length:
            return None  # as aiohttp: no Content-Length, or 0, is no body
        end = self.head_length + self.body_length
        timeout_s = self._connection._invocations.body_timeout_s
        try:
            await self._connection.more_bytes(end, timeout_s)
        except (TimeoutError, ConnectionError) as exc:
            raise client_failure(exc, timeout_s) from exc
        return self._connection.body_bytes(self.head_length, end)

    # answers

    def answer(self, status: int, reason: str, headers: CIMultiDict[str], body: bytes) -> None:
        with contextlib.suppress(ConnectionError):  # the client left: no one to tell
            self.send(status, reason, headers, body)

    def send_response(self, response: web.Response) -> None:
        """One of the gateway's own answers (an error, a 202, a fire's 204), built as for
        aiohttp."""
        body = response.body if response.body is not None else b""
        assert isinstance(body, bytes)
        headers = CIMultiDict(response.headers)
        close = response.keep_alive is False  # force_close()
        with contextlib.suppress(ConnectionError):
            self.send(response.status, response.reason, headers, body, close=close)

    def send(
        self,
        status: int,
        reason: str,
        headers: CIMultiDict[str],
        body: bytes,
        *,
        close: bool = False,
    ) -> None:
        if close:
            self.must_close = True
        if status < 200 or status in (204, 304):
            headers.popall("Content-Length", None)  # RFC 9110 8.6: none on a 204 (a fire's)
            body = b""
        elif "Content-Length" not in headers:
            headers["Content-Length"] = str(len(body))
        if body:
            headers.setdefault("Content-Type", "application/octet-stream")
        self.started = True
        self._connection.write(self._head(status, reason, headers) + body)

    async def start_answer(self, status: int, reason: str, headers: CIMultiDict[str]) -> None:
        empty = status < 200 or status in (204, 304)
        if empty:
            # RFC 9110 6.4.1: no body, whatever the function said about one.
            if status != 304:
                headers.popall("Content-Length", None)
            headers.popall("Transfer-Encoding", None)
        elif "Content-Length" not in headers:
            if self.http10:
                self.must_close = True  # the end of the body is the end of the connection
            else:
                headers["Transfer-Encoding"] = "chunked"
                self._chunked = True
            headers.setdefault("Content-Type", "application/octet-stream")
        elif headers["Content-Length"] != "0":
            headers.setdefault("Content-Type", "application/octet-stream")
        self.started = True
        self._connection.write(self._head(status, reason, headers))

    async def write(self, chunk: bytes) -> None:
        if not chunk:
            return
        if self._chunked:
            self._connection.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            self._connection.write(chunk)
        await self._connection.drain()

    async def end_answer(self) -> None:
        if self._chunked:
            self._connection.write(b"0\r\n\r\n")
        await self._connection.drain()

    def cut_short(self) -> None:
        self.must_close = True
        self._connection._close_now()

    def _head(self, status: int, reason: str, headers: CIMultiDict[str]) -> bytes:
        if "Date" not in headers:
            headers["Date"] = _Date.now()
        headers.setdefault("Server", SERVER_SOFTWARE)
        keep_alive = self.keep_alive and not self.must_close
        if "Connection" not in headers:
            if keep_alive and self.http10:
                headers["Connection"] = "keep-alive"
            elif not keep_alive and not self.http10:
                headers["Connection"] = "close"
        elif headers["Connection"].lower() == "close":
            self.must_close = True
        version = "1.0" if self.http10 else "1.1"
        lines = [f"HTTP/{version} {status} {reason}"]
        lines += [f"{key}: {value}" for key, value in headers.items()]
        text = "\r\n".join(lines)
        # A header that smuggles a line break would end the head early: refused, as aiohttp
        # refuses it.
        if text.count("\n") != len(lines) - 1 or text.count("\r") != len(lines) - 1:
            raise ValueError("a line break in a response header")
        return (text + "\r\n\r\n").encode("utf-8", "surrogateescape")


class InvocationSite(web.BaseSite):
    """A TCP site of an AppRunner whose connections meet InvocationProtocol first."""

    __slots__ = ("_host", "_invocations", "_port", "_reuse_port")

    def __init__(
        self,
        runner: web.AppRunner,
        invocations: Invocations,
        host: str,
        port: int,
        *,
        reuse_port: bool = False,
        backlog: int = 128,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._invocations = invocations
        self._host = host
        self._port = port
        self._reuse_port = reuse_port

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    @property
    def port(self) -> int:
        """The port listened on (the one the system chose, for port 0)."""
        assert self._server is not None
        sockets = cast(asyncio.Server, self._server).sockets
        return int(sockets[0].getsockname()[1])

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        invocations = self._invocations
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: InvocationProtocol(invocations, server),
            self._host,
            self._port,
            reuse_port=self._reuse_port or None,
            backlog=self._backlog,
        )
