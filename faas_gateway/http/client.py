"""A lean HTTP/1.1 client for calling functions and callback receivers.

Why not aiohttp's client: on the gateway's hot path it cost about 80 µs of CPU per request
here, three times what this client costs, and it was the largest item in the profile of both
the sync proxy and the queue-worker (bench/README.md). What we need is narrow: send one
request on a pooled keep-alive connection, stream the body either way, hand back status,
headers and body unchanged. Parsing, the part that is easy to get wrong, is done by
httptools (llhttp, the parser of Node.js); this module only frames requests, pools
connections and applies timeouts.

Not supported, on purpose: redirects (a proxy passes them on), cookies (none are kept),
decompression (bodies pass through as they are), proxies, HTTP/2, upgrades.
"""

import asyncio
import collections
import socket
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

import httptools
from multidict import CIMultiDict
from yarl import URL

# Methods whose requests carry no body unless given one; others get "Content-Length: 0".
_BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "CONNECT"})
_IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Framing is ours to decide: these request headers from the caller are replaced.
_FRAMING_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})
# A response body buffered beyond this stops reading from the socket until it is consumed.
_HIGH_WATER_BYTES = 256 * 1024
_LOW_WATER_BYTES = 64 * 1024


class UpstreamError(Exception):
    """A request to a function or callback receiver did not get a whole response."""


class UpstreamConnectError(UpstreamError):
    """No connection: refused, unknown host, TLS failure, or connect timeout."""


class UpstreamDisconnectedError(UpstreamError):
    """The connection broke, or the peer answered with something that is not HTTP/1.x."""


class UpstreamInvalidResponseError(UpstreamDisconnectedError):
    """The peer answered, but not with a response HTTP/1.1 allows (a status outside 100-599, a
    1xx that claims to be final, bytes that are not HTTP)."""


class UpstreamRefusedError(UpstreamError):
    """We would not send to the address the name led to (callback_allowed_hosts)."""


class UpstreamTimeoutError(UpstreamError, TimeoutError):
    """No bytes within the read timeout, or the whole exchange over its total timeout."""


class _UnaskedResponse(Exception):
    """Raised from a parser callback to stop parsing at a response nobody asked for."""


class _InvalidStatus(Exception):
    """Raised from a parser callback to stop parsing at a status no final response may have."""


def failure_for_caller(exc: BaseException) -> str:
    """Why a request failed, in words fit for whoever called the function.

    ``str(exc)`` names where the request went (host, port, the address connected to, the
    system's own words about it): that is for the log, never for a client, a record or a
    callback, which would learn the network behind the gateway from it.
    """
    if isinstance(exc, UpstreamTimeoutError):
        return "it did not answer in time"
    if isinstance(exc, UpstreamConnectError):
        return "no connection could be made"
    if isinstance(exc, UpstreamRefusedError):
        return "its address is not allowed"
    if isinstance(exc, UpstreamInvalidResponseError):
        return "its answer was not a valid HTTP response"
    if isinstance(exc, UpstreamDisconnectedError):
        return "the connection broke"
    if isinstance(exc, ValueError):
        return "the request could not be framed as HTTP"
    return "the exchange failed"


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect_s: float
    read_s: float  # longest wait for the response headers or for the next body bytes
    total_s: float | None  # the whole exchange, response body included


def _expire(waiter: "asyncio.Future[Any]", error: BaseException) -> None:
    if not waiter.done():
        waiter.set_exception(error)


