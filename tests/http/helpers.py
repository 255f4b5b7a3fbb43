"""Servers for UpstreamClient's tests, and ways to drive the client: aiohttp apps for ordinary
behaviour, plain TCP servers (asyncio.start_server) where a server has to frame, time or break
its answer in ways aiohttp will not. The fixtures that start them are in conftest.py."""

import asyncio
import contextlib
import functools
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from faas_gateway.http.client import Timeouts, UpstreamClient, UpstreamResponse, _Connection

DEADLINE_S = 10.0
MIB = 1024 * 1024
# Limits far beyond any wait here: a test that means to hit a timeout sets its own.
LONG = Timeouts(connect_s=DEADLINE_S, read_s=DEADLINE_S, total_s=3 * DEADLINE_S)
# A short read timeout, for tests that wait for it to expire.
SHORT_READ_S = 0.3


# --- raw TCP servers ----------------------------------------------------------------------------


@dataclass
class RawRequest:
    head: bytes  # request line and headers, up to and including the blank line
    wire_body: bytes  # the body as framed on the wire (chunk sizes included)
    body: bytes  # the body with any chunked framing taken off

    @property
    def request_line(self) -> str:
        return self.head.split(b"\r\n", 1)[0].decode("latin-1")

    @property
    def headers(self) -> list[tuple[str, str]]:
        lines = self.head[:-4].decode("latin-1").split("\r\n")[1:]
        return [(name, value.strip()) for name, value in (line.split(":", 1) for line in lines)]

    def header_values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]


async def read_request(reader: asyncio.StreamReader) -> RawRequest | None:
    """The next request on a connection, or None when the client closed it."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    except ConnectionResetError:
        return None
    request = RawRequest(head, b"", b"")
    if any("chunked" in value for value in request.header_values("Transfer-Encoding")):
        request.wire_body, request.body = await read_chunked(reader)
    elif lengths := request.header_values("Content-Length"):
        request.wire_body = request.body = await reader.readexactly(int(lengths[0]))
    return request


async def read_chunked(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    wire, body = bytearray(), bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        wire += size_line
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            while (trailer := await reader.readuntil(b"\r\n")) != b"\r\n":
                wire += trailer
            wire += b"\r\n"
            return bytes(wire), bytes(body)
        data = await reader.readexactly(size + 2)
        wire += data
        body += data[:-2]


def http_response(
    status: int = 200,
    body: bytes = b"",
    headers: Iterable[tuple[str, str]] = (),
    reason: str = "OK",
    length: bool = True,
) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{name}: {value}" for name, value in headers)]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass(eq=False)
class RawConnection:
    index: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    requests: list[RawRequest] = field(default_factory=list)
    # Set when the server reads end-of-stream (or a reset): the client closed the connection.
    closed_by_client: asyncio.Event = field(default_factory=asyncio.Event)

    async def next_request(self) -> RawRequest | None:
        try:
            request = await read_request(self.reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            request = None
        if request is None:
            self.closed_by_client.set()
        else:
            self.requests.append(request)
        return request

    async def send(self, data: bytes) -> None:
        if self.writer.is_closing():
            # uvloop raises RuntimeError for a write to a closed transport; say what it means.
            raise ConnectionResetError("the connection is closed")
        self.writer.write(data)
        await self.writer.drain()

    async def until_closed_by_client(self) -> bytes:
        """Read whatever else comes until the client closes; return it."""
        rest = bytearray()
        with contextlib.suppress(ConnectionError):
            while chunk := await self.reader.read(65536):
                rest += chunk
        self.closed_by_client.set()
        return bytes(rest)

    async def wait_closed_by_client(self) -> None:
        await asyncio.wait_for(self.closed_by_client.wait(), DEADLINE_S)


RawHandler = Callable[[RawConnection], Awaitable[None]]


class RawServer:
    """A plain TCP server; ``handler`` runs once per connection, which is closed after it."""

    def __init__(self, handler: RawHandler, host: str = "127.0.0.1") -> None:
        self.handler = handler
        self.host = host
        self.port = 0
        self.connections: list[RawConnection] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> "RawServer":
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback that starts its own task: close() can then cancel handlers without
        # Python 3.11's streams logging each cancelled one as an error.
        connection = RawConnection(len(self.connections), reader, writer)
        self.connections.append(connection)
        self._tasks.add(asyncio.ensure_future(self._serve(connection)))

    async def _serve(self, connection: RawConnection) -> None:
        try:
            await self.handler(connection)
        except ConnectionError:
            connection.closed_by_client.set()
        finally:
            connection.writer.close()
            with contextlib.suppress(ConnectionError):
                await connection.writer.wait_closed()

    def url(self, path: str = "/") -> URL:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return URL(f"http://{host}:{self.port}{path}", encoded=True)

    @property
    def requests(self) -> list[RawRequest]:
        return [request for connection in self.connections for request in connection.requests]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for connection in self.connections:
            connection.writer.close()
        if self._server is not None:
            await self._server.wait_closed()


def answer_each(
    respond: Callable[[RawConnection, RawRequest], bytes] | bytes,
) -> RawHandler:
    """A handler that answers every request on a connection until the client closes it."""

    async def handler(connection: RawConnection) -> None:
        while (request := await connection.next_request()) is not None:
            answer = respond if isinstance(respond, bytes) else respond(connection, request)
            await connection.send(answer)

    return handler


OK_ANSWER = http_response(200, b"fine")


# --- aiohttp servers ------------------------------------------------------------------------------


@dataclass
class AppServer:
    server: TestServer
    scheme: str
    # One entry per request: the client's address, which names the TCP connection it came on.
    peers: list[Any] = field(default_factory=list)

    def url(self, path: str = "/") -> URL:
        return URL(f"{self.scheme}://127.0.0.1:{self.server.port}{path}", encoded=True)

    @property
    def connection_count(self) -> int:
        return len(set(self.peers))


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def echo(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    return web.Response(
        body=b"%s %s %s" % (request.method.encode(), request.raw_path.encode(), body),
        headers={"X-Method": request.method},
    )


# --- the client -----------------------------------------------------------------------------------


async def fetch(
    client: UpstreamClient,
    url: URL,
    method: str = "GET",
    headers: Iterable[tuple[str, str]] = (),
    body: bytes | AsyncIterator[bytes] | None = None,
    timeouts: Timeouts = LONG,
) -> tuple[UpstreamResponse, bytes]:
    """One whole exchange: the response (released) and its body."""
    async with await client.request(method, url, list(headers), body, timeouts) as response:
        return response, await response.read()


def idle_connections(client: UpstreamClient) -> list[_Connection]:
    return [connection for pooled in client._idle.values() for connection in pooled]


def connection_of(response: UpstreamResponse) -> _Connection:
    connection = response._connection
    assert connection is not None
    return connection


async def assert_client_still_works(client: UpstreamClient, url: URL) -> None:
    """The pool is not poisoned: the next request to the same place gets a whole answer."""
    response, body = await fetch(client, url)
    assert (response.status, body) == (200, b"fine")


def misbehave_once(first: RawHandler) -> RawHandler:
    """The first connection gets ``first``; later ones an ordinary server answering 'fine'."""
    ordinary = answer_each(OK_ANSWER)

    async def handler(connection: RawConnection) -> None:
        await (first if connection.index == 0 else ordinary)(connection)

    return handler


async def event_set(event: asyncio.Event) -> None:
    await asyncio.wait_for(event.wait(), DEADLINE_S)


@functools.lru_cache(maxsize=1)
def large_body(size: int) -> bytes:
    return random.Random(size).randbytes(size)
