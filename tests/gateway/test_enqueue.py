"""The gateway's side of async calls: what POST /async-function/... accepts and queues in
JetStream, what it refuses, and how it answers while the queue is down. Real nats-server and
gateway; the stream is read directly to see what was queued.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy
from nats.aio.client import Client as NatsClient
from nats.js.api import RawStreamMsg

from faas_gateway.core.call import SCHEMA_VERSION, QueuedCall
from tests.conftest import RunningGateway, ready_gateway, stream_message_count
from tests.harness import (
    DEADLINE_S,
    STREAM,
    post_accepted,
    raw_url,
    registry_of,
    sample,
    samples_named,
    scrape,
    stream_state,
    wait_until,
)

SUBJECT_PREFIX = "faas.async"


# helpers


async def status_of(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url) as response:
        await response.read()
        return response.status


async def post_rejected(
    http: aiohttp.ClientSession,
    url: str,
    status: int,
    *,
    method: str = "POST",
    data: Any = b"",
    headers: Any = None,
) -> tuple[dict[str, Any], CIMultiDictProxy[str]]:
    """Send a request that must get ``status`` as a JSON error; the payload and headers."""
    async with http.request(method, url, data=data, headers=headers or {}) as response:
        assert response.status == status, await response.text()
        assert response.content_type == "application/json"
        payload = await response.json()
        response_headers = response.headers
    assert set(payload) == {"error", "callId"}
    assert isinstance(payload["error"], str) and payload["error"]
    assert payload["callId"] == response_headers.get("X-Call-Id")
    return payload, response_headers


async def stored_messages(nats_client: NatsClient) -> list[RawStreamMsg]:
    """Every message still in the stream, oldest first (only meaningful with no worker)."""
    state = await stream_state(nats_client)
    js = nats_client.jetstream()
    return [await js.get_msg(STREAM, seq) for seq in range(state.first_seq, state.last_seq + 1)]


async def assert_nothing_enqueued_then_control(
    http: aiohttp.ClientSession, gateway: RunningGateway, nats_client: NatsClient
) -> None:
    """No rejected request reached the stream: a control call after them is message number one.

    The control's ack comes after anything the gateway had published before it, so once it is
    accepted the stream shows every earlier publish too.
    """
    assert await stream_message_count(nats_client) == 0
    control = await post_accepted(http, gateway)
    state = await stream_state(nats_client)
    assert (state.messages, state.last_seq) == (1, 1)
    [stored] = await stored_messages(nats_client)
    assert QueuedCall.decode(stored.data or b"").call_id == control


# gateway: what is accepted, what is queued


async def test_accepted_call_is_stored_before_202_with_every_field(
    nats_client, recorder, start_gateway, http
):
    function = await recorder()
    gateway = await ready_gateway(start_gateway, http, registry_of(echo=function.url))

    async with http.post(
        raw_url(gateway, "/async-function/echo/sub/a%2Fb%20c?x=1&y=%2F&z=a+b&v=%7E"),
        data=b"line one\nline two\x00\xff",
        headers=[
            ("X-Callback-Url", "http://127.0.0.1:1/cb?token=t"),
            ("Content-Type", "application/x-test"),
            ("X-Custom", "custom value"),
            ("X-Multi", "first"),
            ("X-Multi", "second"),
        ],
    ) as response:
        assert response.status == 202
        payload = await response.json()
        call_id = response.headers["X-Call-Id"]
        start_time_ns = int(response.headers["X-Start-Time"])
        # Counted right away, not polled: the 202 must come after the publish ack.
        assert await stream_message_count(nats_client) == 1
    assert payload == {"callId": call_id}

    [stored] = await stored_messages(nats_client)
    assert stored.subject == f"{SUBJECT_PREFIX}.default.echo"
    assert (stored.headers or {}).get("Nats-Msg-Id") == call_id
    queued = QueuedCall.decode(stored.data or b"")
    assert queued.schema_version == SCHEMA_VERSION
    assert queued.call_id == call_id
    assert queued.function == "echo"
    assert queued.method == "POST"
    assert queued.path == "/sub/a%2Fb%20c"
    assert queued.query == "x=1&y=%2F&z=a+b&v=%7E"
    assert queued.body == b"line one\nline two\x00\xff"
    assert queued.callback_url == "http://127.0.0.1:1/cb?token=t"
    assert queued.accepted_at_ns == start_time_ns
    names = [name.lower() for name, _ in queued.headers]
    assert ("Content-Type", "application/x-test") in queued.headers
    assert ("X-Custom", "custom value") in queued.headers
    assert [value for name, value in queued.headers if name == "X-Multi"] == ["first", "second"]
    # The client's connection to the gateway is not part of the call.
    assert "host" not in names
    assert "content-length" not in names


async def test_call_without_subpath_or_callback_is_queued_as_such(
    nats_client, recorder, start_gateway, http
):
    function = await recorder()
    gateway = await ready_gateway(start_gateway, http, registry_of(echo=function.url))

    call_id = await post_accepted(http, gateway, "/async-function/echo", data=b"x")

    [stored] = await stored_messages(nats_client)
    queued = QueuedCall.decode(stored.data or b"")
    assert (queued.call_id, queued.path, queued.query, queued.callback_url) == (
        call_id,
        "",
        "",
        None,
    )


async def test_same_call_id_and_request_is_queued_once_another_request_is_a_409(
    nats_client, recorder, start_gateway, http
):
    function = await recorder()
    gateway = await ready_gateway(start_gateway, http, registry_of(echo=function.url))

    first = await post_accepted(http, gateway, data=b"one", headers={"X-Call-Id": "order-42"})
    again = await post_accepted(http, gateway, data=b"one", headers={"X-Call-Id": "order-42"})
    async with http.post(
        gateway.url("/async-function/echo"), data=b"two", headers={"X-Call-Id": "order-42"}
    ) as response:
        assert response.status == 409
        error = await response.json()
    other = await post_accepted(http, gateway, data=b"three")

    assert first == again == "order-42"
    assert "order-42" in error["error"] and "another call" in error["error"]
    state = await stream_state(nats_client)
    assert (state.messages, state.last_seq) == (2, 2)
    stored = [QueuedCall.decode(msg.data or b"") for msg in await stored_messages(nats_client)]
    assert [(call.call_id, call.body) for call in stored] == [
        ("order-42", b"one"),
        (other, b"three"),
    ]


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "OPTIONS"])
async def test_methods_other_than_post_get_405_with_allow(
    method, nats_client, recorder, start_gateway, http
):
    function = await recorder()
    gateway = await ready_gateway(start_gateway, http, registry_of(echo=function.url))

    _, headers = await post_rejected(
        http, gateway.url("/async-function/echo/sub"), 405, method=method, data=b"body"
    )

    assert headers["Allow"] == "POST"
    await assert_nothing_enqueued_then_control(http, gateway, nats_client)


async def test_unknown_function_gets_404_and_invalid_names_400(
    nats_client, recorder, start_gateway, http
):
    function = await recorder()
    gateway = await ready_gateway(start_gateway, http, registry_of(echo=function.url))

    payload, _ = await post_rejected(
        http,
        gateway.url("/async-function/missing"),
        404,
        headers={"X-Call-Id": "my-call"},
    )
    assert payload["callId"] == "my-call"
    assert "missing" in payload["error"]
    for bad_name in ("-starts-with-dash", "a" * 64, "bad%20name", "bad$name"):
        await post_rejected(http, gateway.url(f"/async-function/{bad_name}"), 400)

    await assert_nothing_enqueued_then_control(http, gateway, nats_client)


async def test_dot_segments_after_the_function_name_are_400(
    nats_client, recorder, start_gateway, http
):
    function = await recorder()
    gateway = await ready_gateway(start_gateway, http, registry_of(echo=function.url))

    for path in ("/..", "/../admin", "/a/%2e%2E/%2e%2e/admin", "/.%2e%2fadmin", "/./x"):
        payload, _ = await post_rejected(http, raw_url(gateway, "/async-function/echo" + path), 400)
        assert "'..'" in payload["error"]

    await assert_nothing_enqueued_then_control(http, gateway, nats_client)


@pytest.mark.parametrize(
    "callback_url",
    [
        "ftp://x",
        "/relative",
        "relative/path",
        "http://",
        "http://host:99999",
        "http://host:port",
        "https:///no-host",
        "",
        "http://[::1",  # unclosed IPv6 bracket
        "http://a..b/",  # a host name the worker's client could never encode
        "http://" + "a" * 64 + ".example/",
    ],
)
async def test_invalid_callback_url_gets_400(
    callback_url, nats_client, recorder, start_gateway, http
):
    function = await recorder()
    gateway = await ready_gateway(start_gateway, http, registry_of(echo=function.url))

    payload, _ = await post_rejected(
        http,
        gateway.url("/async-function/echo"),
        400,
        data=b"body",
        headers={"X-Callback-Url": callback_url},
    )

    assert "X-Callback-Url" in payload["error"]
    await assert_nothing_enqueued_then_control(http, gateway, nats_client)


@pytest.mark.parametrize(
    "callback_url", ["http://127.0.0.1:8000/cb", "https://hooks.example/x?y=1", "http://[::1]:81/"]
)
async def test_absolute_http_callback_urls_are_accepted(
    callback_url, nats_client, recorder, start_gateway, http
):
    function = await recorder()
    gateway = await ready_gateway(start_gateway, http, registry_of(echo=function.url))

    await post_accepted(http, gateway, headers={"X-Callback-Url": callback_url})

    [stored] = await stored_messages(nats_client)
    assert QueuedCall.decode(stored.data or b"").callback_url == callback_url


async def test_invalid_call_id_gets_400(nats_client, recorder, start_gateway, http):
    function = await recorder()
    gateway = await ready_gateway(start_gateway, http, registry_of(echo=function.url))

    for bad_id in ("has space", "-leading-dash", "x" * 129, "semi;colon", "a..b", "end."):
        payload, _ = await post_rejected(
            http, gateway.url("/async-function/echo"), 400, headers={"X-Call-Id": bad_id}
        )
        # Never echoed into headers and logs (post_rejected: the body's callId is the header's).
        assert payload["callId"] != bad_id

    await assert_nothing_enqueued_then_control(http, gateway, nats_client)


async def test_body_over_limit_with_content_length_gets_413(
    nats_client, recorder, start_gateway, http
):
    function = await recorder()
    gateway = await ready_gateway(
        start_gateway, http, registry_of(echo=function.url), max_async_body_bytes=16
    )

    payload, _ = await post_rejected(http, gateway.url("/async-function/echo"), 413, data=b"x" * 17)

    assert "16" in payload["error"]
    await assert_nothing_enqueued_then_control(http, gateway, nats_client)
    # The limit itself is allowed.
    call_id = await post_accepted(http, gateway, data=b"y" * 16)
    stored = await stored_messages(nats_client)
    assert QueuedCall.decode(stored[-1].data or b"").call_id == call_id
    assert QueuedCall.decode(stored[-1].data or b"").body == b"y" * 16


async def test_declared_oversize_body_is_refused_before_it_arrives(
    nats_client, recorder, start_gateway, http
):
    function = await recorder()
    gateway = await ready_gateway(
        start_gateway, http, registry_of(echo=function.url), max_async_body_bytes=16
    )
    assert gateway.server.port is not None

    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.server.port)
    try:
        # Most of the declared body never comes: only a check of Content-Length can answer.
        writer.write(
            b"POST /async-function/echo HTTP/1.1\r\nHost: gateway\r\n"
            b"Content-Length: 1000000\r\n\r\n" + b"x" * 10
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE_S)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    assert status_line.startswith("HTTP/1.1 413 ")
    assert "content-type: application/json" in {line.lower() for line in header_lines}
    await assert_nothing_enqueued_then_control(http, gateway, nats_client)


async def test_chunked_body_over_limit_gets_413(nats_client, recorder, start_gateway, http):
    function = await recorder()
    gateway = await ready_gateway(
        start_gateway, http, registry_of(echo=function.url), max_async_body_bytes=16
    )

    async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    await post_rejected(
        http, gateway.url("/async-function/echo"), 413, data=chunks(b"a" * 10, b"b" * 10)
    )

    await assert_nothing_enqueued_then_control(http, gateway, nats_client)
    # A chunked body within the limit arrives whole.
    await post_accepted(http, gateway, data=chunks(b"c" * 8, b"d" * 8))
    stored = await stored_messages(nats_client)
    assert QueuedCall.decode(stored[-1].data or b"").body == b"c" * 8 + b"d" * 8


async def test_default_body_limit_leaves_room_for_the_envelope(
    nats_client, recorder, start_gateway, http
):
    function = await recorder()
    gateway = await ready_gateway(start_gateway, http, registry_of(echo=function.url))
    # nats-server's default max_payload is 1 MiB; the gateway keeps 64 KiB for the envelope.
    limit_bytes = 1024 * 1024 - 64 * 1024

    await post_rejected(
        http, gateway.url("/async-function/echo"), 413, data=b"z" * (limit_bytes + 1)
    )

    await assert_nothing_enqueued_then_control(http, gateway, nats_client)
    await post_accepted(http, gateway, data=b"z" * limit_bytes)
    stored = await stored_messages(nats_client)
    assert len(QueuedCall.decode(stored[-1].data or b"").body) == limit_bytes


async def test_queue_down_gets_503_and_the_call_is_not_enqueued_later(
    nats_server, nats_client, recorder, start_gateway, http
):
    function = await recorder()
    gateway = await ready_gateway(
        start_gateway, http, registry_of(echo=function.url), publish_timeout_s=0.5
    )
    healthz = gateway.url("/healthz")

    nats_server.kill()
    payload, _ = await post_rejected(
        http,
        gateway.url("/async-function/echo"),
        503,
        data=b"during the outage",
        headers={"X-Call-Id": "during-outage"},
    )
    assert payload["callId"] == "during-outage"

    async def unhealthy() -> bool:
        return await status_of(http, healthz) == 503

    await wait_until(unhealthy, DEADLINE_S, "the gateway to notice NATS is gone")
    async with http.get(healthz) as response:
        assert response.status == 503
        health = await response.json()
    assert health["status"] == "unavailable"
    assert health["nats"] == "disconnected"
    await post_rejected(
        http, gateway.url("/async-function/echo"), 503, headers={"X-Call-Id": "after-outage-seen"}
    )

    await nats_server.start()

    async def healthy() -> bool:
        return await status_of(http, healthz) == 200

    await wait_until(healthy, DEADLINE_S, "the gateway to reconnect")
    # Anything the client had held back would have gone out on reconnecting, before the gateway
    # set the stream up again and reported healthy.
    assert await stream_message_count(nats_client) == 0
    control = await post_accepted(http, gateway)
    [stored] = await stored_messages(nats_client)
    assert QueuedCall.decode(stored.data or b"").call_id == control
    metrics = await scrape(http, gateway.url("/metrics"))
    assert (
        sample(
            metrics,
            "gateway_async_requests_total",
            function_name="echo",
            outcome="rejected",
            code="503",
        )
        == 2
    )


async def test_publish_without_ack_gets_503_and_the_gateway_sets_the_stream_up_again(
    nats_client, recorder, start_gateway, http
):
    function = await recorder()
    gateway = await ready_gateway(start_gateway, http, registry_of(echo=function.url))

    # Connected, but no stream takes the subject: the publish gets no ack.
    await nats_client.jetstream().delete_stream(STREAM)
    payload, _ = await post_rejected(
        http,
        gateway.url("/async-function/echo"),
        503,
        data=b"nowhere to go",
        headers={"X-Call-Id": "no-stream"},
    )

    assert payload["callId"] == "no-stream"

    async def healthy() -> bool:
        return await status_of(http, gateway.url("/healthz")) == 200

    await wait_until(healthy, DEADLINE_S, "the gateway to create the stream again")
    await assert_nothing_enqueued_then_control(http, gateway, nats_client)


async def test_gateway_healthz_reports_the_stream_when_connected(
    nats_client, recorder, start_gateway, http
):
    function = await recorder()
    gateway = await ready_gateway(start_gateway, http, registry_of(echo=function.url))
    await post_accepted(http, gateway)

    async with http.get(gateway.url("/healthz")) as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        health = await response.json()

    assert health["status"] == "ok"
    assert health["nats"] == "connected"
    assert health["stream"] == STREAM
    assert health["messages"] == 1


async def test_gateway_metrics_count_async_requests_per_function_and_outcome(
    nats_client, recorder, start_gateway, http
):
    function = await recorder()
    gateway = await ready_gateway(
        start_gateway,
        http,
        registry_of(echo=function.url, other=function.url),
        max_async_body_bytes=4,
    )
    echo = gateway.url("/async-function/echo")

    await post_accepted(http, gateway)
    await post_accepted(http, gateway, "/async-function/echo/sub")
    await post_accepted(http, gateway, "/async-function/other")
    await post_rejected(http, echo, 400, headers={"X-Callback-Url": "ftp://x"})
    await post_rejected(http, echo, 413, data=b"12345")
    await post_rejected(http, gateway.url("/async-function/missing"), 404)
    await post_rejected(http, echo, 405, method="GET")

    metrics = await scrape(http, gateway.url("/metrics"))
    name = "gateway_async_requests_total"
    expected = {
        ("echo", "accepted", "202"): 2,
        ("other", "accepted", "202"): 1,
        ("echo", "rejected", "400"): 1,
        ("echo", "rejected", "413"): 1,
        ("(unknown)", "rejected", "404"): 1,
        ("(unknown)", "rejected", "405"): 1,
    }
    counted = {
        (labels["function_name"], labels["outcome"], labels["code"]): sample(
            metrics, name, **labels
        )
        for labels in samples_named(metrics, name)
    }
    assert counted == expected