# A pool of kept-alive connections: scheme, host, port, and whether the addresses connected to
# were checked (see UpstreamClient.request's allow_peer).
_PoolKey = tuple[str, str, int, bool]


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection and the one exchange in flight on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.dialed: str | None = None  # the address connected to, when it was checked
        self.closed = False
        self.idle_since = 0.0
        self.received_any = False  # any byte of a response to the exchange in flight
        self._parser: httptools.HttpResponseParser | None = None
        self._head_only = False
        self._reusable = False
        self._error: BaseException | None = None
        self._paused_writing = False
        self._drain_waiter: asyncio.Future[None] | None = None
        # The exchange in flight.
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[str, str]] = []
        self._headers_waiter: asyncio.Future[None] | None = None
        self._body: collections.deque[bytes] = collections.deque()
        self._buffered_bytes = 0
        self._body_waiter: asyncio.Future[None] | None = None
        self._complete = False
        self._reading_paused = False
        # The read timeout of the wait under way (_wait): one timer per connection, moved on
        # lazily, instead of one made and cancelled for every wait of every exchange.
        self._waiting: asyncio.Future[None] | None = None
        self._waiting_for = ""
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports have the Transport methods without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._reusable = False
        self._stop_timer()
        if self._parser is not None and not self._complete:
            if self.status and self._ends_at_close():
                self._finish_message()  # the body was delimited by the close itself
            else:
                self._fail(UpstreamDisconnectedError(f"connection lost: {exc or 'closed by peer'}"))
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(UpstreamDisconnectedError("connection lost"))

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        if self._parser is None or self._complete:
            # Bytes nobody asked for: the connection is in an unknown state.
            self._reusable = False
            if self.transport is not None:
                self.transport.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamInvalidResponseError("the upstream switched protocols"))
        except httptools.HttpParserError as exc:
            # A callback's own exception, if one failed, says more than the parser's.
            cause = exc.__context__ or exc
            self._fail(UpstreamInvalidResponseError(f"invalid HTTP response: {cause}"))

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self._complete:
            # A second response to one request, in the same read as the first: its status
            # and headers must not overwrite ours, and the stream is out of step.
            raise _UnaskedResponse("a second response to one request")

    def on_status(self, status: bytes) -> None:
        self.reason += status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        status = self._parser.get_status_code()
        if not 100 <= status <= 599:
            # llhttp takes any three digits; 000 would even leave the exchange waiting for a
            # status that never comes. Raised here, it stops the parser: a 502 at once.
            raise _InvalidStatus(f"status {status:03d} is outside 100-599")
        if status < 200:
            self._skip_informational(status)
            return
        self.status = status
        if self._headers_waiter is not None and not self._headers_waiter.done():
            self._headers_waiter.set_result(None)
        if self._head_only or status in (204, 304):
            self._finish_message()

    def _skip_informational(self, status: int) -> None:
        """100 Continue, 102 Processing, 103 Early Hints: the real response follows."""
        if status == 101:
            # Final by definition, and we never ask for an upgrade.
            raise _InvalidStatus("the upstream switched protocols (101)")
        for name, _ in self.headers:
            if name.lower() in ("content-length", "transfer-encoding"):
                # Framing a body is what a final response does; a 1xx has none (RFC 9110
                # 8.6, RFC 9112 6.1). Whatever follows is no response we could trust.
                raise _InvalidStatus(f"a {status} response framed like a final one ({name})")
        self.headers = []
        self.reason = ""

    def on_body(self, body: bytes) -> None:
        if self._complete:
            return
        self._body.append(body)
        self._buffered_bytes += len(body)
        if self._buffered_bytes > _HIGH_WATER_BYTES and not self._reading_paused:
            assert self.transport is not None
            self.transport.pause_reading()
            self._reading_paused = True
        self._wake_body()

    def on_message_complete(self) -> None:
        if self.status and not self._complete:
            self._finish_message()

    # the exchange

    def start_exchange(self, head_only: bool) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._head_only = head_only
        self._reusable = True
        self._error = None
        self.status = 0
        self.reason = ""
        self.headers = []
        self._body.clear()
        self._buffered_bytes = 0
        self._complete = False
        self.received_any = False
        self._headers_waiter = self._loop.create_future()
        if self._reading_paused:
            # The read that completed the last response paused reading, and its body was
            # left unread: nothing else would resume it, and this response would never come.
            assert self.transport is not None
            self.transport.resume_reading()
            self._reading_paused = False

    def _ends_at_close(self) -> bool:
        """A body with neither Content-Length nor chunked framing ends when the peer closes.

        Chunked framing means chunked as the last transfer coding (RFC 9112 6.3): under any
        other, such as "gzip", the body ends at the close, Content-Length or not.
        """
        codings = [value for name, value in self.headers if name.lower() == "transfer-encoding"]
        if codings:
            return codings[-1].rsplit(",", 1)[-1].strip().lower() != "chunked"
        return all(name.lower() != "content-length" for name, _ in self.headers)

    def _finish_message(self) -> None:
        self._complete = True
        if self._parser is not None and not self._parser.should_keep_alive():
            self._reusable = False
        self._wake_body()

    def _fail(self, error: BaseException) -> None:
        self._reusable = False
        if self._error is None:
            self._error = error
        if self._headers_waiter is not None and not self._headers_waiter.done():
            self._headers_waiter.set_exception(error)
        self._wake_body()
        if self.transport is not None:
            self.transport.close()

    def _wake_body(self) -> None:
        if self._body_waiter is not None and not self._body_waiter.done():
            self._body_waiter.set_result(None)

    async def wait_for_headers(
        self, read_s: float, total_deadline: float, upload: "asyncio.Task[None] | None"
    ) -> None:
        assert self._headers_waiter is not None
        if upload is not None and not upload.done():
            # The read timeout starts once the request is sent whole, as in aiohttp and in
            # Go's ResponseHeaderTimeout: a slow upload (a slow client's, passed through) is
            # no silence of the upstream's. Until then only the total timeout applies.
            await self._wait_for_either(upload, total_deadline)
        deadline = min(self._loop.time() + read_s, total_deadline)
        await self._wait(self._headers_waiter, deadline, "no response headers")

    async def _wait_for_either(self, upload: "asyncio.Task[None]", deadline: float) -> None:
        assert self._headers_waiter is not None
        timeout_s = None if deadline == float("inf") else max(0.0, deadline - self._loop.time())
        done, _ = await asyncio.wait(
            (self._headers_waiter, upload), timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        if not done:
            # Past the total deadline: the wait for the headers that follows raises this.
            _expire(self._headers_waiter, UpstreamTimeoutError("no response headers"))

    async def next_chunk(self, read_s: float, total_deadline: float) -> bytes | None:
        """The next piece of the body, or None at its end."""
        while True:
            if self._body:
                chunk = self._body.popleft()
                self._buffered_bytes -= len(chunk)
                if self._reading_paused and self._buffered_bytes < _LOW_WATER_BYTES:
                    assert self.transport is not None
                    self.transport.resume_reading()
                    self._reading_paused = False
                return chunk
            if self._complete:
                return None
            if self._error is not None:
                raise self._error
            self._body_waiter = self._loop.create_future()
            deadline = min(self._loop.time() + read_s, total_deadline)
            await self._wait(self._body_waiter, deadline, "the response body stalled")

    async def _wait(self, waiter: "asyncio.Future[None]", deadline: float, what: str) -> None:
        if deadline == float("inf"):
            await waiter
            return
        self._waiting, self._waiting_for, self._deadline = waiter, what, deadline
        if self._timer is None or self._timer_at > deadline:
            self._stop_timer()
            self._timer_at = deadline
            self._timer = self._loop.call_at(deadline, self._check_deadline)
        try:
            await waiter
        except UpstreamTimeoutError:
            self._fail(UpstreamTimeoutError(what))
            raise
        finally:
            self._waiting = None

    def _check_deadline(self) -> None:
        """The timer came: expire the wait under way if its deadline has passed, else set the
        timer again for it (the waits since the timer was set ended, and a later one began)."""
        self._timer = None
        waiter = self._waiting
        if waiter is None or waiter.done():
            return  # nothing waits: the next wait sets the timer
        if self._loop.time() >= self._deadline:
            _expire(waiter, UpstreamTimeoutError(self._waiting_for))
        else:
            self._timer_at = self._deadline
            self._timer = self._loop.call_at(self._deadline, self._check_deadline)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def drain(self) -> None:
        if not self._paused_writing:
            return
        if self.closed:
            raise UpstreamDisconnectedError("connection lost while sending the request")
        self._drain_waiter = self._loop.create_future()
        await self._drain_waiter

    @property
    def complete(self) -> bool:
        return self._complete

    @property
    def reusable(self) -> bool:
        return self._reusable and self._complete and not self.closed and self._error is None

    def abandon(self) -> None:
        """Close without waiting: the exchange will not be finished."""
        self._reusable = False
        self.closed = True
        self._stop_timer()
        if self.transport is not None:
            self.transport.close()


class UpstreamResponse:
    """Status and headers are here at once; the body is read with read() or chunks().

    Use it as an async context manager, or call release(): a connection is reused only
    when its response was read to the end.
    """

    def __init__(
        self,
        client: "UpstreamClient",
        key: _PoolKey,
        connection: _Connection,
        read_s: float,
        total_deadline: float,
        upload: "asyncio.Task[None] | None",
    ) -> None:
        self._client = client
        self._key = key
        self._connection: _Connection | None = connection
        self._read_s = read_s
        self._total_deadline = total_deadline
        self._upload = upload
        self.status = connection.status
        self.reason = connection.reason
        self.headers: CIMultiDict[str] = CIMultiDict(connection.headers)

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    async def read(self) -> bytes:
        # Not through chunks(): an async generator per response costs more than a small
        # body's whole read.
        connection = self._connection
        if connection is None:
            return b""
        chunks = []
        while (
            chunk := await connection.next_chunk(self._read_s, self._total_deadline)
        ) is not None:
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def chunks(self) -> AsyncIterator[bytes]:
        connection = self._connection
        if connection is None:
            return
        while (
            chunk := await connection.next_chunk(self._read_s, self._total_deadline)
        ) is not None:
            yield chunk

    def release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if self._upload is not None and not self._upload.done():
            # The response ended before the request body did: the stream is out of step.
            self._upload.cancel()
            connection.abandon()
        self._client._release(self._key, connection)

    async def __aenter__(self) -> "UpstreamResponse":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()


class UpstreamClient:
    """Keep-alive connections per (scheme, host, port), reused most-recent first; those of
    requests whose addresses are checked (allow_peer) are pooled apart."""

    def __init__(
        self, *, keepalive_s: float = 30.0, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self._keepalive_s = keepalive_s
        self._ssl_context = ssl_context
        self._idle: dict[_PoolKey, list[_Connection]] = {}
        self._last_sweep = time.monotonic()
        self._closed = False

    async def request(
        self,
        method: str,
        url: URL,
        headers: Iterable[tuple[str, str]],
        body: bytes | AsyncIterable[bytes] | None,
        timeouts: Timeouts,
        allow_peer: Callable[[str], bool] | None = None,
    ) -> UpstreamResponse:
        """Send the request and wait for the response's status and headers.

        A bytes body is sent with Content-Length. A streamed body is sent with the caller's
        Content-Length header if it gave one (and then must be exactly that long), else
        chunked. ``allow_peer`` sees every address the host leads to before any connection is
        made (a kept-alive connection: the address it was made to); False for any of them
        raises UpstreamRefusedError.
        """
        loop = asyncio.get_running_loop()
        total_deadline = loop.time() + timeouts.total_s if timeouts.total_s else float("inf")
        scheme = url.scheme
        host = url.raw_host or ""
        port = url.port or (443 if scheme == "https" else 80)
        key = (scheme, host, port, allow_peer is not None)
        # Framed before connecting: a request that cannot be sent must not cost a connection.
        head, chunked = _request_head(method, url, headers, body)
        replayable = body is None or isinstance(body, bytes | bytearray | memoryview)
        for attempt in (1, 2):
            connection, reused = await self._connect(key, timeouts, total_deadline, allow_peer)
            upload: asyncio.Task[None] | None = None
            try:
                upload = _send(connection, method, head, body, chunked)
                await connection.wait_for_headers(timeouts.read_s, total_deadline, upload)
            except BaseException as exc:
                if upload is not None:
                    upload.cancel()
                connection.abandon()
                # A kept-alive connection the server closed just as we sent on it: the server
                # read nothing, but only for idempotent methods can we be sure of that (RFC
                # 9110 9.2.2), so only they go again, once, on a new connection.
                if (
                    isinstance(exc, UpstreamDisconnectedError)
                    and attempt == 1
                    and reused
                    and replayable
                    and method in _IDEMPOTENT_METHODS
                    and not connection.received_any
                ):
                    continue
                raise
            return UpstreamResponse(self, key, connection, timeouts.read_s, total_deadline, upload)
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def _connect(
        self,
        key: _PoolKey,
        timeouts: Timeouts,
        total_deadline: float,
        allow_peer: Callable[[str], bool] | None,
    ) -> tuple[_Connection, bool]:
        """A connection, and whether it was kept alive from an earlier request."""
        scheme, host, port, _ = key
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if not connection.closed and now - connection.idle_since < self._keepalive_s:
                if allow_peer is not None and not allow_peer(connection.dialed or ""):
                    connection.abandon()
                    raise UpstreamRefusedError(
                        f"{host}:{port} led to {connection.dialed}, not allowed"
                    )
                return connection, True
            connection.abandon()
        loop = asyncio.get_running_loop()
        use_ssl: ssl.SSLContext | bool | None = None
        if scheme == "https":
            use_ssl = self._ssl_context or True
        timeout_s = min(timeouts.connect_s, max(0.0, total_deadline - loop.time()))
        try:
            async with asyncio.timeout(timeout_s):
                if allow_peer is None:
                    _, connection = await loop.create_connection(
                        lambda: _Connection(loop), host, port, ssl=use_ssl
                    )
                    return connection, False
                return await self._connect_checked(host, port, use_ssl, allow_peer), False
        except TimeoutError as exc:
            raise UpstreamConnectError(f"connecting to {host}:{port} timed out") from exc
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamConnectError(f"cannot connect to {host}:{port}: {exc}") from exc

    async def _connect_checked(
        self,
        host: str,
        port: int,
        use_ssl: ssl.SSLContext | bool | None,
        allow_peer: Callable[[str], bool],
    ) -> _Connection:
        """Resolve the name here and connect only if every address it leads to is allowed.

        The socket cannot be asked afterwards: one connected to 0.0.0.0 reports 127.0.0.1 as
        its peer. As create_connection does, the addresses are tried in turn.
        """
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = list(dict.fromkeys(str(sockaddr[0]) for *_, sockaddr in infos))
        refused = [address for address in addresses if not allow_peer(address)]
        if refused or not addresses:
            raise UpstreamRefusedError(
                f"{host}:{port} leads to {', '.join(refused) or 'no address'}, not allowed"
            )
        error: OSError | None = None
        for address in addresses:
            try:
                _, connection = await loop.create_connection(
                    lambda: _Connection(loop),
                    address,
                    port,
                    ssl=use_ssl,
                    server_hostname=host if use_ssl else None,
                )
            except OSError as exc:
                error = exc
                continue
            connection.dialed = address
            return connection
        assert error is not None
        raise error

    def _release(self, key: _PoolKey, connection: _Connection) -> None:
        if self._closed or not connection.reusable:
            connection.abandon()
            return
        now = time.monotonic()
        connection.idle_since = now
        self._idle.setdefault(key, []).append(connection)
        if now - self._last_sweep > self._keepalive_s:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        self._last_sweep = now
        for idle in self._idle.values():
            keep = [c for c in idle if not c.closed and now - c.idle_since < self._keepalive_s]
            for connection in idle:
                if connection not in keep:
                    connection.abandon()
            idle[:] = keep

    async def close(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for connection in idle:
                connection.abandon()
        self._idle.clear()


def _send(
    connection: _Connection,
    method: str,
    head: bytes,
    body: bytes | AsyncIterable[bytes] | None,
    chunked: bool,
) -> "asyncio.Task[None] | None":
    """Write the request; a streamed body goes on in a task of its own, which is returned."""
    connection.start_exchange(head_only=method == "HEAD")
    transport = connection.transport
    assert transport is not None
    if body is None:
        transport.write(head)
        return None
    if isinstance(body, bytes | bytearray | memoryview):
        if len(body) < 65536:
            transport.write(head + body)
        else:
            transport.write(head)
            transport.write(body)
        return None
    transport.write(head)
    return asyncio.get_running_loop().create_task(_upload(connection, body, chunked))


def _request_head(
    method: str,
    url: URL,
    headers: Iterable[tuple[str, str]],
    body: bytes | AsyncIterable[bytes] | None,
) -> tuple[bytes, bool]:
    target = url.raw_path_qs or "/"
    host = url.raw_host or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    if url.explicit_port:
        host = f"{host}:{url.port}"
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    given_length: str | None = None
    for name, value in headers:
        lowered = name.lower()
        if lowered in _FRAMING_HEADERS:
            if lowered == "content-length":
                given_length = value.strip()
            continue
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
            raise ValueError(f"header {name!r} cannot be sent: it holds a line break or colon")
        lines.append(f"{name}: {value}")
    chunked = False
    if body is None:
        if method not in _BODYLESS_METHODS:
            lines.append("Content-Length: 0")
    elif isinstance(body, bytes | bytearray | memoryview):
        lines.append(f"Content-Length: {len(body)}")
    elif given_length is not None:
        if not given_length.isascii() or not given_length.isdigit():
            # Sent as given, it must be a number: anything else would be a header of its own.
            raise ValueError(f"Content-Length {given_length!r} is not a number")
        lines.append(f"Content-Length: {given_length}")
    else:
        lines.append("Transfer-Encoding: chunked")
        chunked = True
    lines.append("\r\n")
    return "\r\n".join(lines).encode("utf-8", "surrogateescape"), chunked


async def _upload(connection: _Connection, body: AsyncIterable[bytes], chunked: bool) -> None:
    transport = connection.transport
    assert transport is not None
    try:
        async for chunk in body:
            if not chunk:
                continue
            if chunked:
                transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            else:
                transport.write(chunk)
            await connection.drain()
        if chunked:
            transport.write(b"0\r\n\r\n")
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        # The body's source failed (the caller's own client went away, say): the request
        # cannot be completed, so the connection goes.
        connection._fail(UpstreamDisconnectedError(f"request body broke off: {exc!r}"))
