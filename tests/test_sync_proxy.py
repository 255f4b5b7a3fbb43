"""The synchronous proxy route /function/{name}: what goes upstream, what comes back, and how
it fails. Every upstream is a real aiohttp server (or, where a server has to misbehave at the
socket level, a real TCP server); streaming is proven by handshakes, never by timing."""

import asyncio
import contextlib
import gzip
import hashlib
import logging
import random
import socket
import struct
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from tests.conftest import RunningGateway
from tests.harness import RecordedRequest, free_port, registry_of, wait_until

DEADLINE_S = 30.0
MIB = 1024 * 1024
# Gateway-wide upstream limits far beyond any deadline here, so a 504 can only come from the
# function's own exec_timeout.
LONG_GATEWAY_LIMITS = {"upstream_timeout_s": 600.0, "read_timeout_s": 600.0}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# --- helpers ------------------------------------------------------------------------------------


def raw_url(gateway: RunningGateway, raw_path_and_query: str) -> URL:
    """A gateway URL sent exactly as written: no requoting of %-escapes by the client."""
    return URL(
        f"http://{gateway.server.host}:{gateway.server.port}{raw_path_and_query}", encoded=True
    )


def gateway_netloc(gateway: RunningGateway) -> str:
    return f"{gateway.server.host}:{gateway.server.port}"


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """``url = await serve(handler, **server_options)``: an aiohttp app answering every method
    and path; ``server_options`` go to aiohttp's request handler (e.g. auto_decompress)."""
    servers: list[TestServer] = []

    async def start(handler: Handler, **server_options: Any) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server(**server_options)
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


