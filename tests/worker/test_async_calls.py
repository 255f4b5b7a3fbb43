"""Async calls: POST /async-function/... -> JetStream -> queue-worker -> function -> callback.

Every part is real: a nats-server subprocess, the gateway and the workers in-process, functions
and callback receivers as aiohttp servers. Waits have deadlines; that something did not happen is
asserted only after a later event shows that processing had finished.
"""

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from nats.aio.client import Client as NatsClient

from faas_gateway.core.call import QueuedCall
from tests.conftest import StartRecorder, ready_gateway, stream_message_count
from tests.harness import (
    DEADLINE_S,
    STREAM,
    RecordedRequest,
    answer_in_turn,
    post_accepted,
    raw_url,
    registry_of,
    respond,
    sample,
    samples_named,
    scrape,
    stream_state,
    wait_completed,
    wait_for,
    wait_until,
    worker_url,
)

SUBJECT_PREFIX = "faas.async"


def json_body(recorded: RecordedRequest) -> dict[str, Any]:
    payload = json.loads(recorded.body)
    assert isinstance(payload, dict)
    return payload


async def wait_stream_empty(nats_client: NatsClient) -> None:
    async def empty() -> bool:
        return await stream_message_count(nats_client) == 0

    await wait_until(empty, DEADLINE_S, "the stream to empty")


@pytest.fixture
async def gate(recorder: StartRecorder) -> AsyncIterator[asyncio.Event]:
    """Holds blocked functions; opened at teardown, before the recorders close."""
    event = asyncio.Event()
    yield event
    event.set()


async def publish_raw(nats_client: NatsClient, subject: str, payload: bytes) -> None:
    ack = await nats_client.jetstream().publish(subject, payload, stream=STREAM)
    assert ack.stream == STREAM


# end to end with a worker


async def test_function_gets_the_request_and_the_callback_gets_its_response(
    nats_client, recorder, start_gateway, start_worker, http
):
    function = await recorder(
        respond(201, b'{"made": true}', "application/vnd.test+json", {"X-Fn": "yes"})
    )
    receiver = await recorder()
    registry = registry_of(echo=function.url)
    gateway = await ready_gateway(start_gateway, http, registry)
    await start_worker(registry)

    async with http.post(
        raw_url(gateway, "/async-function/echo/sub/a%2Fb%20c?x=1&y=%2F&z=a+b&v=%7E"),
        data=b"the body",
        headers=[
            ("X-Callback-Url", receiver.url + "/cb?token=t"),
            ("Content-Type", "application/x-test"),
            ("X-Custom", "custom value"),
            ("X-Multi", "first"),
            ("X-Multi", "second"),
        ],
    ) as response:
        assert response.status == 202
        call_id = (await response.json())["callId"]
        start_time = response.headers["X-Start-Time"]

    [callback] = await receiver.wait_for_requests(1, DEADLINE_S)
    [invocation] = function.requests
    assert invocation.method == "POST"
    assert invocation.path == "/sub/a%2Fb%20c"
    assert invocation.query_string == "x=1&y=%2F&z=a+b&v=%7E"
    assert invocation.body == b"the body"
    assert invocation.headers["Content-Type"] == "application/x-test"
    assert invocation.headers["X-Custom"] == "custom value"
    assert invocation.headers.getall("X-Multi") == ["first", "second"]
    assert invocation.headers["X-Call-Id"] == call_id
    assert invocation.headers["X-Start-Time"] == start_time
    assert invocation.headers["Host"] == function.url.removeprefix("http://")

    assert callback.method == "POST"
    assert (callback.path, callback.query_string) == ("/cb", "token=t")
    assert callback.body == b'{"made": true}'
    assert callback.headers["Content-Type"] == "application/vnd.test+json"
    assert callback.headers["X-Fn"] == "yes"
    assert callback.headers["X-Call-Id"] == call_id
    assert callback.headers["X-Function-Name"] == "echo"
    assert callback.headers["X-Function-Status"] == "201"
    assert float(callback.headers["X-Duration-Seconds"]) >= 0
    await wait_stream_empty(nats_client)


