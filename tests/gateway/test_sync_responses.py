"""The synchronous proxy route /function/{name}: what comes back (status, reason, headers and
body as the function sent them) and the call's identity headers, both ways."""

import gzip
import time

import pytest
from aiohttp import web
from multidict import CIMultiDict

from tests.gateway.helpers import assert_json_error, assert_uuid
from tests.harness import RecordedRequest, registry_of


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
