"""How UpstreamClient reads a response's framing: chunked bodies with extensions and
trailers, bodies delimited by close, bodiless statuses, 1xx, and answers split or run together."""

import asyncio
import socket

import pytest

from tests.http.helpers import (
    OK_ANSWER,
    RawConnection,
    RawRequest,
    answer_each,
    assert_client_still_works,
    fetch,
    http_response,
    misbehave_once,
)


async def test_chunked_body_with_extensions_and_trailers_split_across_writes(raw_server, client):
    async def first(connection: RawConnection) -> None:
        await connection.next_request()
        pieces = [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Head: h\r\n\r\n",
            b"5;name=value\r\nhel",
            b"lo\r\n6\r",
            b"\n world\r\n",
            b"1a;ext\r\nabcdefghijklmnopqrstuvwxyz\r\n",
            b"0\r\nX-Trailer: t\r\n",
            b"\r\n",
        ]
        for piece in pieces:
            await connection.send(piece)
        await answer_each(OK_ANSWER)(connection)

    server = await raw_server(first)
    response, body = await fetch(client, server.url())
    assert body == b"hello worldabcdefghijklmnopqrstuvwxyz"
    assert response.headers["X-Head"] == "h"
    await assert_client_still_works(client, server.url())
    assert len(server.connections) == 1  # the trailers were read: the stream is in step


async def test_body_delimited_by_close(raw_server, client):
    async def first(connection: RawConnection) -> None:
        await connection.next_request()
        await connection.send(b"HTTP/1.1 200 OK\r\nX-Framing: none\r\n\r\npart one, ")
        await connection.send(b"part two")

    server = await raw_server(misbehave_once(first))
    response, body = await fetch(client, server.url())
    assert body == b"part one, part two"
    assert response.content_length is None
    await assert_client_still_works(client, server.url())
    assert len(server.connections) == 2


async def test_body_delimited_by_close_under_a_non_chunked_transfer_coding(raw_server, client):
    # RFC 9112 6.3: chunked not last among the transfer codings -> the body ends at the close.
    async def first(connection: RawConnection) -> None:
        await connection.next_request()
        await connection.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nnot really gzip")

    server = await raw_server(misbehave_once(first))
    _, body = await fetch(client, server.url())
    assert body == b"not really gzip"
    await assert_client_still_works(client, server.url())


async def test_head_response_has_no_body_and_the_connection_goes_on(raw_server, client):
    def respond(connection: RawConnection, request: RawRequest) -> bytes:
        if request.request_line.startswith("HEAD"):
            return b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
        return http_response(200, b"after head")

    server = await raw_server(answer_each(respond))
    response, body = await fetch(client, server.url(), "HEAD")
    assert (response.status, response.content_length, body) == (200, 1000, b"")
    response, body = await fetch(client, server.url())
    assert body == b"after head"
    assert len(server.connections) == 1


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
        b'HTTP/1.1 304 Not Modified\r\nETag: "e"\r\nContent-Length: 1000\r\n\r\n',
    ],
    ids=["204", "304"],
)
async def test_no_body_statuses_and_the_connection_goes_on(answer, raw_server, client):
    def respond(connection: RawConnection, request: RawRequest) -> bytes:
        return answer if request.request_line.startswith("GET /first") else OK_ANSWER

    server = await raw_server(answer_each(respond))
    response, body = await fetch(client, server.url("/first"))
    assert response.status in (204, 304)
    assert body == b""
    await assert_client_still_works(client, server.url("/second"))
    assert len(server.connections) == 1


@pytest.mark.parametrize("split", [False, True], ids=["one-write", "separate-writes"])
async def test_informational_responses_are_skipped(split, raw_server, client):
    pieces = [
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
        b"HTTP/1.1 201 Created\r\nX-Real: yes\r\nContent-Length: 4\r\n\r\nreal",
    ]

    async def first(connection: RawConnection) -> None:
        await connection.next_request()
        for piece in pieces if split else [b"".join(pieces)]:
            await connection.send(piece)
        await answer_each(OK_ANSWER)(connection)

    server = await raw_server(first)
    response, body = await fetch(client, server.url(), "POST", body=b"up")
    assert (response.status, response.reason, body) == (201, "Created", b"real")
    assert list(response.headers.items()) == [("X-Real", "yes"), ("Content-Length", "4")]
    await assert_client_still_works(client, server.url())
    assert len(server.connections) == 1


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_response_split_byte_by_byte(chunked, raw_server, client):
    if chunked:
        answer = b"HTTP/1.1 200 Fine Indeed\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n\r\n"
        answer += b"4;x=y\r\nfine\r\n3\r\n!!!\r\n0\r\nX-T: 1\r\n\r\n"
    else:
        answer = http_response(200, b"fine!!!", [("X-A", "b")], reason="Fine Indeed")

    async def first(connection: RawConnection) -> None:
        await connection.next_request()
        connection.writer.transport.get_extra_info("socket").setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
        )
        for index in range(len(answer)):
            await connection.send(answer[index : index + 1])
            await asyncio.sleep(0)  # pacing: let the client read each byte on its own
        await answer_each(OK_ANSWER)(connection)

    server = await raw_server(first)
    response, body = await fetch(client, server.url())
    assert (response.status, response.reason, body) == (200, "Fine Indeed", b"fine!!!")
    assert response.headers["X-A"] == "b"
    await assert_client_still_works(client, server.url())
    assert len(server.connections) == 1


async def test_second_response_in_the_same_read_does_not_replace_the_first(raw_server, client):
    async def first(connection: RawConnection) -> None:
        await connection.next_request()
        await connection.send(
            http_response(200, b"ok", [("X-First", "1")])
            + http_response(500, b"", [("X-Second", "1")], reason="Unasked")
        )
        await answer_each(OK_ANSWER)(connection)

    server = await raw_server(misbehave_once(first))
    response, body = await fetch(client, server.url())
    assert (response.status, response.reason, body) == (200, "OK", b"ok")
    assert "X-Second" not in response.headers
    assert response.headers.getall("Content-Length") == ["2"]
    # The stream is out of step: the connection is not used again.
    await server.connections[0].wait_closed_by_client()
    await assert_client_still_works(client, server.url())
    assert len(server.connections) == 2
