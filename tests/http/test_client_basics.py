"""UpstreamClient, the gateway's and worker's HTTP/1.1 client, against real servers: aiohttp
apps for ordinary behaviour, plain TCP servers (asyncio.start_server, or a bare protocol) where
a server has to frame, time or break its answer in ways aiohttp will not. Every test runs on
both the asyncio loop and uvloop (tests/conftest.py). Nothing is mocked; streaming and flow
control are proven by handshakes and buffer sizes, never by how long something took."""

import asyncio
import contextlib
import functools
import hashlib
import random
import select
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from faas_gateway.http.client import (
    _HIGH_WATER_BYTES,
    Timeouts,
    UpstreamClient,
    UpstreamConnectError,
    UpstreamDisconnectedError,
    UpstreamError,
    UpstreamInvalidResponseError,
    UpstreamRefusedError,
    UpstreamResponse,
    UpstreamTimeoutError,
    _Connection,
    _request_head,
)
from tests.harness import wait_until

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


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[..., Awaitable[RawServer]]]:
    """``server = await raw_server(handler, host="127.0.0.1")``."""
    servers: list[RawServer] = []

    async def start(handler: RawHandler, host: str = "127.0.0.1") -> RawServer:
        server = RawServer(handler, host)
        servers.append(server)
        return await server.start()

    yield start
    for server in servers:
        await server.close()


def reset_connection(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0, so the peer gets a TCP RST rather than an orderly FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


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


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[AppServer]]]:
    """``server = await serve(handler, ssl_context=None)``: an aiohttp app on every path."""
    servers: list[TestServer] = []

    async def start(handler: Handler, ssl_context: ssl.SSLContext | None = None) -> AppServer:
        app = web.Application(client_max_size=1024**3)
        server = TestServer(app, host="127.0.0.1")
        running = AppServer(server, "https" if ssl_context else "http")

        async def recording(request: web.Request) -> web.StreamResponse:
            assert request.transport is not None
            running.peers.append(request.transport.get_extra_info("peername"))
            return await handler(request)

        app.router.add_route("*", "/{tail:.*}", recording)
        await server.start_server(ssl=ssl_context)
        servers.append(server)
        return running

    yield start
    for server in servers:
        await server.close()


async def echo(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    return web.Response(
        body=b"%s %s %s" % (request.method.encode(), request.raw_path.encode(), body),
        headers={"X-Method": request.method},
    )


# --- the client -----------------------------------------------------------------------------------


@pytest.fixture
async def make_client() -> AsyncIterator[Callable[..., UpstreamClient]]:
    clients: list[UpstreamClient] = []

    def make(**options: Any) -> UpstreamClient:
        made = UpstreamClient(**options)
        clients.append(made)
        return made

    yield make
    for made in clients:
        await made.close()


@pytest.fixture
def client(make_client: Callable[..., UpstreamClient]) -> UpstreamClient:
    return make_client()


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


# --- request and response basics ------------------------------------------------------------------


async def test_status_reason_headers_and_body_come_back(serve, client):
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.Response(status=201, reason="Made It", body=b"the body")
        response.headers.add("X-Single", "one")
        response.headers.add("Set-Cookie", "a=1; Path=/")
        response.headers.add("X-Between", "between")
        response.headers.add("Set-Cookie", "b=2; HttpOnly")
        return response

    server = await serve(handler)
    response, body = await fetch(client, server.url("/"))
    assert response.status == 201
    assert response.reason == "Made It"
    assert response.headers["X-Single"] == "one"
    assert response.headers.getall("set-cookie") == ["a=1; Path=/", "b=2; HttpOnly"]
    ours = [(k, v) for k, v in response.headers.items() if k.startswith(("X-", "Set-"))]
    assert ours == [
        ("X-Single", "one"),
        ("Set-Cookie", "a=1; Path=/"),
        ("X-Between", "between"),
        ("Set-Cookie", "b=2; HttpOnly"),
    ]
    assert response.content_length == len(b"the body")
    assert body == b"the body"


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"])
async def test_each_method_reaches_the_server(method, serve, client):
    server = await serve(echo)
    body = None if method in ("GET", "HEAD") else f"{method} payload".encode()
    response, received = await fetch(client, server.url("/m?x=1"), method, body=body)
    assert response.status == 200
    assert response.headers["X-Method"] == method
    expected = b"%s /m?x=1 %s" % (method.encode(), body or b"")
    if method == "HEAD":
        # The length of the body a GET would get, and no body.
        assert received == b""
        assert response.content_length == len(b"HEAD /m?x=1 ")
    else:
        assert received == expected


async def test_request_is_framed_byte_for_byte(raw_server, client):
    server = await raw_server(answer_each(OK_ANSWER))
    target = "/a%2Fb/c%20d/%E2%9C%93;p=1?q=%41%20b&x=1&x=2&empty=&flag"
    headers = [("X-One", "1"), ("X-Multi", "a"), ("Accept", "*/*"), ("X-Multi", "b")]
    _, body = await fetch(client, server.url(target), headers=headers)
    assert body == b"fine"
    [request] = server.requests
    expected = (
        f"GET {target} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{server.port}\r\n"
        "X-One: 1\r\nX-Multi: a\r\nAccept: */*\r\nX-Multi: b\r\n\r\n"
    )
    assert request.head == expected.encode()


async def test_non_ascii_header_values_go_out_as_utf8_and_come_back(raw_server, client):
    server = await raw_server(
        answer_each(b"HTTP/1.1 200 OK\r\nX-Back: caf\xc3\xa9\r\nContent-Length: 4\r\n\r\nfine")
    )
    response, _ = await fetch(client, server.url(), headers=[("X-Name", "naïve ✓")])
    assert response.headers["X-Back"] == "café"
    assert server.requests[0].header_values("X-Name") == ["naïve ✓".encode().decode("latin-1")]


async def test_ipv6_literal_host(raw_server, client):
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    server = await raw_server(answer_each(OK_ANSWER), host="::1")
    _, body = await fetch(client, server.url("/six"))
    assert body == b"fine"
    assert server.requests[0].request_line == "GET /six HTTP/1.1"
    assert server.requests[0].header_values("Host") == [f"[::1]:{server.port}"]


def test_host_header_leaves_out_a_default_port() -> None:
    # No socket: port 80 cannot be listened on here, and only the head is in question.
    head, chunked = _request_head("GET", URL("http://example.com/x?y=1"), [], None)
    assert head == b"GET /x?y=1 HTTP/1.1\r\nHost: example.com\r\n\r\n"
    assert not chunked
    head, _ = _request_head("GET", URL("http://[2001:db8::1]/"), [], None)
    assert head.split(b"\r\n")[1] == b"Host: [2001:db8::1]"


async def test_bytes_body_gets_content_length(raw_server, client):
    server = await raw_server(answer_each(OK_ANSWER))
    payload = random.Random(1).randbytes(200_000)  # more than one write's worth
    await fetch(client, server.url(), "PUT", body=payload)
    [request] = server.requests
    assert request.header_values("Content-Length") == [str(len(payload))]
    assert request.header_values("Transfer-Encoding") == []
    assert request.body == payload


async def test_bodyless_post_says_content_length_zero_and_get_says_nothing(raw_server, client):
    server = await raw_server(answer_each(OK_ANSWER))
    await fetch(client, server.url("/post"), "POST")
    await fetch(client, server.url("/get"), "GET")
    await fetch(client, server.url("/delete"), "DELETE")
    post, get, delete = server.requests
    assert post.header_values("Content-Length") == ["0"]
    assert delete.header_values("Content-Length") == ["0"]
    assert get.header_values("Content-Length") == []
    assert get.header_values("Transfer-Encoding") == []


async def test_callers_framing_headers_are_replaced_by_the_clients_own(raw_server, client):
    server = await raw_server(answer_each(OK_ANSWER))
    headers = [
        ("Host", "evil.example"),
        ("Connection", "close"),
        ("Transfer-Encoding", "chunked"),
        ("content-length", "999"),
        ("X-Kept", "yes"),
    ]
    await fetch(client, server.url("/f"), "POST", headers=headers, body=b"hello")
    await fetch(client, server.url("/again"))
    first, second = server.requests
    expected = (
        f"POST /f HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nX-Kept: yes\r\n"
        "Content-Length: 5\r\n\r\n"
    )
    assert first.head == expected.encode()
    assert first.body == b"hello"
    # The caller's "Connection: close" did not go out, so the connection was kept.
    assert len(server.connections) == 1
    assert second.request_line == "GET /again HTTP/1.1"


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ([("X-Evil", "a\r\nX-Injected: 1")], None),
        ([("X-Evil", "a\nX-Injected: 1")], None),
        ([("X-Evil", "a\rb")], None),
        ([("X-Evil\r\nX-Injected", "1")], None),
        ([("X-Evil: 1\r\nX", "1")], None),
        ([("Content-Length", "5\r\nX-Injected: 1")], "stream"),
        ([("Content-Length", "five")], "stream"),
    ],
    ids=["crlf-value", "lf-value", "cr-value", "crlf-name", "colon-name", "cl-crlf", "cl-nan"],
)
async def test_unsendable_header_is_refused_before_anything_is_sent(
    headers, body, raw_server, client
):
    server = await raw_server(answer_each(OK_ANSWER))
    await fetch(client, server.url("/before"))  # a pooled connection, to tempt a leak

    async def stream() -> AsyncIterator[bytes]:
        yield b"hello"

    with pytest.raises(ValueError):
        await client.request("POST", server.url("/bad"), headers, stream() if body else None, LONG)
    await fetch(client, server.url("/after"))
    # Neither a new connection nor the pooled one was spent on the refused request.
    assert len(server.connections) == 1
    assert [r.request_line for r in server.requests] == [
        "GET /before HTTP/1.1",
        "GET /after HTTP/1.1",
    ]


