"""Cancelling async calls through the gateway (queued ones are never run, running ones are cut
off, neither calls back), and hostile requests to the async and reliability routes: each gets a
4xx and none leaves a queued message. Real NATS, gateway, worker and HTTP servers."""

import asyncio

import aiohttp
from nats.aio.client import Client as NatsClient

from tests.conftest import (
    StartGateway,
    StartRecorder,
    StartWorker,
    ready_gateway,
    stream_message_count,
)
from tests.harness import DEADLINE_S, Gate, final_record, post_async, registry_of


async def test_cancelling_queued_and_running_calls(
    recorder: StartRecorder,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    http: aiohttp.ClientSession,
) -> None:
    gate = Gate()
    function = await recorder(gate)
    callbacks = await recorder()
    registry = registry_of(held=function.url)
    gateway = await ready_gateway(start_gateway, http, registry)

    queued = await post_async(http, gateway, "/async-function/held", callbacks.url, data=b"1")
    async with http.delete(gateway.url(f"/async-function/{queued}")) as response:
        assert response.status == 202, await response.text()
        assert (await response.json())["status"] == "cancelled"
    record = await final_record(http, gateway, queued)
    assert record["status"] == "cancelled"

    await start_worker(registry, max_inflight=1)
    running = await post_async(http, gateway, "/async-function/held", callbacks.url, data=b"2")
    await asyncio.wait_for(gate.entered.wait(), DEADLINE_S)
    async with http.delete(gateway.url(f"/async-function/{running}")) as response:
        assert response.status == 202
    record = await final_record(http, gateway, running)
    assert record["status"] == "cancelled"

    later = await post_async(http, gateway, "/async-function/held", data=b"3")
    gate.opened.set()
    await final_record(http, gateway, later)
    # The queued call was never invoked; the running one was cut off; neither called back.
    assert [r.body for r in function.requests] == [b"2", b"3"]
    assert callbacks.requests == []

    async with http.delete(gateway.url(f"/async-function/{later}")) as response:
        assert response.status == 409
    async with http.delete(gateway.url("/async-function/no-such-call")) as response:
        assert response.status == 404


async def raw_status(host: str, port: int, request: bytes) -> int:
    """Send bytes as they are (no client library tidies them up) and read the status code."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), DEADLINE_S)
        return int(status_line.split()[1])
    finally:
        writer.close()


async def test_hostile_input_gets_4xx_and_never_a_queued_message(
    nats_client: NatsClient,
    recorder: StartRecorder,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
) -> None:
    function = await recorder()
    gateway = await ready_gateway(start_gateway, http, registry_of(echo=function.url))
    host, port = gateway.server.host, gateway.server.port
    assert port is not None
    base = b"POST /async-function/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
    raw_requests = [
        # names with path tricks, NUL, invalid UTF-8, too long
        b"POST /async-function/..%2F..%2Fetc%2Fpasswd HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /async-function/%00 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /async-function/%ff%fe HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /async-function/" + b"a" * 300 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /async-function/.hidden HTTP/1.1\r\nHost: x\r\n\r\n",
        # malformed and oversized headers
        base + b"X-Call-Id: \xff\xfe\r\n\r\nx",
        base + b"X-Callback-Url: http://\xff\xfe/\r\n\r\nx",
        base + b"X-Callback-Url: http://[::1/\r\n\r\nx",
        base + b"X-Big: " + b"a" * 100_000 + b"\r\n\r\nx",
        base + b"Bad Header Line\r\n\r\nx",
        base + b"X-Callback-Url: http://169.254.169.254/latest\r\n\r\nx",
        base + b"X-Callback-Url: file:///etc/passwd\r\n\r\nx",
        base + b"X-Call-Id: a..b\r\n\r\nx",
        # wrong methods, a body larger than a queued message holds
        b"GET /async-function/echo HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PUT /async-function/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        b"POST /async-function/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n",
        b"DELETE /async-function/a%20b HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /system/activations/x/retry HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        b"GET /system/activations?limit=-1 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /system/dead-letters?function=%ff HTTP/1.1\r\nHost: x\r\n\r\n",
    ]
    for request in raw_requests:
        status = await raw_status(host, port, request)
        assert 400 <= status < 500, (request[:80], status)

    chunk = b"x" * 65536
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(32)) + b"0\r\n\r\n"
    status = await raw_status(
        host,
        port,
        b"POST /async-function/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunked,
    )
    assert status == 413
    assert await stream_message_count(nats_client) == 0
    assert function.requests == []
    # And the gateway is still fine.
    await post_async(http, gateway, "/async-function/echo", data=b"ok")
    assert await stream_message_count(nats_client) == 1