@contextlib.asynccontextmanager
async def raw_tcp_server(
    on_connection: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[str]:
    """A plain TCP server, for upstreams that must break HTTP in ways aiohttp will not."""
    server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


def reset_connection(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0, so the peer gets a TCP RST rather than an orderly FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def chunk_of(index: int, size: int = MIB) -> bytes:
    """Deterministic, incompressible chunk ``index`` of a large body."""
    return random.Random(index).randbytes(size)


def metric_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (sample.name, dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def metric_value(text: str, name: str, **labels: str) -> float | None:
    for sample_name, sample_labels, value in metric_samples(text):
        if sample_name == name and sample_labels == labels:
            return value
    return None


async def metrics_text(http: aiohttp.ClientSession, gateway: RunningGateway) -> str:
    async with http.get(gateway.url("/metrics")) as response:
        assert response.status == 200
        return await response.text()


async def echo_responder(request: web.Request, recorded: RecordedRequest) -> web.StreamResponse:
    return web.Response(
        status=200,
        body=b"echo:" + recorded.body,
        headers={"X-Upstream": "yes", "Content-Type": "application/octet-stream"},
    )


def assert_uuid(value: str) -> None:
    """A generated call id: a version 4 UUID as 32 lower-case hex characters."""
    assert uuid.UUID(value).hex == value
    assert uuid.UUID(value).version == 4


async def assert_json_error(response: aiohttp.ClientResponse, status: int) -> dict[str, Any]:
    assert response.status == status
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"error", "callId"}
    assert isinstance(body["error"], str)
    assert body["error"]
    assert body["callId"] == response.headers["X-Call-Id"]
    assert "X-Start-Time" in response.headers
    assert "X-Duration-Seconds" in response.headers
    return dict(body)


# --- what goes upstream ---------------------------------------------------------------------------

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


@pytest.mark.parametrize("method", METHODS)
async def test_every_method_forwards_path_query_headers_and_body(
    method, recorder, start_gateway, http
):
    function = await recorder(echo_responder)
    gateway = await start_gateway(registry_of(echo=function.url))
    body = f"payload for {method}".encode()
    headers = CIMultiDict(
        [
            ("Content-Type", "application/x-custom"),
            ("X-Custom", "custom value"),
            ("X-Multi", "one"),
            ("X-Multi", "two"),
            ("Authorization", "Bearer secret-token"),
        ]
    )

    async with http.request(
        method,
        raw_url(gateway, "/function/echo/a%2Fb/c%20d/%E2%9C%93;p=1?q=%41%20b&x=1&x=2&empty=&flag"),
        data=body,
        headers=headers,
    ) as response:
        assert response.status == 200
        assert response.headers["X-Upstream"] == "yes"
        received = await response.read()

    [upstream] = function.requests
    assert upstream.method == method
    assert upstream.path == "/a%2Fb/c%20d/%E2%9C%93;p=1"
    assert upstream.query_string == "q=%41%20b&x=1&x=2&empty=&flag"
    assert upstream.body == body
    assert upstream.headers["Content-Type"] == "application/x-custom"
    assert upstream.headers["X-Custom"] == "custom value"
    assert upstream.headers.getall("X-Multi") == ["one", "two"]
    assert upstream.headers["Authorization"] == "Bearer secret-token"
    assert upstream.headers["X-Forwarded-For"] == "127.0.0.1"
    assert upstream.headers["X-Forwarded-Host"] == gateway_netloc(gateway)
    # Host names the function, not the gateway.
    assert upstream.headers["Host"] == URL(function.url).raw_authority
    if method == "HEAD":
        assert received == b""
        assert response.headers["Content-Length"] == str(len(b"echo:" + body))
    else:
        assert received == b"echo:" + body


@pytest.mark.parametrize(
    ("path", "upstream_path", "upstream_query"),
    [
        ("/function/echo", "/", ""),
        ("/function/echo/", "/", ""),
        ("/function/echo?x=1", "/", "x=1"),
        ("/function/echo/?x=%2F", "/", "x=%2F"),
        ("/function/echo/deep/er/", "/deep/er/", ""),
        ("/function/echo/%7Euser/a+b", "/%7Euser/a+b", ""),
    ],
)
async def test_subpath_variants(path, upstream_path, upstream_query, recorder, start_gateway, http):
    function = await recorder()
    gateway = await start_gateway(registry_of(echo=function.url))

    async with http.get(raw_url(gateway, path)) as response:
        assert response.status == 200
        assert await response.read() == b"ok"

    [upstream] = function.requests
    assert upstream.path == upstream_path
    assert upstream.query_string == upstream_query


DOT_SEGMENT_PATHS = [
    "/function/echo/..",
    "/function/echo/.",
    "/function/echo/../admin",
    "/function/echo/./x",
    "/function/echo/a/../../admin",
    "/function/echo//../admin",
    "/function/echo/%2e%2e/admin",
    "/function/echo/%2E%2e/admin",
    "/function/echo/.%2e/admin",
    "/function/echo/%2e./admin",
    "/function/echo/%2e/admin",
    "/function/echo/..%2fadmin",
    "/function/echo/..%2Fadmin",
    "/function/echo/a%2f..%2f..%2fadmin",
    "/function/echo/..%5cadmin",
    "/function/echo/..\\admin",
    "/function/echo/..;x=1/admin",
    "/function/echo/a/..?q=1",
]


@pytest.mark.parametrize("path", DOT_SEGMENT_PATHS)
async def test_dot_segments_after_the_function_name_are_400(path, recorder, start_gateway, http):
    """The function's base path is a boundary: /function/echo/../admin must not reach
    <base>/../admin, which the function's server (or a proxy in front of it) would resolve to
    /admin. Sent on the raw socket's terms: nothing between the test and the gateway
    normalises the path."""
    function = await recorder()
    gateway = await start_gateway(registry_of(echo=function.url + "/base"))

    async with http.get(raw_url(gateway, path)) as response:
        body = await assert_json_error(response, 400)
    assert "'..'" in body["error"]
    assert function.requests == []


@pytest.mark.parametrize(
    "path", ["/a..b", "/...", "/.well-known/x", "/..a/b.", "/%252e%252e/x", "/f.txt;v=1"]
)
async def test_dots_that_are_not_whole_segments_pass(path, recorder, start_gateway, http):
    function = await recorder()
    gateway = await start_gateway(registry_of(echo=function.url + "/base"))

    async with http.get(raw_url(gateway, "/function/echo" + path)) as response:
        assert response.status == 200
    [upstream] = function.requests
    assert upstream.path == "/base" + path


async def test_function_url_with_base_path_is_prefixed(recorder, start_gateway, http):
    function = await recorder()
    gateway = await start_gateway(registry_of(echo=function.url + "/base/"))

    async with http.get(raw_url(gateway, "/function/echo/x%20y?k=v")) as response:
        assert response.status == 200

    [upstream] = function.requests
    assert upstream.path == "/base/x%20y"
    assert upstream.query_string == "k=v"


async def test_existing_x_forwarded_for_is_extended(recorder, start_gateway, http):
    function = await recorder()
    gateway = await start_gateway(registry_of(echo=function.url))

    async with http.get(
        gateway.url("/function/echo"), headers={"X-Forwarded-For": "203.0.113.7"}
    ) as response:
        assert response.status == 200

    [upstream] = function.requests
    assert upstream.headers.getall("X-Forwarded-For") == ["203.0.113.7, 127.0.0.1"]


async def test_hop_by_hop_request_headers_are_not_forwarded(recorder, start_gateway, http):
    function = await recorder()
    gateway = await start_gateway(registry_of(echo=function.url))

    async with http.post(
        gateway.url("/function/echo"),
        data=b"body",
        headers={
            "Connection": "keep-alive, X-Named-Hop",
            "X-Named-Hop": "must not pass",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Upgrade": "h2c",
            "Proxy-Authorization": "Basic Zm9vOmJhcg==",
            "Proxy-Connection": "keep-alive",
            "X-End-To-End": "passes",
        },
    ) as response:
        assert response.status == 200

    [upstream] = function.requests
    for name in ("X-Named-Hop", "Keep-Alive", "TE", "Upgrade", "Proxy-Authorization"):
        assert name not in upstream.headers, name
    assert "Proxy-Connection" not in upstream.headers
    assert "x-named-hop" not in upstream.headers.get("Connection", "").lower()
    assert upstream.headers["X-End-To-End"] == "passes"
    assert upstream.body == b"body"


async def test_chunked_upload_is_reframed_for_the_function(recorder, start_gateway, http):
    """The client's Transfer-Encoding is hop-by-hop: the function gets the gateway's own framing
    (one chunked coding, not the client's header on top of it) and the whole body."""
    function = await recorder()
    gateway = await start_gateway(registry_of(echo=function.url))

    async def body() -> AsyncIterator[bytes]:
        yield b"first,"
        yield b"second"

    async with http.post(gateway.url("/function/echo"), data=body()) as response:
        assert response.status == 200

    [upstream] = function.requests
    assert upstream.body == b"first,second"
    assert upstream.headers.getall("Transfer-Encoding") == ["chunked"]


async def test_expect_100_continue_is_handled_by_the_gateway(recorder, start_gateway, http):
    function = await recorder()
    gateway = await start_gateway(registry_of(echo=function.url))

    async with http.put(
        gateway.url("/function/echo/upload"), data=b"x" * 10_000, expect100=True
    ) as response:
        assert response.status == 200

    [upstream] = function.requests
    assert upstream.body == b"x" * 10_000
    assert "Expect" not in upstream.headers


async def test_gateway_adds_no_default_headers_of_its_own(recorder, start_gateway, http):
    """Without the client's User-Agent/Accept/Accept-Encoding, the function sees none either."""
    function = await recorder()
    gateway = await start_gateway(registry_of(echo=function.url))
    bare = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")

    async with http.post(
        gateway.url("/function/echo"), data=b"raw", skip_auto_headers=bare
    ) as response:
        assert response.status == 200

    [upstream] = function.requests
    for name in bare:
        assert name not in upstream.headers, name


# --- what comes back ----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 202, 204, 404, 409, 500, 503])
async def test_status_headers_and_body_come_back_unchanged(status, recorder, start_gateway, http):
    body = b"" if status == 204 else f'{{"from": "function", "status": {status}}}'.encode()

    async def responder(request: web.Request, recorded: RecordedRequest) -> web.StreamResponse:
        return web.Response(
            status=status,
            body=body or None,
            headers={
                "Content-Type": "application/vnd.function+json",
                "X-Function-Header": "kept",
                "Cache-Control": "no-store",
                "ETag": '"abc"',
            },
        )

    function = await recorder(responder)
    gateway = await start_gateway(registry_of(echo=function.url))

    async with http.post(gateway.url("/function/echo/thing"), data=b"in") as response:
        assert response.status == status
        assert await response.read() == body
        assert response.headers["X-Function-Header"] == "kept"
        assert response.headers["Cache-Control"] == "no-store"
        assert response.headers["ETag"] == '"abc"'
        if status != 204:
            assert response.headers["Content-Type"] == "application/vnd.function+json"
    assert len(function.requests) == 1


async def test_reason_phrase_comes_back(recorder, start_gateway, http):
    async def responder(request: web.Request, recorded: RecordedRequest) -> web.StreamResponse:
        return web.Response(status=299, reason="Custom Reason", body=b"odd")

    function = await recorder(responder)
    gateway = await start_gateway(registry_of(echo=function.url))

    async with http.get(gateway.url("/function/echo")) as response:
        assert response.status == 299
        assert response.reason == "Custom Reason"
        assert await response.read() == b"odd"


async def test_function_404_is_not_mistaken_for_a_gateway_404(recorder, start_gateway, http):
    async def responder(request: web.Request, recorded: RecordedRequest) -> web.StreamResponse:
        return web.Response(
            status=404, text="no such item in the function", content_type="text/plain"
        )

    function = await recorder(responder)
    gateway = await start_gateway(registry_of(echo=function.url))

    async with http.get(gateway.url("/function/echo/items/7")) as response:
        assert response.status == 404
        assert response.content_type == "text/plain"
        assert await response.text() == "no such item in the function"
    assert [r.path for r in function.requests] == ["/items/7"]


async def test_multi_valued_response_headers_survive(recorder, start_gateway, http):
    async def responder(request: web.Request, recorded: RecordedRequest) -> web.StreamResponse:
        headers = CIMultiDict(
            [
                ("Set-Cookie", "a=1; Path=/"),
                ("Set-Cookie", "b=2; Path=/; HttpOnly"),
                ("X-Multi", "x"),
                ("X-Multi", "y"),
            ]
        )
        return web.Response(body=b"cookies", headers=headers)

    function = await recorder(responder)
    gateway = await start_gateway(registry_of(echo=function.url))

    async with http.get(gateway.url("/function/echo")) as response:
        assert response.status == 200
        assert response.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/; HttpOnly"]
        assert response.headers.getall("X-Multi") == ["x", "y"]


async def test_hop_by_hop_response_headers_are_not_passed_back(recorder, start_gateway, http):
    async def responder(request: web.Request, recorded: RecordedRequest) -> web.StreamResponse:
        return web.Response(
            body=b"ok",
            headers={
                "Connection": "X-Upstream-Hop",
                "X-Upstream-Hop": "must not pass",
                "Keep-Alive": "timeout=99",
                "Proxy-Authenticate": "Basic realm=x",
                "Upgrade": "h2c",
                "X-End-To-End": "passes",
            },
        )

    function = await recorder(responder)
    gateway = await start_gateway(registry_of(echo=function.url))

    async with http.get(gateway.url("/function/echo")) as response:
        assert response.status == 200
        assert await response.read() == b"ok"
        for name in ("X-Upstream-Hop", "Keep-Alive", "Proxy-Authenticate", "Upgrade"):
            assert name not in response.headers, name
        assert "x-upstream-hop" not in response.headers.get("Connection", "").lower()
        assert response.headers["X-End-To-End"] == "passes"


async def test_gzip_body_passes_through_byte_for_byte(recorder, start_gateway, http):
    plain = b"".join(b"line %d of a compressible body\n" % i for i in range(5000))
    compressed = gzip.compress(plain, mtime=0)

    async def responder(request: web.Request, recorded: RecordedRequest) -> web.StreamResponse:
        return web.Response(
            body=compressed,
            headers={
                "Content-Encoding": "gzip",
                "Content-Type": "text/plain",
                "Vary": "Accept-Encoding",
            },
        )

    function = await recorder(responder)
    gateway = await start_gateway(registry_of(echo=function.url))

    # ``http`` does not decompress, so this is what went over the wire.
    async with http.get(
        gateway.url("/function/echo"), headers={"Accept-Encoding": "gzip"}
    ) as response:
        assert response.status == 200
        assert response.headers["Content-Encoding"] == "gzip"
        assert response.headers["Content-Length"] == str(len(compressed))
        assert await response.read() == compressed
    assert function.requests[0].headers["Accept-Encoding"] == "gzip"


async def test_gzip_request_body_passes_through_byte_for_byte(serve, start_gateway, http):
    compressed = gzip.compress(b"request " * 1000, mtime=0)
    received: list[tuple[str | None, bytes]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        received.append((request.headers.get("Content-Encoding"), await request.read()))
        return web.Response(text="ok")

    # This function's server keeps bodies as they came over the wire.
    url = await serve(handler, auto_decompress=False)
    gateway = await start_gateway(registry_of(raw=url))

    async with http.post(
        gateway.url("/function/raw"), data=compressed, headers={"Content-Encoding": "gzip"}
    ) as response:
        assert response.status == 200

    assert received == [("gzip", compressed)]


async def test_redirects_are_not_followed(recorder, start_gateway, http):
    async def responder(request: web.Request, recorded: RecordedRequest) -> web.StreamResponse:
        if recorded.path == "/start":
            return web.Response(status=302, headers={"Location": "/elsewhere"}, text="moved")
        return web.Response(text="followed")

    function = await recorder(responder)
    gateway = await start_gateway(registry_of(echo=function.url))

    async with http.get(gateway.url("/function/echo/start"), allow_redirects=False) as response:
        assert response.status == 302
        assert response.headers["Location"] == "/elsewhere"
        assert await response.text() == "moved"
    assert [r.path for r in function.requests] == ["/start"]


# --- streaming ----------------------------------------------------------------------------------


async def test_request_body_streams_to_the_function(serve, start_gateway, http):
    """The client holds back the rest of the body until the function has the first chunk;
    a gateway that buffered the body would never deliver it."""
    first, rest = b"first-chunk|", b"the rest of the body"
    function_has_first = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        received = bytearray()
        async for chunk in request.content.iter_any():
            received += chunk
            if len(received) >= len(first):
                function_has_first.set()
        return web.Response(body=bytes(received))

    gateway = await start_gateway(registry_of(up=await serve(handler)))

    async def body() -> AsyncIterator[bytes]:
        yield first
        await asyncio.wait_for(function_has_first.wait(), DEADLINE_S)
        yield rest

    async with http.post(gateway.url("/function/up"), data=body()) as response:
        assert response.status == 200
        assert await response.read() == first + rest
    assert function_has_first.is_set()


async def test_response_body_streams_to_the_client(serve, start_gateway, http):
    """The function holds back the rest of the body until the client has read the first chunk;
    a gateway that buffered the response would never deliver it."""
    first, rest = b"first-chunk|", b"the rest of the response"
    client_has_first = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        await response.write(first)
        await asyncio.wait_for(client_has_first.wait(), DEADLINE_S)
        await response.write(rest)
        await response.write_eof()
        return response

    gateway = await start_gateway(registry_of(down=await serve(handler)))

    async with http.get(gateway.url("/function/down")) as response:
        assert response.status == 200
        # The function's chunked framing is re-done by the gateway, not copied on top of its own.
        assert response.headers.getall("Transfer-Encoding") == ["chunked"]
        got_first = await asyncio.wait_for(response.content.readexactly(len(first)), DEADLINE_S)
        assert got_first == first
        client_has_first.set()
        assert await asyncio.wait_for(response.content.read(), DEADLINE_S) == rest


async def test_event_stream_flushes_each_event(serve, start_gateway, http):
    client_has_event_1 = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        await response.write(b"id: 1\ndata: one\n\n")
        await asyncio.wait_for(client_has_event_1.wait(), DEADLINE_S)
        await response.write(b"id: 2\ndata: two\n\n")
        await response.write_eof()
        return response

    gateway = await start_gateway(registry_of(events=await serve(handler)))

    async with http.get(
        gateway.url("/function/events"), headers={"Accept": "text/event-stream"}
    ) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        assert response.headers["Cache-Control"] == "no-cache"
        event_1 = await asyncio.wait_for(response.content.readuntil(b"\n\n"), DEADLINE_S)
        assert event_1 == b"id: 1\ndata: one\n\n"
        client_has_event_1.set()
        event_2 = await asyncio.wait_for(response.content.readuntil(b"\n\n"), DEADLINE_S)
        assert event_2 == b"id: 2\ndata: two\n\n"
        assert await response.read() == b""


LARGE_CHUNKS = 100  # of 1 MiB each: 100 MiB


async def test_large_upload_streams_through_intact(serve, start_gateway, http):
    received = {"bytes": 0, "sha256": ""}

    async def handler(request: web.Request) -> web.StreamResponse:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_chunked(256 * 1024):
            digest.update(chunk)
            size += len(chunk)
        received.update(bytes=size, sha256=digest.hexdigest())
        return web.Response(text=f"{size} {digest.hexdigest()}")

    gateway = await start_gateway(registry_of(sink=await serve(handler)))
    sent = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        for index in range(LARGE_CHUNKS):
            chunk = chunk_of(index)
            sent.update(chunk)
            yield chunk

    async with http.post(gateway.url("/function/sink"), data=body()) as response:
        assert response.status == 200
        answer = await response.text()

    assert received["bytes"] == LARGE_CHUNKS * MIB
    assert received["sha256"] == sent.hexdigest()
    assert answer == f"{LARGE_CHUNKS * MIB} {sent.hexdigest()}"


async def test_large_download_streams_through_intact(serve, start_gateway, http):
    sent = hashlib.sha256()

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = LARGE_CHUNKS * MIB
        await response.prepare(request)
        for index in range(LARGE_CHUNKS):
            chunk = chunk_of(index)
            sent.update(chunk)
            await response.write(chunk)
        await response.write_eof()
        return response

    gateway = await start_gateway(registry_of(source=await serve(handler)))
    received = hashlib.sha256()
    size = 0

    async with http.get(gateway.url("/function/source")) as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == str(LARGE_CHUNKS * MIB)
        async for chunk in response.content.iter_chunked(256 * 1024):
            received.update(chunk)
            size += len(chunk)

    assert size == LARGE_CHUNKS * MIB
    assert received.hexdigest() == sent.hexdigest()


def endless_download(client_has_first: asyncio.Event, function_cut_off: asyncio.Event) -> Handler:
    """A function that streams until its writes fail (or the deadline passes)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        deadline = time.monotonic() + DEADLINE_S
        try:
            await response.write(b"first")
            await asyncio.wait_for(client_has_first.wait(), DEADLINE_S)
            while time.monotonic() < deadline:
                await response.write(b"x" * 65536)
        except (ConnectionError, asyncio.CancelledError):
            # A write failed, or (TestServer cancels handlers on disconnect) was cancelled.
            function_cut_off.set()
            raise
        return response

    return handler


async def read_first_then_leave(http: aiohttp.ClientSession, url: str) -> None:
    async with http.get(url) as response:
        assert response.status == 200
        assert await asyncio.wait_for(response.content.readexactly(5), DEADLINE_S) == b"first"
        response.close()  # drop the connection with the body unread


async def test_client_leaving_mid_download_releases_the_function(serve, start_gateway, http):
    """When the client goes away, the gateway closes the upstream connection, so a function
    streaming without end is cut off rather than read on for nobody."""
    client_has_first = asyncio.Event()
    function_cut_off = asyncio.Event()
    url = await serve(endless_download(client_has_first, function_cut_off))
    gateway = await start_gateway(registry_of(endless=url))

    await read_first_then_leave(http, gateway.url("/function/endless"))
    client_has_first.set()

    await asyncio.wait_for(function_cut_off.wait(), DEADLINE_S)


async def test_client_leaving_is_not_blamed_on_the_function(
    serve, start_production_like_gateway, http, caplog
):
    """As served by gateway/cli.py (handlers run on after a disconnect), the gateway notices
    the client is gone on its next write, logs that, releases the function and reports no
    function failure or unhandled error."""
    caplog.set_level(logging.INFO)
    client_has_first = asyncio.Event()
    function_cut_off = asyncio.Event()
    url = await serve(endless_download(client_has_first, function_cut_off))
    base = await start_production_like_gateway(registry_of(endless=url))

    await read_first_then_leave(http, base + "/function/endless")
    client_has_first.set()

    await asyncio.wait_for(function_cut_off.wait(), DEADLINE_S)
    await wait_until(
        lambda: any("client went away" in r.getMessage() for r in caplog.records),
        DEADLINE_S,
        "the gateway to log that the client went away",
    )
    assert not [r for r in caplog.records if "broke off" in r.getMessage()]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- call identity ------------------------------------------------------------------------------


async def test_new_call_id_and_timing_headers_go_both_ways(recorder, start_gateway, http):
    function = await recorder()
    gateway = await start_gateway(registry_of(echo=function.url))

    before_ns = time.time_ns()
    async with http.get(gateway.url("/function/echo")) as response:
        assert response.status == 200
        headers = response.headers
    after_ns = time.time_ns()

    call_id = headers["X-Call-Id"]
    assert_uuid(call_id)
    start_ns = int(headers["X-Start-Time"])
    assert before_ns <= start_ns <= after_ns
    assert float(headers["X-Duration-Seconds"]) >= 0.0
    [upstream] = function.requests
    assert upstream.headers["X-Call-Id"] == call_id
    assert upstream.headers["X-Start-Time"] == headers["X-Start-Time"]


async def test_each_call_gets_its_own_call_id(recorder, start_gateway, http):
    function = await recorder()
    gateway = await start_gateway(registry_of(echo=function.url))

    call_ids = []
    for _ in range(3):
        async with http.get(gateway.url("/function/echo")) as response:
            assert response.status == 200
            call_ids.append(response.headers["X-Call-Id"])

    assert len(set(call_ids)) == 3
    assert [r.headers["X-Call-Id"] for r in function.requests] == call_ids


async def test_clients_call_id_is_kept(recorder, start_gateway, http):
    function = await recorder()
    gateway = await start_gateway(registry_of(echo=function.url))
    call_id = "client-chosen_id.1=" + "a" * 100

    async with http.post(
        gateway.url("/function/echo"), data=b"x", headers={"X-Call-Id": call_id}
    ) as response:
        assert response.status == 200
        assert response.headers["X-Call-Id"] == call_id
        assert "X-Start-Time" in response.headers
        assert "X-Duration-Seconds" in response.headers

    [upstream] = function.requests
    assert upstream.headers.getall("X-Call-Id") == [call_id]


async def test_function_cannot_override_the_call_headers(recorder, start_gateway, http):
    async def responder(request: web.Request, recorded: RecordedRequest) -> web.StreamResponse:
        return web.Response(
            body=b"ok",
            headers={"X-Call-Id": "forged", "X-Start-Time": "1", "X-Duration-Seconds": "999"},
        )

    function = await recorder(responder)
    gateway = await start_gateway(registry_of(echo=function.url))

    async with http.get(gateway.url("/function/echo")) as response:
        assert response.status == 200
        assert response.headers.getall("X-Call-Id") == [function.requests[0].headers["X-Call-Id"]]
        assert response.headers.getall("X-Start-Time") == [
            function.requests[0].headers["X-Start-Time"]
        ]
        assert response.headers.getall("X-Duration-Seconds") != ["999"]


@pytest.mark.parametrize(
    "bad_call_id", ["has spaces in it", "a" * 200, "-leading-dash", "semi;colon", "ünïcode"]
)
async def test_invalid_call_id_is_rejected(bad_call_id, recorder, start_gateway, http):
    function = await recorder()
    gateway = await start_gateway(registry_of(echo=function.url))

    async with http.post(
        gateway.url("/function/echo"), data=b"x", headers={"X-Call-Id": bad_call_id}
    ) as response:
        body = await assert_json_error(response, 400)
    assert "X-Call-Id" in body["error"]
    assert body["callId"] != bad_call_id
    assert_uuid(body["callId"])
    assert function.requests == []


# --- errors -------------------------------------------------------------------------------------


async def test_unknown_function_is_404_json(recorder, start_gateway, http):
    function = await recorder()
    gateway = await start_gateway(registry_of(echo=function.url))

    async with http.post(gateway.url("/function/nosuch/sub?x=1"), data=b"x") as response:
        body = await assert_json_error(response, 404)
    assert "nosuch" in body["error"]
    assert_uuid(body["callId"])
    assert function.requests == []


async def test_unknown_function_keeps_the_clients_call_id(start_gateway, http):
    gateway = await start_gateway(registry_of())

    async with http.get(
        gateway.url("/function/nosuch"), headers={"X-Call-Id": "my-call-1"}
    ) as response:
        body = await assert_json_error(response, 404)
    assert body["callId"] == "my-call-1"


@pytest.mark.parametrize("name", ["-bad", "_bad", ".bad", "a" * 64, "bad%20name", "b%C3%A4d"])
async def test_invalid_function_name_is_400_json(name, start_gateway, http):
    gateway = await start_gateway(registry_of())

    async with http.get(raw_url(gateway, f"/function/{name}/x")) as response:
        body = await assert_json_error(response, 400)
    assert "invalid function name" in body["error"]


async def test_longest_valid_function_name_is_served(recorder, start_gateway, http):
    function = await recorder()
    longest = "a" + "b-_.9" * 12 + "zz"  # 63 characters
    assert len(longest) == 63
    gateway = await start_gateway(registry_of(**{longest: function.url}))

    async with http.get(gateway.url(f"/function/{longest}/p")) as response:
        assert response.status == 200
        assert await response.read() == b"ok"
    async with http.get(gateway.url(f"/function/{longest[:-1]}x/p")) as response:
        await assert_json_error(response, 404)
    assert [r.path for r in function.requests] == ["/p"]


async def test_refused_connection_is_502_json(start_gateway, http):
    gateway = await start_gateway(registry_of(gone=f"http://127.0.0.1:{free_port()}"))

    async with http.post(
        gateway.url("/function/gone"), data=b"x", headers={"X-Call-Id": "refused-1"}
    ) as response:
        body = await assert_json_error(response, 502)
    assert body["callId"] == "refused-1"
    assert "gone" in body["error"]


async def test_502_says_the_function_did_not_answer_but_not_where_it_listens(
    start_gateway, http, caplog
):
    caplog.set_level(logging.INFO)
    # Bound but not listening: connections are refused, and no one else can take the port.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as closed_port:
        closed_port.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{closed_port.getsockname()[1]}"
        gateway = await start_gateway(registry_of(gone=f"http://{address}"))
        async with http.get(gateway.url("/function/gone")) as response:
            body = await assert_json_error(response, 502)
    assert body["error"].startswith("function 'gone' did not answer")
    assert address not in body["error"]
    assert address.split(":")[1] not in body["error"]
    assert [r for r in caplog.records if address in r.getMessage()], "the log keeps the address"


async def test_connection_reset_mid_request_is_502_json(start_gateway, http):
    got_request = asyncio.Event()

    async def reset_after_headers(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.read(10)  # part of the body, then the connection is torn down
        got_request.set()
        reset_connection(writer)

    async with raw_tcp_server(reset_after_headers) as url:
        gateway = await start_gateway(registry_of(flaky=url))

        async def slow_body() -> AsyncIterator[bytes]:
            yield b"0123456789abcdef"
            await asyncio.wait_for(got_request.wait(), DEADLINE_S)
            yield b"more"

        async with http.post(gateway.url("/function/flaky"), data=slow_body()) as response:
            body = await assert_json_error(response, 502)
    assert "flaky" in body["error"]
    assert got_request.is_set()


async def test_connection_closed_before_response_is_502_json(start_gateway, http):
    async def close_after_headers(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    async with raw_tcp_server(close_after_headers) as url:
        gateway = await start_gateway(registry_of(flaky=url))
        async with http.get(gateway.url("/function/flaky")) as response:
            await assert_json_error(response, 502)


def answering(answer: bytes, then_close: bool):
    """A function that sends ``answer``, then closes or, as a server does after what it takes
    for a whole response, waits for the next request until the gateway closes."""

    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        if not then_close:
            with contextlib.suppress(ConnectionError):
                while await reader.read(65536):
                    pass
        writer.close()

    return respond


@pytest.mark.parametrize(
    ("answer", "then_close"),
    [
        (b"HTTP/1.1 600 Beyond\r\nContent-Length: 2\r\n\r\nhi", False),
        (b"HTTP/1.1 000 None\r\nContent-Length: 2\r\n\r\nhi", False),
        (b"HTTP/1.1 099 Below\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", False),
        (b"HTTP/1.1 100 Continue\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.1 100 Continue\r\n\r\n", True),
    ],
    ids=["600", "000", "099", "101", "100-final", "100-then-close"],
)
async def test_status_outside_100_to_599_or_a_final_1xx_is_a_502_at_once(
    answer, then_close, start_gateway, http
):
    """Not a wait for the read timeout (600 s here): the deadline below is the test's own."""
    async with raw_tcp_server(answering(answer, then_close)) as url:
        gateway = await start_gateway(registry_of(odd=url), **LONG_GATEWAY_LIMITS)
        async with asyncio.timeout(DEADLINE_S), http.get(gateway.url("/function/odd")) as response:
            body = await assert_json_error(response, 502)
    assert "odd" in body["error"]


def truncating_function(declared_bytes: int, sent_bytes: int):
    async def truncate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {declared_bytes}\r\n\r\n".encode()
        writer.write(head + b"p" * sent_bytes)
        await writer.drain()
        reset_connection(writer)

    return truncate


async def test_truncated_large_response_is_not_passed_off_as_complete(start_gateway, http):
    """A streamed response: once headers went out the status cannot change, so the client must
    see a broken body."""
    async with raw_tcp_server(truncating_function(10_000_000, 200_000)) as url:
        gateway = await start_gateway(registry_of(truncated=url))
        async with http.get(gateway.url("/function/truncated")) as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await asyncio.wait_for(response.read(), DEADLINE_S)


async def test_truncated_small_response_is_a_502(start_gateway, http):
    """A small response is read whole before anything is sent, so a break is still a 502."""
    async with raw_tcp_server(truncating_function(1000, 10)) as url:
        gateway = await start_gateway(registry_of(truncated=url))
        async with http.get(gateway.url("/function/truncated")) as response:
            body = await assert_json_error(response, 502)
        assert "truncated" in body["error"]


async def test_exec_timeout_is_504_json(serve, start_gateway, http):
    arrived = asyncio.Event()
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        arrived.set()
        await asyncio.wait_for(release.wait(), DEADLINE_S * 2)
        return web.Response(text="too late")

    url = await serve(handler)
    # Only the function's own exec_timeout is short: the gateway-wide limits would not fire.
    gateway = await start_gateway(
        registry_of(slow={"url": url, "exec_timeout": "0.3s"}), **LONG_GATEWAY_LIMITS
    )
    try:
        async with http.get(
            gateway.url("/function/slow"), headers={"X-Call-Id": "slow-1"}
        ) as response:
            body = await assert_json_error(response, 504)
        assert body["callId"] == "slow-1"
        assert "slow" in body["error"]
        assert arrived.is_set()
    finally:
        release.set()


async def test_exec_timeout_applies_per_function(serve, start_gateway, http):
    """A short exec_timeout on one function does not cut another function's call short: the
    other call is already waiting inside its function when the first times out, and completes."""
    release = asyncio.Event()
    slow_arrived = asyncio.Event()
    patient_arrived = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        slow_arrived.set()
        await asyncio.wait_for(release.wait(), DEADLINE_S * 2)
        return web.Response(text="slow done")

    async def patient(request: web.Request) -> web.StreamResponse:
        patient_arrived.set()
        await asyncio.wait_for(release.wait(), DEADLINE_S * 2)
        return web.Response(text="patient done")

    registry = registry_of(
        slow={"url": await serve(slow), "exec_timeout": "0.3s"},
        patient={"url": await serve(patient), "exec_timeout": "60s"},
    )
    gateway = await start_gateway(registry, **LONG_GATEWAY_LIMITS)
    patient_call = asyncio.create_task(_get_text(http, gateway.url("/function/patient")))
    try:
        await asyncio.wait_for(patient_arrived.wait(), DEADLINE_S)
        async with http.get(gateway.url("/function/slow")) as response:
            await assert_json_error(response, 504)
        assert slow_arrived.is_set()
        assert not patient_call.done()
        release.set()
        assert await asyncio.wait_for(patient_call, DEADLINE_S) == (200, "patient done")
    finally:
        release.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(patient_call, DEADLINE_S)


async def _get_text(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with http.get(url) as response:
        return response.status, await response.text()


# --- NATS down ----------------------------------------------------------------------------------


async def _health_status(http: aiohttp.ClientSession, gateway: RunningGateway) -> int:
    async with http.get(gateway.url("/healthz")) as response:
        return response.status


async def _health_is(http: aiohttp.ClientSession, gateway: RunningGateway, status: int) -> bool:
    return await _health_status(http, gateway) == status


async def test_sync_calls_work_after_nats_dies(nats_server, recorder, start_gateway, http):
    function = await recorder(echo_responder)
    gateway = await start_gateway(registry_of(echo=function.url))
    await wait_until(
        lambda: _health_is(http, gateway, 200), DEADLINE_S, "gateway to be healthy with NATS up"
    )

    nats_server.kill()
    await wait_until(
        lambda: _health_is(http, gateway, 503), DEADLINE_S, "gateway to notice NATS is gone"
    )

    for index in range(3):
        async with http.post(gateway.url("/function/echo"), data=b"%d" % index) as response:
            assert response.status == 200
            assert await response.read() == b"echo:%d" % index
    assert len(function.requests) == 3


async def test_sync_calls_work_when_nats_was_never_reachable(
    nats_server, recorder, start_gateway, http
):
    # start_gateway always points the gateway at nats_server; with that killed first, nothing
    # listens at the URL for the whole life of the gateway.
    nats_server.kill()
    function = await recorder(echo_responder)
    gateway = await start_gateway(registry_of(echo=function.url), nats_startup_wait_s=0.2)
    assert await _health_status(http, gateway) == 503

    async with http.post(gateway.url("/function/echo/x"), data=b"payload") as response:
        assert response.status == 200
        assert await response.read() == b"echo:payload"
    assert [r.path for r in function.requests] == ["/x"]
    async with http.post(gateway.url("/async-function/echo"), data=b"payload") as response:
        assert response.status == 503  # the queue really is unavailable
    assert len(function.requests) == 1


# --- metrics ------------------------------------------------------------------------------------


async def test_metrics_count_calls_by_function_and_code(serve, recorder, start_gateway, http):
    async def responder(request: web.Request, recorded: RecordedRequest) -> web.StreamResponse:
        status = int(request.query.get("status", "200"))
        return web.Response(status=status, body=b"r")

    release = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.wait_for(release.wait(), DEADLINE_S * 2)
        return web.Response(text="late")

    function = await recorder(responder)
    registry = registry_of(
        echo=function.url,
        gone=f"http://127.0.0.1:{free_port()}",
        slow={"url": await serve(slow), "exec_timeout": "0.3s"},
    )
    gateway = await start_gateway(registry, **LONG_GATEWAY_LIMITS)
    try:
        for query, expected in [("", 200), ("", 200), ("?status=201", 201), ("?status=500", 500)]:
            async with http.get(gateway.url(f"/function/echo{query}")) as response:
                assert response.status == expected
                await response.read()
        async with http.get(gateway.url("/function/gone")) as response:
            assert response.status == 502
        async with http.get(gateway.url("/function/slow")) as response:
            assert response.status == 504
    finally:
        release.set()

    text = await metrics_text(http, gateway)
    total = "gateway_function_invocation_total"
    assert metric_value(text, total, function_name="echo", code="200") == 2
    assert metric_value(text, total, function_name="echo", code="201") == 1
    assert metric_value(text, total, function_name="echo", code="500") == 1
    assert metric_value(text, total, function_name="gone", code="502") == 1
    assert metric_value(text, total, function_name="slow", code="504") == 1

    seconds = "gateway_functions_seconds_count"
    assert metric_value(text, seconds, function_name="echo", code="200") == 2
    assert metric_value(text, seconds, function_name="echo", code="201") == 1
    assert metric_value(text, seconds, function_name="slow", code="504") == 1
    echo_sum = metric_value(text, "gateway_functions_seconds_sum", function_name="echo", code="200")
    assert echo_sum is not None
    assert echo_sum >= 0
    inf_bucket = metric_value(
        text, "gateway_functions_seconds_bucket", function_name="echo", code="200", le="+Inf"
    )
    assert inf_bucket == 2

    started = "gateway_function_invocation_started"
    assert metric_value(text, started, function_name="echo") == 4
    assert metric_value(text, started, function_name="gone") == 1
    assert metric_value(text, started, function_name="slow") == 1


async def test_metrics_have_no_series_for_unknown_names(recorder, start_gateway, http):
    function = await recorder()
    gateway = await start_gateway(registry_of(echo=function.url))
    random_names = [f"nosuch-{uuid.uuid4().hex[:12]}" for _ in range(3)]

    for name in random_names:
        async with http.get(gateway.url(f"/function/{name}")) as response:
            assert response.status == 404
    async with http.get(gateway.url("/function/-invalid-name")) as response:
        assert response.status == 400
    async with http.get(gateway.url("/function/echo")) as response:
        assert response.status == 200

    text = await metrics_text(http, gateway)
    for name in [*random_names, "-invalid-name"]:
        assert name not in text
    function_names = {
        labels["function_name"]
        for sample_name, labels, _ in metric_samples(text)
        if "function_name" in labels and sample_name.startswith("gateway_function")
    }
    assert function_names == {"echo", "(unknown)"}
    total = "gateway_function_invocation_total"
    assert metric_value(text, total, function_name="(unknown)", code="404") == 3
    assert metric_value(text, total, function_name="(unknown)", code="400") == 1
    assert metric_value(text, total, function_name="echo", code="200") == 1
    assert metric_value(text, "gateway_function_invocation_started", function_name="echo") == 1


# --- cookies ------------------------------------------------------------------------------------


async def test_upstream_session_keeps_no_cookies(recorder, start_gateway):
    """A cookie one caller's function response sets must never reach the function again on
    another caller's call. The function is addressed by host name: a cookie jar would store
    cookies for it (jars ignore cookies from bare IP addresses)."""

    async def responder(request: web.Request, recorded: RecordedRequest) -> web.StreamResponse:
        response = web.Response(text="ok")
        response.set_cookie("session", "alice-secret", path="/")
        return response

    function = await recorder(responder)
    port = URL(function.url).port
    gateway = await start_gateway(registry_of(echo=f"http://localhost:{port}"))

    for caller in ("alice", "bob"):
        async with (
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as client,
            client.get(gateway.url(f"/function/echo/{caller}")) as response,
        ):
            assert response.status == 200
            assert response.headers["Set-Cookie"].startswith("session=alice-secret")

    alice, bob = function.requests
    assert alice.path == "/alice"
    assert bob.path == "/bob"
    assert "Cookie" not in bob.headers


async def test_client_cookies_are_forwarded(recorder, start_gateway, http):
    function = await recorder()
    gateway = await start_gateway(registry_of(echo=function.url))

    async with http.get(
        gateway.url("/function/echo"), headers={"Cookie": "mine=1; other=2"}
    ) as response:
        assert response.status == 200

    [upstream] = function.requests
    assert upstream.headers["Cookie"] == "mine=1; other=2"


# --- concurrency --------------------------------------------------------------------------------


async def test_concurrent_calls_are_not_serialised_or_mixed_up(serve, start_gateway, http):
    """Ten calls are all inside the function at once (none queued behind another), and each
    gets its own answer."""
    count = 10
    inside = 0
    all_inside = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal inside
        inside += 1
        if inside == count:
            all_inside.set()
        await asyncio.wait_for(all_inside.wait(), DEADLINE_S)
        body = await request.read()
        return web.Response(
            body=b"re:" + body, headers={"X-Seen-Call": request.headers["X-Call-Id"]}
        )

    gateway = await start_gateway(registry_of(fan=await serve(handler)))

    async def call(index: int) -> tuple[str, bytes, str]:
        async with http.post(
            gateway.url(f"/function/fan/{index}"),
            data=b"%d" % index,
            headers={"X-Call-Id": f"call-{index}"},
        ) as response:
            assert response.status == 200
            return (
                response.headers["X-Call-Id"],
                await response.read(),
                response.headers["X-Seen-Call"],
            )

    results = await asyncio.wait_for(asyncio.gather(*(call(i) for i in range(count))), DEADLINE_S)
    for index, (call_id, body, seen) in enumerate(results):
        assert call_id == seen == f"call-{index}"
        assert body == b"re:%d" % index
