"""The lean server in front of aiohttp's (gateway/invocation_server.py): one connection may
move from it to aiohttp, pipelined calls are answered in order, shutdown waits for a running
call, and invocation_server=aiohttp serves everything as before."""

import asyncio
import time

import pytest
from aiohttp import web

from gateway import invocation_server
from tests.conftest import StartGateway, StartRecorder
from tests.harness import registry_of, wait_until

DEADLINE_S = 10.0


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body: status, headers (lower-case), body."""
    status_line = await asyncio.wait_for(reader.readline(), DEADLINE_S)
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := await asyncio.wait_for(reader.readline(), DEADLINE_S)) != b"\r\n":
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), DEADLINE_S)
    return status, headers, body


def post(path: str, body: bytes) -> bytes:
    return b"POST %b HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b" % (
        path.encode(),
        len(body),
        body,
    )


async def test_one_connection_moves_from_the_lean_server_to_aiohttp(
    recorder: StartRecorder, start_gateway: StartGateway
) -> None:
    """A sync call, then a route only aiohttp serves, then a sync call again, all on one
    kept-alive connection: each answered in full, the last by aiohttp's side."""
    function = await recorder()
    gateway = await start_gateway(registry_of(echo=function.url))
    assert gateway.server.port is not None
    reader, writer = await asyncio.open_connection(gateway.server.host, gateway.server.port)
    try:
        writer.write(post("/function/echo", b"one"))
        status, headers, body = await read_response(reader)
        assert (status, body) == (200, b"ok")
        first_call = headers["x-call-id"]

        writer.write(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = await read_response(reader)
        assert status == 200
        assert headers["content-type"].startswith("application/json")
        assert b'"openapi"' in body

        writer.write(post("/function/echo", b"two"))
        status, headers, body = await read_response(reader)
        assert (status, body) == (200, b"ok")
        assert headers["x-call-id"] != first_call
    finally:
        writer.close()
    assert [request.body for request in function.requests] == [b"one", b"two"]


async def test_pipelined_calls_are_answered_in_order(
    recorder: StartRecorder, start_gateway: StartGateway
) -> None:
    async def echo(request: web.Request, recorded: object) -> web.StreamResponse:
        return web.Response(body=await request.read())

    function = await recorder(echo)
    gateway = await start_gateway(registry_of(echo=function.url))
    assert gateway.server.port is not None
    reader, writer = await asyncio.open_connection(gateway.server.host, gateway.server.port)
    try:
        writer.write(post("/function/echo", b"first") + post("/function/echo/x", b"second"))
        answers = [await read_response(reader), await read_response(reader)]
    finally:
        writer.close()
    assert [(status, body) for status, _, body in answers] == [(200, b"first"), (200, b"second")]
    assert answers[0][1]["x-call-id"] != answers[1][1]["x-call-id"]
    assert [request.path for request in function.requests] == ["/", "/x"]


async def test_shutdown_waits_for_a_running_call(serve, start_gateway: StartGateway) -> None:
    """Stopping the gateway lets a sync call that is running finish (within shutdown_grace)
    and answers it, then refuses new connections."""
    started = asyncio.Event()
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        started.set()
        await release.wait()
        return web.Response(text="done")

    gateway = await start_gateway(registry_of(slow=await serve(slow)), shutdown_grace_s=10.0)
    host, port = gateway.server.host, gateway.server.port
    assert port is not None
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(post("/function/slow", b""))
        await asyncio.wait_for(started.wait(), DEADLINE_S)
        stopping = asyncio.create_task(gateway.server.close())
        await wait_until(lambda: refused(host, port), DEADLINE_S, "the listener to close")
        assert not stopping.done()  # still waiting for the running call
        release.set()
        status, _, body = await read_response(reader)
        await asyncio.wait_for(stopping, DEADLINE_S)
    finally:
        writer.close()
    assert (status, body) == (200, b"done")


async def refused(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(host, port)
    except OSError:
        return True
    writer.close()
    return False


async def test_invocation_server_aiohttp_serves_every_route_itself(
    recorder: StartRecorder, start_gateway: StartGateway
) -> None:
    function = await recorder()
    gateway = await start_gateway(registry_of(echo=function.url), invocation_server="aiohttp")
    assert gateway.server.port is not None
    reader, writer = await asyncio.open_connection(gateway.server.host, gateway.server.port)
    try:
        writer.write(post("/function/echo", b"hi"))
        status, headers, body = await read_response(reader)
    finally:
        writer.close()
    assert (status, body) == (200, b"ok")
    assert "x-call-id" in headers
    assert [request.body for request in function.requests] == [b"hi"]


async def test_an_idle_connection_is_closed_after_keepalive_and_a_busy_one_is_not(
    recorder: StartRecorder, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One idle timer per connection, moved on lazily: calls that come and go keep a
    connection open past KEEPALIVE_S in all, and once it is idle that long it is closed."""
    keepalive_s = 0.5
    monkeypatch.setattr(invocation_server, "KEEPALIVE_S", keepalive_s)
    function = await recorder()
    gateway = await start_gateway(registry_of(echo=function.url))
    assert gateway.server.port is not None
    reader, writer = await asyncio.open_connection(gateway.server.host, gateway.server.port)
    try:
        began = time.monotonic()
        calls = 0
        while True:
            writer.write(post("/function/echo", b"%d" % calls))
            status, _, _ = await read_response(reader)
            assert status == 200
            calls += 1
            answered_at = time.monotonic()
            if answered_at - began > 3 * keepalive_s:  # busy for longer than the timeout
                break
            await wait_until(
                lambda answered_at=answered_at: time.monotonic() - answered_at > keepalive_s / 4,
                DEADLINE_S,
                "a gap between calls",
            )
        assert await asyncio.wait_for(reader.read(), DEADLINE_S) == b""  # closed by the server
        # The premise, not a speed limit: it was closed for being idle, not at once.
        assert time.monotonic() - answered_at >= keepalive_s * 0.9
    finally:
        writer.close()
    assert len(function.requests) == calls