# --- keep-alive -----------------------------------------------------------------------------------


async def test_sequential_requests_reuse_one_connection(serve, client):
    server = await serve(echo)
    for index in range(5):
        _, body = await fetch(client, server.url(f"/{index}"), "POST", body=b"x")
        assert body == b"POST /%d x" % index
    assert len(server.peers) == 5
    assert server.connection_count == 1


async def test_sequential_requests_reuse_one_raw_connection(raw_server, client):
    server = await raw_server(answer_each(OK_ANSWER))
    for _ in range(3):
        await fetch(client, server.url())
    assert len(server.connections) == 1
    assert len(server.connections[0].requests) == 3


async def test_concurrent_requests_get_their_own_connections_and_answers(serve, client):
    async def handler(request: web.Request) -> web.StreamResponse:
        arrived.append(request.path)
        if len(arrived) == 10:
            all_arrived.set()
        await event_set(all_arrived)  # every request is in flight at once
        return web.Response(body=request.path.encode())

    arrived: list[str] = []
    all_arrived = asyncio.Event()
    server = await serve(handler)
    results = await asyncio.gather(*(fetch(client, server.url(f"/{i}")) for i in range(10)))
    assert [body for _, body in results] == [f"/{i}".encode() for i in range(10)]
    assert server.connection_count == 10
    assert len(idle_connections(client)) == 10
    await fetch(client, server.url("/after"))
    assert server.connection_count == 10  # the next request took a pooled one


@pytest.mark.parametrize(
    "answer",
    [
        http_response(200, b"fine", [("Connection", "close")]),
        b"HTTP/1.0 200 OK\r\nContent-Length: 4\r\n\r\nfine",
    ],
    ids=["connection-close", "http-1.0"],
)
async def test_response_that_ends_keep_alive_is_not_reused(answer, raw_server, client):
    # The server keeps the connection open regardless: only the client can close it.
    server = await raw_server(misbehave_once(answer_each(answer)))
    _, body = await fetch(client, server.url())
    assert body == b"fine"
    await server.connections[0].wait_closed_by_client()
    await assert_client_still_works(client, server.url())
    assert len(server.connections) == 2


async def test_response_not_read_to_the_end_is_not_reused(raw_server, client):
    async def first_with_length(connection: RawConnection) -> None:
        await connection.next_request()
        await connection.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        await connection.until_closed_by_client()

    server = await raw_server(misbehave_once(first_with_length))
    response = await client.request("GET", server.url(), [], None, LONG)
    assert response.status == 200
    chunks = response.chunks()
    assert await anext(chunks) == b"x" * 10
    await chunks.aclose()
    response.release()
    await server.connections[0].wait_closed_by_client()
    assert idle_connections(client) == []
    await assert_client_still_works(client, server.url())
    assert len(server.connections) == 2


