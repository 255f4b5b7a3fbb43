"""UpstreamClient's pooled keep-alive connections: when one is reused, when it is retired,
and what happens to a request a server closes a kept-alive connection under."""

import asyncio
import time

import pytest
from aiohttp import web

from faas_gateway.http.client import UpstreamDisconnectedError
from tests.harness import wait_until
from tests.http.helpers import (
    DEADLINE_S,
    LONG,
    OK_ANSWER,
    RawConnection,
    RawHandler,
    answer_each,
    assert_client_still_works,
    echo,
    event_set,
    fetch,
    http_response,
    idle_connections,
    misbehave_once,
)


async def test_sequential_requests_reuse_one_connection(serve, client):
    server = await serve(echo)
    for index in range(5):
        _, body = await fetch(client, server.url(f"/{index}"), "POST", body=b"x")
        assert body == b"POST /%d x" % index
    assert len(server.peers) == 5
    assert server.connection_count == 1


async def test_sequential_requests_reuse_one_raw_connection(raw_server, client):
    server = await raw_server(answer_each(OK_ANSWER))
    for _ in range(3):
        await fetch(client, server.url())
    assert len(server.connections) == 1
    assert len(server.connections[0].requests) == 3


async def test_concurrent_requests_get_their_own_connections_and_answers(serve, client):
    async def handler(request: web.Request) -> web.StreamResponse:
        arrived.append(request.path)
        if len(arrived) == 10:
            all_arrived.set()
        await event_set(all_arrived)  # every request is in flight at once
        return web.Response(body=request.path.encode())

    arrived: list[str] = []
    all_arrived = asyncio.Event()
    server = await serve(handler)
    results = await asyncio.gather(*(fetch(client, server.url(f"/{i}")) for i in range(10)))
    assert [body for _, body in results] == [f"/{i}".encode() for i in range(10)]
    assert server.connection_count == 10
    assert len(idle_connections(client)) == 10
    await fetch(client, server.url("/after"))
    assert server.connection_count == 10  # the next request took a pooled one


@pytest.mark.parametrize(
    "answer",
    [
        http_response(200, b"fine", [("Connection", "close")]),
        b"HTTP/1.0 200 OK\r\nContent-Length: 4\r\n\r\nfine",
    ],
    ids=["connection-close", "http-1.0"],
)
async def test_response_that_ends_keep_alive_is_not_reused(answer, raw_server, client):
    # The server keeps the connection open regardless: only the client can close it.
    server = await raw_server(misbehave_once(answer_each(answer)))
    _, body = await fetch(client, server.url())
    assert body == b"fine"
    await server.connections[0].wait_closed_by_client()
    await assert_client_still_works(client, server.url())
    assert len(server.connections) == 2


async def test_response_not_read_to_the_end_is_not_reused(raw_server, client):
    async def first_with_length(connection: RawConnection) -> None:
        await connection.next_request()
        await connection.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        await connection.until_closed_by_client()

    server = await raw_server(misbehave_once(first_with_length))
    response = await client.request("GET", server.url(), [], None, LONG)
    assert response.status == 200
    chunks = response.chunks()
    assert await anext(chunks) == b"x" * 10
    await chunks.aclose()
    response.release()
    await server.connections[0].wait_closed_by_client()
    assert idle_connections(client) == []
    await assert_client_still_works(client, server.url())
    assert len(server.connections) == 2


async def test_connection_closed_by_server_while_idle_is_not_reused(raw_server, client):
    pooled = asyncio.Event()

    async def first(connection: RawConnection) -> None:
        await connection.next_request()
        await connection.send(OK_ANSWER)
        await event_set(pooled)
        # ... and the handler ends: the server closes the idle connection.

    server = await raw_server(misbehave_once(first))
    await assert_client_still_works(client, server.url())
    [idle] = idle_connections(client)
    pooled.set()
    await wait_until(lambda: idle.closed, DEADLINE_S, "the client to see the close")
    await assert_client_still_works(client, server.url())
    assert len(server.connections) == 2