async def test_function_error_status_is_reported_once_and_not_retried(
    nats_client, recorder, start_gateway, start_worker, http
):
    function = await recorder(respond(500, b"it broke", "text/plain"))
    receiver = await recorder()
    registry = registry_of(echo=function.url)
    gateway = await ready_gateway(start_gateway, http, registry)
    worker = await start_worker(registry)

    call_id = await post_accepted(http, gateway, headers={"X-Callback-Url": receiver.url})

    [callback] = await receiver.wait_for_requests(1, DEADLINE_S)
    assert callback.headers["X-Function-Status"] == "500"
    assert callback.headers["X-Call-Id"] == call_id
    assert callback.body == b"it broke"
    await wait_completed(worker, 1)
    await wait_stream_empty(nats_client)
    assert len(function.requests) == 1
    assert len(receiver.requests) == 1
    metrics = await scrape(http, worker_url(worker, "/metrics"))
    processed = "queue_worker_messages_processed_total"
    assert sample(metrics, processed, function_name="echo", outcome="failed") == 1
    assert sample(metrics, processed, function_name="echo", outcome="succeeded") is None


async def test_unreachable_function_gives_a_502_callback(
    nats_client, recorder, start_gateway, start_worker, http, caplog
):
    """The callback and the record say the function did not answer, not where it listens
    (the caller may not know the network behind the gateway); the worker's log says it."""
    caplog.set_level(logging.INFO)
    receiver = await recorder()
    # Bound but not listening: connections are refused, and no one else can take the port.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as closed_port:
        closed_port.bind(("127.0.0.1", 0))
        port = closed_port.getsockname()[1]
        registry = registry_of(echo=f"http://127.0.0.1:{port}")
        gateway = await ready_gateway(start_gateway, http, registry)
        worker = await start_worker(registry)

        call_id = await post_accepted(http, gateway, headers={"X-Callback-Url": receiver.url})

        [callback] = await receiver.wait_for_requests(1, DEADLINE_S)
    assert callback.headers["X-Call-Id"] == call_id
    assert callback.headers["X-Function-Status"] == "502"
    assert callback.headers["Content-Type"] == "application/json"
    error = json_body(callback)["error"]
    assert error.startswith("function 'echo' did not answer")
    async with http.get(gateway.url(f"/system/activations/{call_id}")) as response:
        record = await response.json()
    assert record["error"] == error
    for seen_by_callers in (callback.body.decode(), json.dumps(record)):
        assert f"127.0.0.1:{port}" not in seen_by_callers
        assert str(port) not in seen_by_callers
    assert [r for r in caplog.records if f"127.0.0.1:{port}" in r.getMessage()]
    await wait_completed(worker, 1)
    await wait_stream_empty(nats_client)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 600 Beyond\r\nContent-Length: 2\r\n\r\nhi",
        b"HTTP/1.1 000 None\r\nContent-Length: 2\r\n\r\nhi",
        b"HTTP/1.1 100 Continue\r\nContent-Length: 0\r\n\r\n",
    ],
    ids=["600", "000", "100-final"],
)
async def test_status_no_final_response_may_have_gives_a_502_callback_at_once(
    answer, recorder, start_gateway, start_worker, http
):
    """The function sends its answer and waits for the next request; its timeouts are far
    beyond the deadline, so only the status itself can end the call."""

    async def function(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass
        writer.close()

    receiver = await recorder()
    server = await asyncio.start_server(function, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    long = "1h"
    try:
        registry = registry_of(
            odd={"url": f"http://127.0.0.1:{port}", "exec_timeout": long, "read_timeout": long}
        )
        gateway = await ready_gateway(start_gateway, http, registry)
        await start_worker(registry)
        call_id = await post_accepted(
            http, gateway, "/async-function/odd", headers={"X-Callback-Url": receiver.url}
        )
        [callback] = await receiver.wait_for_requests(1, DEADLINE_S)
    finally:
        server.close()
    assert callback.headers["X-Call-Id"] == call_id
    assert callback.headers["X-Function-Status"] == "502"
    assert "odd" in json_body(callback)["error"]


async def test_function_url_the_client_cannot_use_gives_one_502_callback(
    nats_client, recorder, start_gateway, start_worker, http
):
    receiver = await recorder()
    # The registry accepts this URL, but no HTTP client can encode its host name.
    registry = registry_of(echo="http://bad..host:8080")
    gateway = await ready_gateway(start_gateway, http, registry)
    worker = await start_worker(registry)

    call_id = await post_accepted(http, gateway, headers={"X-Callback-Url": receiver.url})

    [callback] = await receiver.wait_for_requests(1, DEADLINE_S)
    assert callback.headers["X-Call-Id"] == call_id
    assert callback.headers["X-Function-Status"] == "502"
    await wait_completed(worker, 1)
    await wait_stream_empty(nats_client)
    assert len(receiver.requests) == 1


async def test_function_over_its_exec_timeout_gives_a_504_callback(
    nats_client, recorder, gate, start_gateway, start_worker, http
):
    function = await recorder(wait_for(gate))
    receiver = await recorder()
    registry = registry_of(echo={"url": function.url, "exec_timeout": "0.3s"})
    gateway = await ready_gateway(start_gateway, http, registry)
    worker = await start_worker(registry)

    call_id = await post_accepted(http, gateway, headers={"X-Callback-Url": receiver.url})

    [callback] = await receiver.wait_for_requests(1, DEADLINE_S)
    assert callback.headers["X-Call-Id"] == call_id
    assert callback.headers["X-Function-Status"] == "504"
    assert "timeout" in json_body(callback)["error"]
    assert len(function.requests) == 1  # it was called, then given up on
    await wait_completed(worker, 1)
    await wait_stream_empty(nats_client)


async def test_call_without_callback_url_is_invoked_and_acked(
    nats_client, recorder, start_gateway, start_worker, http
):
    function = await recorder()
    registry = registry_of(echo=function.url)
    gateway = await ready_gateway(start_gateway, http, registry)
    worker = await start_worker(registry)

    call_id = await post_accepted(http, gateway, data=b"fire and forget")

    [invocation] = await function.wait_for_requests(1, DEADLINE_S)
    assert invocation.headers["X-Call-Id"] == call_id
    assert invocation.body == b"fire and forget"
    await wait_completed(worker, 1)
    await wait_stream_empty(nats_client)
    metrics = await scrape(http, worker_url(worker, "/metrics"))
    assert (
        sample(
            metrics,
            "queue_worker_messages_processed_total",
            function_name="echo",
            outcome="succeeded",
        )
        == 1
    )
    assert samples_named(metrics, "queue_worker_callbacks_total") == []


async def test_duplicate_call_id_invokes_the_function_once(
    nats_client, recorder, start_gateway, start_worker, http
):
    function = await recorder()
    receiver = await recorder()
    registry = registry_of(echo=function.url)
    gateway = await ready_gateway(start_gateway, http, registry)
    worker = await start_worker(registry, max_inflight=1)
    headers = {"X-Call-Id": "pay-once", "X-Callback-Url": receiver.url}

    await post_accepted(http, gateway, headers=headers)
    await receiver.wait_for_requests(1, DEADLINE_S)
    # Already processed and gone from the stream, yet still inside the duplicate window.
    assert await post_accepted(http, gateway, headers=headers) == "pay-once"
    marker = await post_accepted(http, gateway, headers={"X-Callback-Url": receiver.url})

    await wait_until(lambda: marker in receiver.by_call_id(), DEADLINE_S, "the marker's callback")
    await wait_completed(worker, 2)
    await wait_stream_empty(nats_client)
    assert [request.headers["X-Call-Id"] for request in function.requests] == ["pay-once", marker]
    assert (await stream_state(nats_client)).last_seq == 2


async def test_callback_answered_503_is_retried_until_delivered(
    nats_client, recorder, start_gateway, start_worker, http
):
    function = await recorder()
    receiver = await recorder(answer_in_turn(503, 503, 200))
    registry = registry_of(echo=function.url)
    gateway = await ready_gateway(start_gateway, http, registry)
    worker = await start_worker(registry)

    call_id = await post_accepted(http, gateway, headers={"X-Callback-Url": receiver.url})

    attempts = await receiver.wait_for_requests(3, DEADLINE_S)
    await wait_completed(worker, 1)
    await wait_stream_empty(nats_client)
    assert len(receiver.requests) == 3
    assert {attempt.headers["X-Call-Id"] for attempt in attempts} == {call_id}
    assert {attempt.body for attempt in attempts} == {b"ok"}
    assert len(function.requests) == 1
    metrics = await scrape(http, worker_url(worker, "/metrics"))
    callbacks = "queue_worker_callbacks_total"
    assert sample(metrics, callbacks, function_name="echo", outcome="delivered") == 1
    assert sample(metrics, callbacks, function_name="echo", outcome="failed") is None


async def test_callback_answered_400_is_attempted_once(
    nats_client, recorder, start_gateway, start_worker, http
):
    function = await recorder()
    receiver = await recorder(answer_in_turn(400, 200))
    registry = registry_of(echo=function.url)
    gateway = await ready_gateway(start_gateway, http, registry)
    worker = await start_worker(registry)

    await post_accepted(http, gateway, headers={"X-Callback-Url": receiver.url})

    await wait_completed(worker, 1)
    await wait_stream_empty(nats_client)
    assert len(receiver.requests) == 1
    assert len(function.requests) == 1
    metrics = await scrape(http, worker_url(worker, "/metrics"))
    callbacks = "queue_worker_callbacks_total"
    assert sample(metrics, callbacks, function_name="echo", outcome="failed") == 1
    assert sample(metrics, callbacks, function_name="echo", outcome="delivered") is None


async def test_callback_gives_up_after_max_attempts(
    nats_client, recorder, start_gateway, start_worker, http
):
    function = await recorder()
    receiver = await recorder(answer_in_turn(503))
    registry = registry_of(echo=function.url)
    gateway = await ready_gateway(start_gateway, http, registry)
    worker = await start_worker(registry, callback_max_attempts=3)

    await post_accepted(http, gateway, headers={"X-Callback-Url": receiver.url})

    await wait_completed(worker, 1)
    await wait_stream_empty(nats_client)
    assert len(receiver.requests) == 3
    assert len(function.requests) == 1


async def test_callback_url_the_client_cannot_use_still_acks_the_call(
    nats_client, recorder, start_gateway, start_worker, http
):
    """A queued call whose callback URL fails inside the HTTP client (not over the network)
    completes after one invocation instead of staying unacked and running again."""
    function = await recorder()
    registry = registry_of(echo=function.url)
    worker = await start_worker(registry)
    call = QueuedCall(
        call_id="bad-callback-host",
        function="echo",
        method="POST",
        path="",
        query="",
        headers=[],
        body=b"x",
        callback_url="http://bad..host/cb",  # published by something other than our gateway
        accepted_at_ns=1,
    )

    await publish_raw(nats_client, f"{SUBJECT_PREFIX}.default.echo", call.encode())

    await wait_completed(worker, 1)
    await wait_stream_empty(nats_client)
    assert [request.headers["X-Call-Id"] for request in function.requests] == ["bad-callback-host"]
    metrics = await scrape(http, worker_url(worker, "/metrics"))
    assert (
        sample(metrics, "queue_worker_callbacks_total", function_name="echo", outcome="failed") == 1
    )


async def test_unreadable_message_is_dropped_without_calling_anything(
    nats_client, recorder, start_worker, http
):
    function = await recorder()
    worker = await start_worker(registry_of(echo=function.url))

    await publish_raw(nats_client, f"{SUBJECT_PREFIX}.default.echo", b"not a queued call")

    async def counted() -> bool:
        metrics = await scrape(http, worker_url(worker, "/metrics"))
        processed = "queue_worker_messages_processed_total"
        return sample(metrics, processed, function_name="", outcome="malformed") == 1

    await wait_until(counted, DEADLINE_S, "the malformed message to be counted")
    await wait_stream_empty(nats_client)
    assert function.requests == []
    assert worker.completed == 0


# the worker's status listener


async def test_worker_healthz_is_ok_while_consuming(nats_client, recorder, start_worker, http):
    function = await recorder()
    worker = await start_worker(registry_of(echo=function.url), max_inflight=7)

    async with http.get(worker_url(worker, "/healthz")) as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        health = await response.json()

    assert health["status"] == "ok"
    assert health["nats"] == "connected"
    assert health["consumer"] == "faas-queue-worker"
    assert health["maxInflight"] == 7
    assert health["pending"] == 0


async def test_worker_metrics_show_pending_and_inflight_calls(
    nats_client, recorder, gate, start_gateway, start_worker, http
):
    function = await recorder(wait_for(gate))
    registry = registry_of(echo=function.url)
    gateway = await ready_gateway(start_gateway, http, registry)
    worker = await start_worker(registry, max_inflight=1)
    metrics_url = worker_url(worker, "/metrics")
    pending_name = "queue_worker_pending_messages"

    for _ in range(3):
        await post_accepted(http, gateway)
    await function.wait_for_requests(1, DEADLINE_S)

    async def waiting_behind_the_running_call() -> str | None:
        metrics = await scrape(http, metrics_url)
        pending = sample(metrics, pending_name, function_name="echo", queue_name="default") or 0
        return metrics if pending > 0 else None

    metrics = await wait_until(waiting_behind_the_running_call, DEADLINE_S, "pending > 0")
    inflight = "queue_worker_function_invocation_inflight"
    assert sample(metrics, inflight, function_name="echo") == 1
    async with http.get(worker_url(worker, "/healthz")) as response:
        assert (await response.json())["pending"] > 0

    gate.set()
    await wait_completed(worker, 3)
    await wait_stream_empty(nats_client)
    metrics = await scrape(http, metrics_url)
    assert sample(metrics, pending_name, function_name="echo", queue_name="default") == 0
    assert sample(metrics, inflight, function_name="echo") == 0
    assert (
        sample(
            metrics,
            "queue_worker_messages_processed_total",
            function_name="echo",
            outcome="succeeded",
        )
        == 3
    )
    assert len(function.requests) == 3
