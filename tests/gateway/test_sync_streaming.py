"""The synchronous proxy route /function/{name} streams both ways: large and endless bodies
pass through without being held, a client that leaves releases the function, and concurrent
calls are neither serialised nor mixed up. Streaming is proven by handshakes, never by timing."""

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from tests.gateway.helpers import Handler
from tests.harness import DEADLINE_S, registry_of, wait_until

MIB = 1024 * 1024


def chunk_of(index: int, size: int = MIB) -> bytes:
    """Deterministic, incompressible chunk ``index`` of a large body."""
    return random.Random(index).randbytes(size)


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
