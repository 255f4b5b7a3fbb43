"""How UpstreamClient fails: refused and unknown hosts, timeouts, connections that end early,
answers that are not HTTP; and that a failure never poisons the pool."""

import asyncio
import contextlib
import select
import socket
import sys
import time

import pytest
from aiohttp import web
from yarl import URL

from faas_gateway.http.client import (
    Timeouts,
    UpstreamConnectError,
    UpstreamDisconnectedError,
    UpstreamError,
    UpstreamInvalidResponseError,
    UpstreamTimeoutError,
)
from tests.harness import reset_connection, wait_until
from tests.http.helpers import (
    DEADLINE_S,
    LONG,
    MIB,
    OK_ANSWER,
    SHORT_READ_S,
    RawConnection,
    answer_each,
    assert_client_still_works,
    event_set,
    fetch,
    http_response,
    large_body,
    misbehave_once,
)


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


async def test_each_exchange_on_a_kept_alive_connection_keeps_its_own_read_timeout(serve, client):
    """The read timer is one per connection, moved on lazily: an exchange that answers after
    the deadline of the one before it on the same connection is not cut short by that
    deadline, and an exchange with a shorter read timeout than the one before it still
    times out at its own."""
    answered_late = asyncio.Event()
    never = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.query.get("answer") == "late":
            # Past the first exchange's read deadline, well inside this one's.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(answered_late.wait(), 3 * SHORT_READ_S)
        elif request.query.get("answer") == "never":
            await never.wait()
        return web.Response(text="ok")

    server = await serve(handler)
    short = Timeouts(connect_s=DEADLINE_S, read_s=SHORT_READ_S, total_s=None)
    long = Timeouts(connect_s=DEADLINE_S, read_s=DEADLINE_S, total_s=None)
    async with asyncio.timeout(DEADLINE_S / 2):  # were a later wait's timer kept, 10 s
        response, body = await fetch(client, server.url(), timeouts=short)
        assert (response.status, body) == (200, b"ok")
        response, body = await fetch(client, server.url().with_query(answer="late"), timeouts=long)
        assert (response.status, body) == (200, b"ok")
        with pytest.raises(UpstreamTimeoutError):
            await client.request("GET", server.url().with_query(answer="never"), [], None, short)
    assert len(server.peers) == 3 and server.connection_count == 1
    never.set()
