"""The synchronous proxy route /function/{name}: what goes upstream (method, path, query,
headers and body as the function should see them) and which cookies travel. Every function is a
real aiohttp server."""

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from tests.conftest import RunningGateway
from tests.gateway.helpers import assert_json_error, echo_responder
from tests.harness import RecordedRequest, raw_url, registry_of


def gateway_netloc(gateway: RunningGateway) -> str:
    return f"{gateway.server.host}:{gateway.server.port}"


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