async def test_bytes_arriving_on_an_idle_connection_retire_it(raw_server, client):
    pooled = asyncio.Event()

    async def first(connection: RawConnection) -> None:
        await connection.next_request()
        await connection.send(OK_ANSWER)
        await event_set(pooled)
        await connection.send(http_response(500, b"nobody asked"))
        await connection.until_closed_by_client()

    server = await raw_server(misbehave_once(first))
    await assert_client_still_works(client, server.url())
    [idle] = idle_connections(client)
    pooled.set()
    await server.connections[0].wait_closed_by_client()
    assert idle.closed
    await assert_client_still_works(client, server.url())
    assert len(server.connections) == 2


async def test_idle_connection_older_than_keepalive_is_not_reused(raw_server, make_client):
    keepalive_s = 0.2
    client = make_client(keepalive_s=keepalive_s)
    server = await raw_server(answer_each(OK_ANSWER))
    await fetch(client, server.url())
    released_at = time.monotonic()
    await wait_until(
        lambda: time.monotonic() - released_at > 2 * keepalive_s,
        DEADLINE_S,
        "the idle connection to outlive keepalive_s",
    )
    await fetch(client, server.url())
    assert len(server.connections) == 2
    await server.connections[0].wait_closed_by_client()
    assert not server.connections[1].closed_by_client.is_set()


async def test_expired_idle_connections_of_other_hosts_are_swept(raw_server, make_client):
    keepalive_s = 0.2
    client = make_client(keepalive_s=keepalive_s)
    quiet = await raw_server(answer_each(OK_ANSWER))
    busy = await raw_server(answer_each(OK_ANSWER))
    await fetch(client, quiet.url())
    released_at = time.monotonic()
    await wait_until(
        lambda: time.monotonic() - released_at > 2 * keepalive_s,
        DEADLINE_S,
        "the idle connection to outlive keepalive_s",
    )
    await fetch(client, busy.url())  # a release: the moment idle connections are swept
    await quiet.connections[0].wait_closed_by_client()
    assert len(idle_connections(client)) == 1


async def test_close_closes_idle_connections(raw_server, client):
    server = await raw_server(answer_each(OK_ANSWER))
    await fetch(client, server.url())
    await fetch(client, server.url())
    assert not server.connections[0].closed_by_client.is_set()
    await client.close()
    await server.connections[0].wait_closed_by_client()
    assert idle_connections(client) == []


async def test_connection_released_after_close_is_not_pooled(raw_server, client):
    server = await raw_server(answer_each(OK_ANSWER))
    response = await client.request("GET", server.url(), [], None, LONG)
    await client.close()
    assert await response.read() == b"fine"
    response.release()
    await server.connections[0].wait_closed_by_client()
    assert idle_connections(client) == []


# --- the keep-alive race ----------------------------------------------------------------------


def closes_kept_alive_connection_on_second_request() -> RawHandler:
    """First connection: answers one request, then takes the next and closes without a word,
    as a server does that closes an idle keep-alive connection just as a request arrives.
    Later connections answer normally."""
    ordinary = answer_each(OK_ANSWER)

    async def handler(connection: RawConnection) -> None:
        if connection.index > 0:
            await ordinary(connection)
            return
        await connection.next_request()
        await connection.send(OK_ANSWER)
        await connection.next_request()

    return handler


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE"])
async def test_idempotent_request_lost_on_a_kept_alive_connection_is_sent_again(
    method, raw_server, client
):
    server = await raw_server(closes_kept_alive_connection_on_second_request())
    await fetch(client, server.url())
    response, _ = await fetch(client, server.url("/again"), method)
    assert response.status == 200
    assert len(server.connections) == 2
    assert server.connections[1].requests[0].request_line == f"{method} /again HTTP/1.1"


async def test_post_lost_on_a_kept_alive_connection_is_not_sent_again(raw_server, client):
    server = await raw_server(closes_kept_alive_connection_on_second_request())
    await fetch(client, server.url())
    with pytest.raises(UpstreamDisconnectedError):
        await fetch(client, server.url("/again"), "POST", body=b"once")
    assert len(server.connections) == 1  # no second attempt anywhere
    await assert_client_still_works(client, server.url())


async def test_request_lost_on_a_new_connection_is_not_sent_again(raw_server, client):
    async def takes_and_closes(connection: RawConnection) -> None:
        await connection.next_request()

    server = await raw_server(takes_and_closes)
    with pytest.raises(UpstreamDisconnectedError):
        await fetch(client, server.url())
    assert len(server.connections) == 1
