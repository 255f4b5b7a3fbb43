"""Request bodies from clients that stall or leave, sent from raw sockets so that nothing
between the test and the gateway completes or frames them: after ``request_body_timeout``
without a byte the answer is a 408 and nothing goes on, and a client gone mid-body is a debug
line and a count in gateway_client_disconnects_total, never an ERROR with a traceback.

The gateways here are served as gateway/cli.py serves them (handlers are not cancelled when
the client leaves), which is what decides what a disconnect looks like to the handler."""

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from nats.aio.client import Client as NatsClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from yarl import URL

from gateway.settings import GatewaySettings
from tests.conftest import StartRecorder, stream_message_count
from tests.harness import registry_of, wait_until

DEADLINE_S = 30.0
# The gateway's request_body_timeout in these tests: the 408s come after it.
BODY_TIMEOUT_S = 0.3
LARGE = 1024 * 1024  # over the 64 KiB up to which the sync proxy reads a body before sending

StartGateway = Callable[..., Awaitable[str]]


@contextlib.asynccontextmanager
async def partial_request(
    base: str, path: str, declared: int | None, sent: bytes
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A POST whose headers promise ``declared`` bytes (None: chunked) of which only ``sent``
    goes out; the connection stays open until the block ends."""
    url = URL(base)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    if declared is None:
        framing = "Transfer-Encoding: chunked"
        sent = b"%x\r\n%b\r\n" % (len(sent), sent)
    else:
        framing = f"Content-Length: {declared}"
    head = f"POST {path} HTTP/1.1\r\nHost: {url.host}\r\nX-Call-Id: stalled-1\r\n{framing}\r\n\r\n"
    writer.write(head.encode() + sent)
    await writer.drain()
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    async with asyncio.timeout(DEADLINE_S):
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
        headers = {name.lower(): value.strip() for name, value in (x.split(":", 1) for x in lines)}
        body = await reader.readexactly(int(headers["content-length"]))
    return int(status_line.split()[1]), headers, body


def assert_408(status: int, headers: dict[str, str], body: bytes, call_id: str | None) -> None:
    assert status == 408
    assert headers["content-type"].startswith("application/json")
    assert headers["connection"] == "close"
    payload = json.loads(body)
    assert set(payload) == {"error", "callId"}
    assert payload["callId"] == call_id
    assert "request_body_timeout" in payload["error"]


async def disconnects(http: aiohttp.ClientSession, base: str, function: str) -> float:
    async with http.get(base + "/metrics") as response:
        text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "gateway_client_disconnects_total"
                and sample.labels.get("function_name") == function
            ):
                return float(sample.value)
    return 0.0


async def ready(http: aiohttp.ClientSession, base: str) -> None:
    async def healthy() -> bool:
        async with http.get(base + "/healthz") as response:
            return response.status == 200

    await wait_until(healthy, DEADLINE_S, "the gateway to reach NATS")


# --- a body that stops arriving: 408 ------------------------------------------------------------


@pytest.mark.parametrize("declared", [100, None], ids=["content-length", "chunked"])
async def test_sync_call_whose_small_body_stalls_is_408_and_never_reaches_the_function(
    declared, recorder: StartRecorder, start_production_like_gateway: StartGateway
):
    function = await recorder()
    base = await start_production_like_gateway(
        registry_of(f=function.url), request_body_timeout_s=BODY_TIMEOUT_S
    )

    async with partial_request(base, "/function/f", declared, b"0123456789") as (reader, _):
        assert_408(*await read_response(reader), call_id="stalled-1")
    assert function.requests == []


async def test_sync_call_whose_streamed_body_stalls_is_408_and_the_functions_connection_closes(
    start_production_like_gateway: StartGateway,
):
    """The first part of a large body is on its way to the function when the client stops:
    the function's connection is closed (its request can never be whole), the client gets a
    408 since nothing was answered yet."""
    function_got_bytes = asyncio.Event()
    function_connection_closed = asyncio.Event()
    received = bytearray()

    async def function(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                received.extend(chunk)
                function_got_bytes.set()
        function_connection_closed.set()
        writer.close()

    server = await asyncio.start_server(function, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        base = await start_production_like_gateway(
            registry_of(f=f"http://127.0.0.1:{port}"), request_body_timeout_s=BODY_TIMEOUT_S
        )
        async with partial_request(base, "/function/f", LARGE, b"x" * 100_000) as (reader, _):
            assert_408(*await read_response(reader), call_id="stalled-1")
            await asyncio.wait_for(function_got_bytes.wait(), DEADLINE_S)
            await asyncio.wait_for(function_connection_closed.wait(), DEADLINE_S)
    finally:
        server.close()
    assert 0 < len(received) <= 100_000


async def test_body_that_stalls_while_the_function_answers_cuts_the_response_short(
    start_production_like_gateway: StartGateway, caplog: pytest.LogCaptureFixture
):
    """The function sent its headers and a first part before the body stopped arriving: no
    408 can follow a 200, so the response is cut short (no final chunk), and quietly."""
    caplog.set_level(logging.INFO)
    function_connection_closed = asyncio.Event()

    async def function(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass
        function_connection_closed.set()
        writer.close()

    server = await asyncio.start_server(function, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        base = await start_production_like_gateway(
            registry_of(f=f"http://127.0.0.1:{port}"), request_body_timeout_s=BODY_TIMEOUT_S
        )
        async with partial_request(base, "/function/f", LARGE, b"x" * 100_000) as (reader, _):
            async with asyncio.timeout(DEADLINE_S):
                received = await reader.read()  # to the end: the gateway closes
            await asyncio.wait_for(function_connection_closed.wait(), DEADLINE_S)
    finally:
        server.close()
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert received.endswith(b"5\r\nfirst\r\n")  # and no 0-length chunk: cut short
    assert [r for r in caplog.records if "cut short" in r.getMessage()]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_async_call_whose_body_stalls_is_408_and_nothing_is_enqueued(
    recorder: StartRecorder,
    start_production_like_gateway: StartGateway,
    http: aiohttp.ClientSession,
    nats_client: NatsClient,
):
    function = await recorder()
    base = await start_production_like_gateway(
        registry_of(f=function.url), request_body_timeout_s=BODY_TIMEOUT_S
    )
    await ready(http, base)

    async with partial_request(base, "/async-function/f", 100, b"0123456789") as (reader, _):
        assert_408(*await read_response(reader), call_id="stalled-1")
    # A control call after it is the stream's first message: the stalled one was never sent.
    async with http.post(base + "/async-function/f", data=b"whole") as response:
        assert response.status == 202
    info = await nats_client.jetstream().stream_info("faas-async")
    assert (info.state.messages, info.state.last_seq) == (1, 1)


async def test_deployment_whose_body_stalls_is_408_and_deploys_nothing(
    recorder: StartRecorder,
    start_production_like_gateway: StartGateway,
    http: aiohttp.ClientSession,
):
    function = await recorder()
    base = await start_production_like_gateway(registry_of(), request_body_timeout_s=BODY_TIMEOUT_S)
    await ready(http, base)
    deployment = json.dumps({"service": "late", "url": function.url}).encode()

    async with partial_request(base, "/system/functions", len(deployment), deployment[:10]) as (
        reader,
        _,
    ):
        assert_408(*await read_response(reader), call_id=None)
    async with http.get(base + "/system/functions") as response:
        assert await response.json() == []


# --- a client that leaves mid-body: debug line and metric ---------------------------------------


@pytest.mark.parametrize(
    ("path", "declared", "sent"),
    [
        ("/function/f", 100, b"0123456789"),
        ("/function/f", None, b"0123456789"),
        ("/function/f", LARGE, b"x" * 100_000),
        ("/async-function/f", 100, b"0123456789"),
        ("/async-function/f", None, b"0123456789"),
    ],
    ids=["sync", "sync-chunked", "sync-streamed", "async", "async-chunked"],
)
async def test_client_leaving_mid_body_is_a_debug_line_and_a_metric_not_an_error(
    path: str,
    declared: int | None,
    sent: bytes,
    recorder: StartRecorder,
    start_production_like_gateway: StartGateway,
    http: aiohttp.ClientSession,
    nats_client: NatsClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    function = await recorder()
    base = await start_production_like_gateway(registry_of(f=function.url))
    await ready(http, base)
    before = await disconnects(http, base, "f")

    async with partial_request(base, path, declared, sent):
        pass  # and the client is gone

    def complaints() -> list[str]:
        """Errors, warnings, and a failure blamed on the function."""
        return [
            r.getMessage()
            for r in caplog.records
            if r.levelno >= logging.WARNING or "did not answer" in r.getMessage()
        ]

    async def handled() -> bool:
        return bool(complaints()) or await disconnects(http, base, "f") == before + 1

    await wait_until(handled, DEADLINE_S, "the disconnect to be handled")
    assert not complaints()
    assert await disconnects(http, base, "f") == before + 1
    assert [r for r in caplog.records if r.levelno == logging.DEBUG and "went away" in r.message]
    assert function.requests == []
    assert await stream_message_count(nats_client) == 0


def test_the_timeout_must_be_positive() -> None:
    with pytest.raises(ValidationError, match="request_body_timeout"):
        GatewaySettings(request_body_timeout="0")
