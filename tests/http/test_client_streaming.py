"""UpstreamClient streams both ways: bodies arrive and leave as they are produced and a slow
reader or writer is flow controlled, proven by handshakes and buffer sizes, never by how long
something took; and how timeouts apply to a streamed upload."""

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest
from aiohttp import web
from yarl import URL

from faas_gateway.http.client import (
    _HIGH_WATER_BYTES,
    Timeouts,
    UpstreamDisconnectedError,
    UpstreamResponse,
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
    connection_of,
    event_set,
    fetch,
    http_response,
    idle_connections,
    large_body,
    misbehave_once,
)


async def test_headers_and_body_parts_arrive_as_they_are_sent(serve, client):
    first_part_seen = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"X-Stream": "yes"})
        await response.prepare(request)
        await event_set(headers_seen)
        await response.write(b"part one")
        await event_set(first_part_seen)
        await response.write(b"part two")
        await response.write_eof()
        return response

    headers_seen = asyncio.Event()
    server = await serve(handler)
    async with await client.request("GET", server.url(), [], None, LONG) as response:
        # Neither waits for the rest: each would deadlock the handler if it did.
        assert response.headers["X-Stream"] == "yes"
        headers_seen.set()
        chunks = response.chunks()
        assert await asyncio.wait_for(anext(chunks), DEADLINE_S) == b"part one"
        first_part_seen.set()
        assert b"".join([chunk async for chunk in chunks]) == b"part two"


def socket_buffer_ceiling() -> int:
    """The most the kernel may hold for one loopback connection, both ends together."""
    total = 0
    for name in ("tcp_rmem", "tcp_wmem"):
        try:
            total += int(Path(f"/proc/sys/net/ipv4/{name}").read_text().split()[2])
        except (OSError, ValueError, IndexError):
            total += 16 * MIB
    return total