async def test_connection_closed_by_server_while_idle_is_not_reused(raw_server, client):
    pooled = asyncio.Event()

    async def first(connection: RawConnection) -> None:
        await connection.next_request()
        await connection.send(OK_ANSWER)
        await event_set(pooled)
        # ... and the handler ends: the server closes the idle connection.

    server = await raw_server(misbehave_once(first))
    await assert_client_still_works(client, server.url())
    [idle] = idle_connections(client)
    pooled.set()
    await wait_until(lambda: idle.closed, DEADLINE_S, "the client to see the close")
    await assert_client_still_works(client, server.url())
    assert len(server.connections) == 2


async def test_bytes_arriving_on_an_idle_connection_retire_it(raw_server, client):
    pooled = asyncio.Event()

    async def first(connection: RawConnection) -> None:
        await connection.next_request()
        await connection.send(OK_ANSWER)
        await event_set(pooled)
        await connection.send(http_response(500, b"nobody asked"))
        await connection.until_closed_by_client()

    server = await raw_server(misbehave_once(first))
    await assert_client_still_works(client, server.url())
    [idle] = idle_connections(client)
    pooled.set()
    await server.connections[0].wait_closed_by_client()
    assert idle.closed
    await assert_client_still_works(client, server.url())
    assert len(server.connections) == 2


async def test_idle_connection_older_than_keepalive_is_not_reused(raw_server, make_client):
    keepalive_s = 0.2
    client = make_client(keepalive_s=keepalive_s)
    server = await raw_server(answer_each(OK_ANSWER))
    await fetch(client, server.url())
    released_at = time.monotonic()
    await wait_until(
        lambda: time.monotonic() - released_at > 2 * keepalive_s,
        DEADLINE_S,
        "the idle connection to outlive keepalive_s",
    )
    await fetch(client, server.url())
    assert len(server.connections) == 2
    await server.connections[0].wait_closed_by_client()
    assert not server.connections[1].closed_by_client.is_set()


async def test_expired_idle_connections_of_other_hosts_are_swept(raw_server, make_client):
    keepalive_s = 0.2
    client = make_client(keepalive_s=keepalive_s)
    quiet = await raw_server(answer_each(OK_ANSWER))
    busy = await raw_server(answer_each(OK_ANSWER))
    await fetch(client, quiet.url())
    released_at = time.monotonic()
    await wait_until(
        lambda: time.monotonic() - released_at > 2 * keepalive_s,
        DEADLINE_S,
        "the idle connection to outlive keepalive_s",
    )
    await fetch(client, busy.url())  # a release: the moment idle connections are swept
    await quiet.connections[0].wait_closed_by_client()
    assert len(idle_connections(client)) == 1


async def test_close_closes_idle_connections(raw_server, client):
    server = await raw_server(answer_each(OK_ANSWER))
    await fetch(client, server.url())
    await fetch(client, server.url())
    assert not server.connections[0].closed_by_client.is_set()
    await client.close()
    await server.connections[0].wait_closed_by_client()
    assert idle_connections(client) == []


async def test_connection_released_after_close_is_not_pooled(raw_server, client):
    server = await raw_server(answer_each(OK_ANSWER))
    response = await client.request("GET", server.url(), [], None, LONG)
    await client.close()
    assert await response.read() == b"fine"
    response.release()
    await server.connections[0].wait_closed_by_client()
    assert idle_connections(client) == []


# --- response framing -----------------------------------------------------------------------------


async def test_chunked_body_with_extensions_and_trailers_split_across_writes(raw_server, client):
    async def first(connection: RawConnection) -> None:
        await connection.next_request()
        pieces = [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Head: h\r\n\r\n",
            b"5;name=value\r\nhel",
            b"lo\r\n6\r",
            b"\n world\r\n",
            b"1a;ext\r\nabcdefghijklmnopqrstuvwxyz\r\n",
            b"0\r\nX-Trailer: t\r\n",
            b"\r\n",
        ]
        for piece in pieces:
            await connection.send(piece)
        await answer_each(OK_ANSWER)(connection)

    server = await raw_server(first)
    response, body = await fetch(client, server.url())
    assert body == b"hello worldabcdefghijklmnopqrstuvwxyz"
    assert response.headers["X-Head"] == "h"
    await assert_client_still_works(client, server.url())
    assert len(server.connections) == 1  # the trailers were read: the stream is in step


async def test_body_delimited_by_close(raw_server, client):
    async def first(connection: RawConnection) -> None:
        await connection.next_request()
        await connection.send(b"HTTP/1.1 200 OK\r\nX-Framing: none\r\n\r\npart one, ")
        await connection.send(b"part two")

    server = await raw_server(misbehave_once(first))
    response, body = await fetch(client, server.url())
    assert body == b"part one, part two"
    assert response.content_length is None
    await assert_client_still_works(client, server.url())
    assert len(server.connections) == 2


async def test_body_delimited_by_close_under_a_non_chunked_transfer_coding(raw_server, client):
    # RFC 9112 6.3: chunked not last among the transfer codings -> the body ends at the close.
    async def first(connection: RawConnection) -> None:
        await connection.next_request()
        await connection.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nnot really gzip")

    server = await raw_server(misbehave_once(first))
    _, body = await fetch(client, server.url())
    assert body == b"not really gzip"
    await assert_client_still_works(client, server.url())


async def test_head_response_has_no_body_and_the_connection_goes_on(raw_server, client):
    def respond(connection: RawConnection, request: RawRequest) -> bytes:
        if request.request_line.startswith("HEAD"):
            return b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
        return http_response(200, b"after head")

    server = await raw_server(answer_each(respond))
    response, body = await fetch(client, server.url(), "HEAD")
    assert (response.status, response.content_length, body) == (200, 1000, b"")
    response, body = await fetch(client, server.url())
    assert body == b"after head"
    assert len(server.connections) == 1


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
        b'HTTP/1.1 304 Not Modified\r\nETag: "e"\r\nContent-Length: 1000\r\n\r\n',
    ],
    ids=["204", "304"],
)
async def test_no_body_statuses_and_the_connection_goes_on(answer, raw_server, client):
    def respond(connection: RawConnection, request: RawRequest) -> bytes:
        return answer if request.request_line.startswith("GET /first") else OK_ANSWER

    server = await raw_server(answer_each(respond))
    response, body = await fetch(client, server.url("/first"))
    assert response.status in (204, 304)
    assert body == b""
    await assert_client_still_works(client, server.url("/second"))
    assert len(server.connections) == 1


