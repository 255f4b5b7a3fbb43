"""How the synchronous proxy route /function/{name} fails: JSON errors for unknown and invalid
functions, functions that refuse, reset, truncate or break HTTP (plain TCP servers misbehave at
the socket level), exec timeouts; and sync calls that go on while NATS is down."""

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import RunningGateway
from tests.gateway.helpers import (
    LONG_GATEWAY_LIMITS,
    assert_json_error,
    assert_uuid,
    echo_responder,
)
from tests.harness import DEADLINE_S, free_port, raw_url, registry_of, reset_connection, wait_until


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
