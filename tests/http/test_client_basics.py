"""UpstreamClient, the gateway's and worker's HTTP/1.1 client: what a request puts on the wire
and what comes back, against real servers (tests/http/helpers.py), on both event loops."""

import random
import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from yarl import URL

from faas_gateway.http.client import _request_head
from tests.http.helpers import LONG, OK_ANSWER, answer_each, echo, fetch


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