@pytest.mark.parametrize("split", [False, True], ids=["one-write", "separate-writes"])
async def test_informational_responses_are_skipped(split, raw_server, client):
    pieces = [
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
        b"HTTP/1.1 201 Created\r\nX-Real: yes\r\nContent-Length: 4\r\n\r\nreal",
    ]

    async def first(connection: RawConnection) -> None:
        await connection.next_request()
        for piece in pieces if split else [b"".join(pieces)]:
            await connection.send(piece)
        await answer_each(OK_ANSWER)(connection)

    server = await raw_server(first)
    response, body = await fetch(client, server.url(), "POST", body=b"up")
    assert (response.status, response.reason, body) == (201, "Created", b"real")
    assert list(response.headers.items()) == [("X-Real", "yes"), ("Content-Length", "4")]
    await assert_client_still_works(client, server.url())
    assert len(server.connections) == 1


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_response_split_byte_by_byte(chunked, raw_server, client):
    if chunked:
        answer = b"HTTP/1.1 200 Fine Indeed\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n\r\n"
        answer += b"4;x=y\r\nfine\r\n3\r\n!!!\r\n0\r\nX-T: 1\r\n\r\n"
    else:
        answer = http_response(200, b"fine!!!", [("X-A", "b")], reason="Fine Indeed")

    async def first(connection: RawConnection) -> None:
        await connection.next_request()
        connection.writer.transport.get_extra_info("socket").setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
        )
        for index in range(len(answer)):
            await connection.send(answer[index : index + 1])
            await asyncio.sleep(0)  # pacing: let the client read each byte on its own
        await answer_each(OK_ANSWER)(connection)

    server = await raw_server(first)
    response, body = await fetch(client, server.url())
    assert (response.status, response.reason, body) == (200, "Fine Indeed", b"fine!!!")
    assert response.headers["X-A"] == "b"
    await assert_client_still_works(client, server.url())
    assert len(server.connections) == 1


async def test_second_response_in_the_same_read_does_not_replace_the_first(raw_server, client):
    async def first(connection: RawConnection) -> None:
        await connection.next_request()
        await connection.send(
            http_response(200, b"ok", [("X-First", "1")])
            + http_response(500, b"", [("X-Second", "1")], reason="Unasked")
        )
        await answer_each(OK_ANSWER)(connection)

    server = await raw_server(misbehave_once(first))
    response, body = await fetch(client, server.url())
    assert (response.status, response.reason, body) == (200, "OK", b"ok")
    assert "X-Second" not in response.headers
    assert response.headers.getall("Content-Length") == ["2"]
    # The stream is out of step: the connection is not used again.
    await server.connections[0].wait_closed_by_client()
    await assert_client_still_works(client, server.url())
    assert len(server.connections) == 2


# --- streaming ------------------------------------------------------------------------------------


async def test_headers_and_body_parts_arrive_as_they_are_sent(serve, client):
    first_part_seen = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"X-Stream": "yes"})
        await response.prepare(request)
        await event_set(headers_seen)
        await response.write(b"part one")
        await event_set(first_part_seen)
        await response.write(b"part two")
        await response.write_eof()
        return response

    headers_seen = asyncio.Event()
    server = await serve(handler)
    async with await client.request("GET", server.url(), [], None, LONG) as response:
        # Neither waits for the rest: each would deadlock the handler if it did.
        assert response.headers["X-Stream"] == "yes"
        headers_seen.set()
        chunks = response.chunks()
        assert await asyncio.wait_for(anext(chunks), DEADLINE_S) == b"part one"
        first_part_seen.set()
        assert b"".join([chunk async for chunk in chunks]) == b"part two"


def socket_buffer_ceiling() -> int:
    """The most the kernel may hold for one loopback connection, both ends together."""
    total = 0
    for name in ("tcp_rmem", "tcp_wmem"):
        try:
            total += int(Path(f"/proc/sys/net/ipv4/{name}").read_text().split()[2])
        except (OSError, ValueError, IndexError):
            total += 16 * MIB
    return total


@functools.lru_cache(maxsize=1)
def large_body(size: int) -> bytes:
    return random.Random(size).randbytes(size)