class Firehose(asyncio.Protocol):
    """Answers one request with a large body, written only while the transport asks for more."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.sent = 0
        self.paused = False
        self.transport: asyncio.Transport | None = None
        self._head = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._head += data
        if self.sent == 0 and b"\r\n\r\n" in self._head:
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(self.body))
            self._pump()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._pump()

    def _pump(self) -> None:
        assert self.transport is not None
        while not self.paused and self.sent < len(self.body):
            piece = self.body[self.sent : self.sent + 256 * 1024]
            self.sent += len(piece)
            self.transport.write(piece)

    @property
    def done(self) -> bool:
        return self.sent == len(self.body)


async def test_slowly_read_large_response_is_not_buffered(client):
    """While the caller reads nothing, the client stops reading the socket once a bounded
    amount is buffered, and TCP holds the server back: the body does not pile up in memory."""
    size = max(20 * MIB, socket_buffer_ceiling() + 8 * MIB)
    body = large_body(size)
    bound = 4 * _HIGH_WATER_BYTES
    firehoses: list[Firehose] = []

    def factory() -> Firehose:
        firehoses.append(Firehose(body))
        return firehoses[-1]

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    response: UpstreamResponse | None = None
    try:
        response = await client.request("GET", URL(f"http://127.0.0.1:{port}/"), [], None, LONG)
        connection = connection_of(response)
        transport = connection.transport
        assert transport is not None
        [firehose] = firehoses

        def held_back() -> bool:
            # The client no longer reads and the server can no longer write: a steady state
            # only flow control reaches. Without it the server would run on to the end.
            return (not transport.is_reading() and firehose.paused) or firehose.done

        await wait_until(held_back, DEADLINE_S, "the server to be held back")
        assert not firehose.done
        assert connection._buffered_bytes <= bound
        digest, received, most_buffered = hashlib.sha256(), 0, 0
        async for chunk in response.chunks():
            digest.update(chunk)
            received += len(chunk)
            most_buffered = max(most_buffered, connection._buffered_bytes)
            if received >= size // 2 and received - len(chunk) < size // 2:
                # Halfway, stop reading again until the server is held back once more (or,
                # if the kernel could hold all the rest, has sent it all).
                await wait_until(held_back, DEADLINE_S, "the server to be held back again")
                assert connection._buffered_bytes <= bound
        assert received == size
        assert digest.digest() == hashlib.sha256(body).digest()
        assert most_buffered <= bound
    finally:
        if response is not None:
            response.release()
        for firehose in firehoses:
            if firehose.transport is not None:
                firehose.transport.close()
        server.close()
        await server.wait_closed()


async def test_large_unread_response_whose_end_paused_reading_does_not_stall_the_next(
    raw_server, client
):
    """The read that completes a response may be the one that pauses reading; left unread and
    pooled, such a connection must still read the next response."""
    tail_sent = asyncio.Event()

    async def first(connection: RawConnection) -> None:
        await connection.next_request()
        length = _HIGH_WATER_BYTES + 10
        await connection.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % length)
        await connection.send(b"a" * _HIGH_WATER_BYTES)  # exactly the high-water mark
        await event_set(head_buffered)
        await connection.send(b"b" * 10)  # one small read: over the mark and complete
        tail_sent.set()
        await answer_each(OK_ANSWER)(connection)

    head_buffered = asyncio.Event()
    server = await raw_server(first)
    response = await client.request("GET", server.url(), [], None, LONG)
    connection = connection_of(response)
    await wait_until(
        lambda: connection._buffered_bytes == _HIGH_WATER_BYTES, DEADLINE_S, "the first part"
    )
    head_buffered.set()
    await wait_until(lambda: connection.complete, DEADLINE_S, "the response to complete")
    response.release()  # unread
    await assert_client_still_works(client, server.url())


async def test_streamed_request_body_goes_chunked(raw_server, client):
    server = await raw_server(answer_each(OK_ANSWER))

    async def body() -> AsyncIterator[bytes]:
        yield b"abc"
        yield b""  # an empty piece must not end the chunked body early
        yield b"defghijklmnopqrstu"

    await fetch(client, server.url("/up"), "POST", [("X-A", "1")], body())
    await assert_client_still_works(client, server.url())
    first = server.requests[0]
    assert first.header_values("Transfer-Encoding") == ["chunked"]
    assert first.header_values("Content-Length") == []
    assert first.wire_body == b"3\r\nabc\r\n12\r\ndefghijklmnopqrstu\r\n0\r\n\r\n"
    assert len(server.connections) == 1


async def test_streamed_request_body_with_callers_length_goes_raw(raw_server, client):
    server = await raw_server(answer_each(OK_ANSWER))

    async def body() -> AsyncIterator[bytes]:
        yield b"abc"
        yield b"defg"

    await fetch(client, server.url(), "PUT", [("Content-Length", "7")], body())
    await assert_client_still_works(client, server.url())
    first = server.requests[0]
    assert first.header_values("Content-Length") == ["7"]
    assert first.header_values("Transfer-Encoding") == []
    assert first.wire_body == b"abcdefg"
    assert len(server.connections) == 1


async def test_streamed_request_body_is_sent_as_it_is_produced(serve, client):
    first_part_arrived = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        received = await request.content.readexactly(len(b"part one"))
        first_part_arrived.set()
        received += await request.content.read()
        return web.Response(body=received)

    async def body() -> AsyncIterator[bytes]:
        yield b"part one"
        await event_set(first_part_arrived)  # deadlocks if the client held the part back
        yield b"part two"

    server = await serve(handler)
    _, received = await fetch(client, server.url(), "POST", body=body())
    assert received == b"part onepart two"


async def test_large_streamed_upload_to_a_slow_reader_is_flow_controlled(serve, client):
    size, piece = 50 * MIB, MIB

    async def handler(request: web.Request) -> web.StreamResponse:
        digest, received = hashlib.sha256(), 0
        while data := await request.content.read(16 * 1024):  # small reads: a slow reader
            digest.update(data)
            received += len(data)
        return web.Response(text=f"{received} {digest.hexdigest()}")

    server = await serve(handler)
    await fetch(client, server.url("/warm-up"))
    [connection] = idle_connections(client)  # the upload will take this one
    assert connection.transport is not None
    transport = connection.transport
    sent_digest, write_buffer_sizes = hashlib.sha256(), []

    async def body() -> AsyncIterator[bytes]:
        for index in range(size // piece):
            # The client asks for the next piece only once the last has (mostly) gone out.
            write_buffer_sizes.append(transport.get_write_buffer_size())
            data = large_body(size)[index * piece : (index + 1) * piece]
            sent_digest.update(data)
            yield data

    _, answer = await fetch(client, server.url("/up"), "POST", body=body())
    assert answer == f"{size} {sent_digest.hexdigest()}".encode()
    assert len(write_buffer_sizes) == size // piece
    assert max(write_buffer_sizes) <= piece
    assert server.connection_count == 1


async def test_slow_streamed_upload_does_not_count_against_the_read_timeout(serve, client):
    read_s = 1.0
    first_part_arrived = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        received = await request.content.readexactly(len(b"part one"))
        first_part_arrived.set()
        received += await request.content.read()
        return web.Response(body=received)

    async def body() -> AsyncIterator[bytes]:
        yield b"part one"
        await event_set(first_part_arrived)
        began = time.monotonic()
        await wait_until(
            lambda: time.monotonic() - began > 1.5 * read_s, DEADLINE_S, "the upload to drag on"
        )
        yield b"part two"

    server = await serve(handler)
    timeouts = Timeouts(connect_s=DEADLINE_S, read_s=read_s, total_s=3 * DEADLINE_S)
    response, received = await fetch(client, server.url(), "POST", body=body(), timeouts=timeouts)
    assert (response.status, received) == (200, b"part onepart two")


async def test_read_timeout_starts_once_a_streamed_upload_is_sent(raw_server, client):
    async def first(connection: RawConnection) -> None:
        await connection.next_request()
        await connection.until_closed_by_client()  # the whole body read, and no answer

    async def body() -> AsyncIterator[bytes]:
        yield b"all of it"

    server = await raw_server(misbehave_once(first))
    timeouts = Timeouts(connect_s=DEADLINE_S, read_s=SHORT_READ_S, total_s=None)
    with pytest.raises(UpstreamTimeoutError):
        await client.request("POST", server.url(), [], body(), timeouts)
    await server.connections[0].wait_closed_by_client()
    assert server.requests[0].body == b"all of it"
    await assert_client_still_works(client, server.url())


async def test_total_timeout_bounds_a_stalled_streamed_upload(raw_server, client):
    never = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"the start"
        await never.wait()  # the caller's source stalls: only total_s can end this
        yield b"never sent"

    async def first(connection: RawConnection) -> None:
        await connection.reader.readuntil(b"\r\n\r\n")
        await connection.until_closed_by_client()

    server = await raw_server(misbehave_once(first))
    timeouts = Timeouts(connect_s=DEADLINE_S, read_s=DEADLINE_S, total_s=SHORT_READ_S)
    with pytest.raises(UpstreamTimeoutError):
        async with asyncio.timeout(DEADLINE_S):  # were total_s ignored, this would never end
            await client.request("POST", server.url(), [], body(), timeouts)
    await server.connections[0].wait_closed_by_client()
    await assert_client_still_works(client, server.url())


async def test_failing_request_body_source_breaks_the_request(raw_server, client):
    async def body() -> AsyncIterator[bytes]:
        yield b"the start"
        raise RuntimeError("the caller's client went away")

    async def first(connection: RawConnection) -> None:
        await connection.reader.readuntil(b"\r\n\r\n")
        await connection.until_closed_by_client()

    server = await raw_server(misbehave_once(first))
    with pytest.raises(UpstreamDisconnectedError, match="request body broke off"):
        await client.request("POST", server.url(), [], body(), LONG)
    await server.connections[0].wait_closed_by_client()
    await assert_client_still_works(client, server.url())


async def test_server_gone_mid_upload_breaks_the_request_and_stops_the_body(raw_server, client):
    pieces = 1000
    pulled = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal pulled
        for _ in range(pieces):
            pulled += 1
            yield b"u" * MIB

    async def first(connection: RawConnection) -> None:
        await connection.reader.readuntil(b"\r\n\r\n")
        await connection.reader.readexactly(MIB // 2)
        reset_connection(connection.writer)

    server = await raw_server(misbehave_once(first))
    with pytest.raises(UpstreamDisconnectedError):
        await client.request("POST", server.url(), [], body(), LONG)
    assert pulled < pieces  # the rest of the body was not pulled from its source
    await assert_client_still_works(client, server.url())


async def test_early_response_during_a_streamed_upload(raw_server, client):
    body_ended = asyncio.Event()
    ending: list[BaseException | None] = []
    never = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        try:
            yield b"a" * 1000
            await never.wait()  # more would come, but the server has answered already
            yield b"never sent"
        except BaseException as exc:
            ending.append(exc)
            raise
        finally:
            body_ended.set()

    async def first(connection: RawConnection) -> None:
        await connection.reader.readuntil(b"\r\n\r\n")
        await connection.reader.readexactly(100)
        await connection.send(http_response(413, b"too large", reason="Payload Too Large"))
        await connection.until_closed_by_client()

    server = await raw_server(misbehave_once(first))
    response, answer = await fetch(client, server.url(), "POST", body=body())
    assert (response.status, response.reason, answer) == (413, "Payload Too Large", b"too large")
    await event_set(body_ended)
    assert len(ending) == 1 and isinstance(ending[0], asyncio.CancelledError | GeneratorExit)
    await server.connections[0].wait_closed_by_client()
    await assert_client_still_works(client, server.url())
    assert len(server.connections) == 2