class Firehose(asyncio.Protocol):
    """Answers one request with a large body, written only while the transport asks for more."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.sent = 0
        self.paused = False
        self.transport: asyncio.Transport | None = None
        self._head = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._head += data
        if self.sent == 0 and b"\r\n\r\n" in self._head:
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(self.body))
            self._pump()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._pump()

    def _pump(self) -> None:
        assert self.transport is not None
        while not self.paused and self.sent < len(self.body):
            piece = self.body[self.sent : self.sent + 256 * 1024]
            self.sent += len(piece)
            self.transport.write(piece)

    @property
    def done(self) -> bool:
        return self.sent == len(self.body)


async def test_slowly_read_large_response_is_not_buffered(client):
    """While the caller reads nothing, the client stops reading the socket once a bounded
    amount is buffered, and TCP holds the server back: the body does not pile up in memory."""
    size = max(20 * MIB, socket_buffer_ceiling() + 8 * MIB)
    body = large_body(size)
    bound = 4 * _HIGH_WATER_BYTES
    firehoses: list[Firehose] = []

    def factory() -> Firehose:
        firehoses.append(Firehose(body))
        return firehoses[-1]

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    response: UpstreamResponse | None = None
    try:
        response = await client.request("GET", URL(f"http://127.0.0.1:{port}/"), [], None, LONG)
        connection = connection_of(response)
        transport = connection.transport
        assert transport is not None
        [firehose] = firehoses

        def held_back() -> bool:
            # The client no longer reads and the server can no longer write: a steady state
            # only flow control reaches. Without it the server would run on to the end.
            return (not transport.is_reading() and firehose.paused) or firehose.done

        await wait_until(held_back, DEADLINE_S, "the server to be held back")
        assert not firehose.done
        assert connection._buffered_bytes <= bound
        digest, received, most_buffered = hashlib.sha256(), 0, 0
        async for chunk in response.chunks():
            digest.update(chunk)
            received += len(chunk)
            most_buffered = max(most_buffered, connection._buffered_bytes)
            if received >= size // 2 and received - len(chunk) < size // 2:
                # Halfway, stop reading again until the server is held back once more (or,
                # if the kernel could hold all the rest, has sent it all).
                await wait_until(held_back, DEADLINE_S, "the server to be held back again")
                assert connection._buffered_bytes <= bound
        assert received == size
        assert digest.digest() == hashlib.sha256(body).digest()
        assert most_buffered <= bound
    finally:
        if response is not None:
            response.release()
        for firehose in firehoses:
            if firehose.transport is not None:
                firehose.transport.close()
        server.close()
        await server.wait_closed()


async def test_large_unread_response_whose_end_paused_reading_does_not_stall_the_next(
    raw_server, client
):
    """The read that completes a response may be the one that pauses reading; left unread and
    pooled, such a connection must still read the next response."""
    tail_sent = asyncio.Event()

    async def first(connection: RawConnection) -> None:
        await connection.next_request()
        length = _HIGH_WATER_BYTES + 10
        await connection.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % length)
        await connection.send(b"a" * _HIGH_WATER_BYTES)  # exactly the high-water mark
        await event_set(head_buffered)
        await connection.send(b"b" * 10)  # one small read: over the mark and complete
        tail_sent.set()
        await answer_each(OK_ANSWER)(connection)

    head_buffered = asyncio.Event()
    server = await raw_server(first)
    response = await client.request("GET", server.url(), [], None, LONG)
    connection = connection_of(response)
    await wait_until(
        lambda: connection._buffered_bytes == _HIGH_WATER_BYTES, DEADLINE_S, "the first part"
    )
    head_buffered.set()
    await wait_until(lambda: connection.complete, DEADLINE_S, "the response to complete")
    response.release()  # unread
    await assert_client_still_works(client, server.url())


async def test_streamed_request_body_goes_chunked(raw_server, client):
    server = await raw_server(answer_each(OK_ANSWER))

    async def body() -> AsyncIterator[bytes]:
        yield b"abc"
        yield b""  # an empty piece must not end the chunked body early
        yield b"defghijklmnopqrstu"

    await fetch(client, server.url("/up"), "POST", [("X-A", "1")], body())
    await assert_client_still_works(client, server.url())
    first = server.requests[0]
    assert first.header_values("Transfer-Encoding") == ["chunked"]
    assert first.header_values("Content-Length") == []
    assert first.wire_body == b"3\r\nabc\r\n12\r\ndefghijklmnopqrstu\r\n0\r\n\r\n"
    assert len(server.connections) == 1


async def test_streamed_request_body_with_callers_length_goes_raw(raw_server, client):
    server = await raw_server(answer_each(OK_ANSWER))

    async def body() -> AsyncIterator[bytes]:
        yield b"abc"
        yield b"defg"

    await fetch(client, server.url(), "PUT", [("Content-Length", "7")], body())
    await assert_client_still_works(client, server.url())
    first = server.requests[0]
    assert first.header_values("Content-Length") == ["7"]
    assert first.header_values("Transfer-Encoding") == []
    assert first.wire_body == b"abcdefg"
    assert len(server.connections) == 1


async def test_streamed_request_body_is_sent_as_it_is_produced(serve, client):
    first_part_arrived = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        received = await request.content.readexactly(len(b"part one"))
        first_part_arrived.set()
        received += await request.content.read()
        return web.Response(body=received)

    async def body() -> AsyncIterator[bytes]:
        yield b"part one"
        await event_set(first_part_arrived)  # deadlocks if the client held the part back
        yield b"part two"

    server = await serve(handler)
    _, received = await fetch(client, server.url(), "POST", body=body())
    assert received == b"part onepart two"


async def test_large_streamed_upload_to_a_slow_reader_is_flow_controlled(serve, client):
    size, piece = 50 * MIB, MIB

    async def handler(request: web.Request) -> web.StreamResponse:
        digest, received = hashlib.sha256(), 0
        while data := await request.content.read(16 * 1024):  # small reads: a slow reader
            digest.update(data)
            received += len(data)
        return web.Response(text=f"{received} {digest.hexdigest()}")

    server = await serve(handler)
    await fetch(client, server.url("/warm-up"))
    [connection] = idle_connections(client)  # the upload will take this one
    assert connection.transport is not None
    transport = connection.transport
    sent_digest, write_buffer_sizes = hashlib.sha256(), []

    async def body() -> AsyncIterator[bytes]:
        for index in range(size // piece):
            # The client asks for the next piece only once the last has (mostly) gone out.
            write_buffer_sizes.append(transport.get_write_buffer_size())
            data = large_body(size)[index * piece : (index + 1) * piece]
            sent_digest.update(data)
            yield data

    _, answer = await fetch(client, server.url("/up"), "POST", body=body())
    assert answer == f"{size} {sent_digest.hexdigest()}".encode()
    assert len(write_buffer_sizes) == size // piece
    assert max(write_buffer_sizes) <= piece
    assert server.connection_count == 1


async def test_slow_streamed_upload_does_not_count_against_the_read_timeout(serve, client):
    read_s = 1.0
    first_part_arrived = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        received = await request.content.readexactly(len(b"part one"))
        first_part_arrived.set()
        received += await request.content.read()
        return web.Response(body=received)

    async def body() -> AsyncIterator[bytes]:
        yield b"part one"
        await event_set(first_part_arrived)
        began = time.monotonic()
        await wait_until(
            lambda: time.monotonic() - began > 1.5 * read_s, DEADLINE_S, "the upload to drag on"
        )
        yield b"part two"

    server = await serve(handler)
    timeouts = Timeouts(connect_s=DEADLINE_S, read_s=read_s, total_s=3 * DEADLINE_S)
    response, received = await fetch(client, server.url(), "POST", body=body(), timeouts=timeouts)
    assert (response.status, received) == (200, b"part onepart two")


async def test_read_timeout_starts_once_a_streamed_upload_is_sent(raw_server, client):
    async def first(connection: RawConnection) -> None:
        await connection.next_request()
        await connection.until_closed_by_client()  # the whole body read, and no answer

    async def body() -> AsyncIterator[bytes]:
        yield b"all of it"

    server = await raw_server(misbehave_once(first))
    timeouts = Timeouts(connect_s=DEADLINE_S, read_s=SHORT_READ_S, total_s=None)
    with pytest.raises(UpstreamTimeoutError):
        await client.request("POST", server.url(), [], body(), timeouts)
    await server.connections[0].wait_closed_by_client()
    assert server.requests[0].body == b"all of it"
    await assert_client_still_works(client, server.url())


async def test_total_timeout_bounds_a_stalled_streamed_upload(raw_server, client):
    never = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"the start"
        await never.wait()  # the caller's source stalls: only total_s can end this
        yield b"never sent"

    async def first(connection: RawConnection) -> None:
        await connection.reader.readuntil(b"\r\n\r\n")
        await connection.until_closed_by_client()

    server = await raw_server(misbehave_once(first))
    timeouts = Timeouts(connect_s=DEADLINE_S, read_s=DEADLINE_S, total_s=SHORT_READ_S)
    with pytest.raises(UpstreamTimeoutError):
        async with asyncio.timeout(DEADLINE_S):  # were total_s ignored, this would never end
            await client.request("POST", server.url(), [], body(), timeouts)
    await server.connections[0].wait_closed_by_client()
    await assert_client_still_works(client, server.url())


async def test_failing_request_body_source_breaks_the_request(raw_server, client):
    async def body() -> AsyncIterator[bytes]:
        yield b"the start"
        raise RuntimeError("the caller's client went away")

    async def first(connection: RawConnection) -> None:
        await connection.reader.readuntil(b"\r\n\r\n")
        await connection.until_closed_by_client()

    server = await raw_server(misbehave_once(first))
    with pytest.raises(UpstreamDisconnectedError, match="request body broke off"):
        await client.request("POST", server.url(), [], body(), LONG)
    await server.connections[0].wait_closed_by_client()
    await assert_client_still_works(client, server.url())


async def test_server_gone_mid_upload_breaks_the_request_and_stops_the_body(raw_server, client):
    pieces = 1000
    pulled = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal pulled
        for _ in range(pieces):
            pulled += 1
            yield b"u" * MIB

    async def first(connection: RawConnection) -> None:
        await connection.reader.readuntil(b"\r\n\r\n")
        await connection.reader.readexactly(MIB // 2)
        reset_connection(connection.writer)

    server = await raw_server(misbehave_once(first))
    with pytest.raises(UpstreamDisconnectedError):
        await client.request("POST", server.url(), [], body(), LONG)
    assert pulled < pieces  # the rest of the body was not pulled from its source
    await assert_client_still_works(client, server.url())


async def test_early_response_during_a_streamed_upload(raw_server, client):
    body_ended = asyncio.Event()
    ending: list[BaseException | None] = []
    never = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        try:
            yield b"a" * 1000
            await never.wait()  # more would come, but the server has answered already
            yield b"never sent"
        except BaseException as exc:
            ending.append(exc)
            raise
        finally:
            body_ended.set()

    async def first(connection: RawConnection) -> None:
        await connection.reader.readuntil(b"\r\n\r\n")
        await connection.reader.readexactly(100)
        await connection.send(http_response(413, b"too large", reason="Payload Too Large"))
        await connection.until_closed_by_client()

    server = await raw_server(misbehave_once(first))
    response, answer = await fetch(client, server.url(), "POST", body=body())
    assert (response.status, response.reason, answer) == (413, "Payload Too Large", b"too large")
    await event_set(body_ended)
    assert len(ending) == 1 and isinstance(ending[0], asyncio.CancelledError | GeneratorExit)
    await server.connections[0].wait_closed_by_client()
    await assert_client_still_works(client, server.url())
    assert len(server.connections) == 2


# --- errors ---------------------------------------------------------------------------------------


async def test_refused_connection(raw_server, client):
    # Bound but not listening: connections are refused, and no one else can take the port.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as bound:
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        with pytest.raises(UpstreamConnectError, match="cannot connect"):
            await client.request("GET", URL(f"http://127.0.0.1:{port}/"), [], None, LONG)
    server = await raw_server(answer_each(OK_ANSWER))
    await assert_client_still_works(client, server.url())


async def test_unknown_host(raw_server, client):
    with pytest.raises(UpstreamConnectError):
        await client.request("GET", URL("http://no-such-host.invalid/"), [], None, LONG)
    server = await raw_server(answer_each(OK_ANSWER))
    await assert_client_still_works(client, server.url())


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="relies on Linux dropping SYNs to a full queue"
)
@pytest.mark.parametrize("limit", ["connect_s", "total_s"])
async def test_connect_timeout(limit, raw_server, client):
    # A listener with a backlog of 0 that never accepts: once one connection waits in its
    # queue, Linux drops further SYNs, so a connect can only time out.
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        filler.setblocking(False)
        filler.connect_ex(listener.getsockname())
        await wait_until(
            lambda: select.select([], [filler], [], 0)[1], DEADLINE_S, "the queue to fill"
        )
        assert filler.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        # Whichever limit is under test, the other is an hour: were it the one applied, the
        # deadline around the request would expire instead.
        timeouts = (
            Timeouts(connect_s=SHORT_READ_S, read_s=3600, total_s=3600)
            if limit == "connect_s"
            else Timeouts(connect_s=3600, read_s=3600, total_s=SHORT_READ_S)
        )
        url = URL(f"http://127.0.0.1:{listener.getsockname()[1]}/")
        with pytest.raises(UpstreamConnectError, match="timed out"):
            async with asyncio.timeout(DEADLINE_S):
                await client.request("GET", url, [], None, timeouts)
    server = await raw_server(answer_each(OK_ANSWER))
    await assert_client_still_works(client, server.url())


@pytest.mark.parametrize("how", ["close", "reset", "close-before-reading"])
async def test_connection_ends_before_any_response(how, raw_server, client):
    async def first(connection: RawConnection) -> None:
        if how != "close-before-reading":
            await connection.next_request()
        if how == "reset":
            reset_connection(connection.writer)

    server = await raw_server(misbehave_once(first))
    with pytest.raises(UpstreamDisconnectedError):
        await client.request("GET", server.url(), [], None, LONG)
    await assert_client_still_works(client, server.url())


@pytest.mark.parametrize(
    "garbage",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: twelve\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header Line\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
    ids=["ssh", "tls", "status", "content-length", "header", "chunk-size"],
)
async def test_garbage_instead_of_http(garbage, raw_server, client):
    async def first(connection: RawConnection) -> None:
        await connection.next_request()
        await connection.send(garbage)
        await connection.until_closed_by_client()  # no close from here: the parser must object

    server = await raw_server(misbehave_once(first))
    with pytest.raises(UpstreamDisconnectedError):
        response = await client.request("GET", server.url(), [], None, LONG)
        try:
            await response.read()
        finally:
            response.release()
    await server.connections[0].wait_closed_by_client()
    await assert_client_still_works(client, server.url())


async def test_switching_protocols_is_refused(raw_server, client):
    async def first(connection: RawConnection) -> None:
        await connection.next_request()
        await connection.send(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        )
        await connection.until_closed_by_client()

    server = await raw_server(misbehave_once(first))
    with pytest.raises(UpstreamDisconnectedError, match="switched protocols"):
        await client.request("GET", server.url(), [("Upgrade", "websocket")], None, LONG)
    await server.connections[0].wait_closed_by_client()
    await assert_client_still_works(client, server.url())


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        (b"HTTP/1.1 600 Beyond\r\nContent-Length: 2\r\n\r\nhi", "status 600 is outside"),
        (b"HTTP/1.1 999 Beyond\r\nContent-Length: 2\r\n\r\nhi", "status 999 is outside"),
        (b"HTTP/1.1 099 Below\r\nContent-Length: 2\r\n\r\nhi", "status 099 is outside"),
        (b"HTTP/1.1 000 None\r\nContent-Length: 2\r\n\r\nhi", "status 000 is outside"),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "switched protocols"),
        (b"HTTP/1.1 100 Continue\r\nContent-Length: 0\r\n\r\n", "framed like a final"),
        (b"HTTP/1.1 102 Processing\r\nContent-Length: 2\r\n\r\nhi", "framed like a final"),
        (b"HTTP/1.1 103 Hints\r\nTransfer-Encoding: chunked\r\n\r\n", "framed like a final"),
    ],
    ids=["600", "999", "099", "000", "101-without-upgrade", "100-final", "102-body", "103-te"],
)
async def test_status_no_final_response_may_have_fails_at_once(answer, said, raw_server, client):
    """The server then waits for our next request: only the status itself can end the wait,
    which otherwise lasts the read timeout (or, for 000, is taken for a body that never ends)."""

    async def first(connection: RawConnection) -> None:
        await connection.next_request()
        await connection.send(answer)
        await connection.until_closed_by_client()  # no close from here: the client must object

    server = await raw_server(misbehave_once(first))
    with pytest.raises(UpstreamInvalidResponseError, match=said):
        async with await client.request("GET", server.url(), [], None, LONG) as response:
            await response.read()
    await server.connections[0].wait_closed_by_client()
    await assert_client_still_works(client, server.url())


@pytest.mark.parametrize("size", [1000, 4 * MIB], ids=["small", "beyond-high-water"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_connection_closed_mid_body(size, framing, raw_server, client):
    sent = large_body(4 * MIB)[: size // 2]

    async def first(connection: RawConnection) -> None:
        await connection.next_request()
        if framing == "chunked":
            head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % size
        else:
            head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size
        await connection.send(head + sent)

    server = await raw_server(misbehave_once(first))
    received = bytearray()
    async with await client.request("GET", server.url(), [], None, LONG) as response:
        with pytest.raises(UpstreamDisconnectedError):
            async for chunk in response.chunks():
                received += chunk
    assert bytes(received) == sent  # what did come is handed over before the error
    await assert_client_still_works(client, server.url())


@pytest.mark.parametrize("limit", ["read_s", "total_s"])
async def test_no_answer_times_out_and_a_late_answer_is_not_taken_for_the_next(
    limit, raw_server, client
):
    timed_out = asyncio.Event()

    async def first(connection: RawConnection) -> None:
        await connection.next_request()
        await event_set(timed_out)
        with contextlib.suppress(ConnectionError):
            await connection.send(http_response(200, b"stale"))
        await connection.until_closed_by_client()

    server = await raw_server(misbehave_once(first))
    timeouts = (
        Timeouts(connect_s=DEADLINE_S, read_s=SHORT_READ_S, total_s=None)
        if limit == "read_s"
        else Timeouts(connect_s=DEADLINE_S, read_s=DEADLINE_S, total_s=SHORT_READ_S)
    )
    with pytest.raises(UpstreamTimeoutError) as raised:
        await client.request("GET", server.url(), [], None, timeouts)
    assert isinstance(raised.value, TimeoutError)
    assert isinstance(raised.value, UpstreamError)
    timed_out.set()
    await server.connections[0].wait_closed_by_client()
    await assert_client_still_works(client, server.url())


async def test_body_that_stalls_times_out(raw_server, client):
    async def first(connection: RawConnection) -> None:
        await connection.next_request()
        await connection.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nthe start")
        await connection.until_closed_by_client()

    server = await raw_server(misbehave_once(first))
    timeouts = Timeouts(connect_s=DEADLINE_S, read_s=SHORT_READ_S, total_s=None)
    received = bytearray()
    async with (
        asyncio.timeout(DEADLINE_S),  # were read_s ignored, this would wait for ever
        await client.request("GET", server.url(), [], None, timeouts) as response,
    ):
        with pytest.raises(UpstreamTimeoutError):
            async for chunk in response.chunks():
                received += chunk
        # The connection is given up at once, not only when the response is released ...
        await server.connections[0].wait_closed_by_client()
        # ... and the error stays: asking again does not pretend the body ended.
        with pytest.raises(UpstreamTimeoutError):
            await response.read()
    assert bytes(received) == b"the start"
    await assert_client_still_works(client, server.url())


async def test_total_timeout_cuts_a_body_that_keeps_dripping(raw_server, client):
    async def first(connection: RawConnection) -> None:
        await connection.next_request()
        watching = asyncio.ensure_future(connection.until_closed_by_client())
        try:
            drop = b"1\r\n.\r\n"
            await connection.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + drop)
            while not watching.done():  # a byte every 50 ms until the client goes
                await asyncio.sleep(0.05)
                await connection.send(drop)
        finally:
            watching.cancel()

    server = await raw_server(misbehave_once(first))
    # read_s alone would never expire; only the total can end this.
    timeouts = Timeouts(connect_s=DEADLINE_S, read_s=DEADLINE_S, total_s=0.5)
    received = bytearray()
    async with (
        asyncio.timeout(DEADLINE_S),  # were total_s ignored, this would drip on for ever
        await client.request("GET", server.url(), [], None, timeouts) as response,
    ):
        with pytest.raises(UpstreamTimeoutError):
            async for chunk in response.chunks():
                received += chunk
    assert received and set(received) == {ord(".")}
    await server.connections[0].wait_closed_by_client()
    await assert_client_still_works(client, server.url())


async def test_read_timeout_is_per_wait_not_for_the_whole_body(serve, client):
    read_s = 1.5
    parts = 5
    go_on = [asyncio.Event() for _ in range(parts)]

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for index in range(parts):
            await response.write(b"%d" % index)
            await event_set(go_on[index])
        await response.write_eof()
        return response

    server = await serve(handler)
    timeouts = Timeouts(connect_s=DEADLINE_S, read_s=read_s, total_s=None)
    began = time.monotonic()
    received = bytearray()
    async with await client.request("GET", server.url(), [], None, timeouts) as response:
        async for chunk in response.chunks():
            received += chunk
            index = len(received) - 1
            if index < parts:
                # Each gap well inside read_s; all of them together well beyond it.
                await wait_until(
                    lambda index=index: time.monotonic() - began > (index + 1) * read_s / 4,
                    DEADLINE_S,
                    "a gap",
                )
                go_on[index].set()
    assert bytes(received) == b"01234"
    assert time.monotonic() - began > read_s  # the premise, not a speed limit


# --- https ----------------------------------------------------------------------------------------


def make_self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    try:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        pass
    else:
        private_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(private_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .sign(private_key, hashes.SHA256())
        )
        cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        key.write_bytes(
            private_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert, key
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("neither the cryptography package nor the openssl command is available")
    completed = subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    if completed.returncode != 0:
        pytest.skip(f"openssl could not make a certificate: {completed.stderr.decode()[-500:]}")
    return cert, key


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_self_signed_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
async def https_server(certificate, serve) -> AppServer:
    cert, key = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    return await serve(echo, ssl_context=server_context)


async def test_https_with_a_trusted_certificate(certificate, https_server, make_client):
    cert, _ = certificate
    client = make_client(ssl_context=ssl.create_default_context(cafile=str(cert)))
    assert https_server.url().scheme == "https"
    for index in range(2):
        response, body = await fetch(client, https_server.url(f"/{index}"), "POST", body=b"tls")
        assert (response.status, body) == (200, b"POST /%d tls" % index)
    assert https_server.connection_count == 1


async def test_https_with_an_untrusted_certificate(certificate, https_server, make_client):
    cert, _ = certificate
    with pytest.raises(UpstreamConnectError):
        await make_client().request("GET", https_server.url(), [], None, LONG)
    assert https_server.peers == []
    # A client that trusts the certificate gets through to the same server.
    client = make_client(ssl_context=ssl.create_default_context(cafile=str(cert)))
    _, body = await fetch(client, https_server.url("/t"))
    assert body == b"GET /t "


# --- checking where a request goes (allow_peer) ---------------------------------------------------


class Addresses:
    """An allow_peer that notes every address it is asked about and allows what it is told."""

    def __init__(self, allow: bool = True) -> None:
        self.allow = allow
        self.seen: list[str] = []

    def __call__(self, address: str) -> bool:
        self.seen.append(address)
        return self.allow


async def checked(client: UpstreamClient, url: URL, addresses: Addresses) -> bytes:
    async with await client.request("GET", url, [], None, LONG, allow_peer=addresses) as response:
        return await response.read()


async def test_allow_peer_is_asked_about_the_address_dialed_before_connecting(raw_server, client):
    server = await raw_server(answer_each(OK_ANSWER))
    # "0" resolves to 0.0.0.0, which connects to this host: a socket connected so reports
    # 127.0.0.1 as its peer, so only the address dialed shows where the request went.
    url = URL(f"http://0:{server.port}/")
    refusing = Addresses(allow=False)
    with pytest.raises(UpstreamRefusedError, match=r"0\.0\.0\.0"):
        await checked(client, url, refusing)
    assert refusing.seen == ["0.0.0.0"]
    assert server.connections == []  # refused before connecting

    allowing = Addresses()
    assert await checked(client, url, allowing) == b"fine"
    assert await checked(client, url, allowing) == b"fine"  # kept alive, and asked again
    assert allowing.seen == ["0.0.0.0", "0.0.0.0"]
    assert len(server.connections) == 1
    with pytest.raises(UpstreamRefusedError):
        await checked(client, url, refusing)
    assert idle_connections(client) == []  # the kept-alive connection is dropped


async def test_unchecked_connections_are_not_lent_to_checked_requests(raw_server, client):
    server = await raw_server(answer_each(OK_ANSWER))
    await assert_client_still_works(client, server.url())
    addresses = Addresses()
    assert await checked(client, server.url(), addresses) == b"fine"
    assert addresses.seen == ["127.0.0.1"]
    assert len(server.connections) == 2
    await assert_client_still_works(client, server.url())  # either pooled one will do
    assert len(server.connections) == 2


async def test_checked_https_request_connects_by_address_with_the_certificate_checked(
    certificate, https_server, make_client
):
    cert, _ = certificate
    with pytest.raises(UpstreamConnectError):
        await checked(make_client(), https_server.url(), Addresses())  # an untrusted certificate
    client = make_client(ssl_context=ssl.create_default_context(cafile=str(cert)))
    url = URL(f"https://localhost:{https_server.server.port}/tls")
    addresses = Addresses()
    assert await checked(client, url, addresses) == b"GET /tls "
    assert "127.0.0.1" in addresses.seen


# --- the keep-alive race ----------------------------------------------------------------------


def closes_kept_alive_connection_on_second_request() -> RawHandler:
    """First connection: answers one request, then takes the next and closes without a word,
    as a server does that closes an idle keep-alive connection just as a request arrives.
    Later connections answer normally."""
    ordinary = answer_each(OK_ANSWER)

    async def handler(connection: RawConnection) -> None:
        if connection.index > 0:
            await ordinary(connection)
            return
        await connection.next_request()
        await connection.send(OK_ANSWER)
        await connection.next_request()

    return handler


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE"])
async def test_idempotent_request_lost_on_a_kept_alive_connection_is_sent_again(
    method, raw_server, client
):
    server = await raw_server(closes_kept_alive_connection_on_second_request())
    await fetch(client, server.url())
    response, _ = await fetch(client, server.url("/again"), method)
    assert response.status == 200
    assert len(server.connections) == 2
    assert server.connections[1].requests[0].request_line == f"{method} /again HTTP/1.1"


async def test_post_lost_on_a_kept_alive_connection_is_not_sent_again(raw_server, client):
    server = await raw_server(closes_kept_alive_connection_on_second_request())
    await fetch(client, server.url())
    with pytest.raises(UpstreamDisconnectedError):
        await fetch(client, server.url("/again"), "POST", body=b"once")
    assert len(server.connections) == 1  # no second attempt anywhere
    await assert_client_still_works(client, server.url())


async def test_request_lost_on_a_new_connection_is_not_sent_again(raw_server, client):
    async def takes_and_closes(connection: RawConnection) -> None:
        await connection.next_request()

    server = await raw_server(takes_and_closes)
    with pytest.raises(UpstreamDisconnectedError):
        await fetch(client, server.url())
    assert len(server.connections) == 1
