"""Bounded storage: every stream, bucket and object store the processes create has a size
limit; a full queue answers 503 with Retry-After and takes calls again once workers make room,
dropping nothing it accepted; a full results store cuts a result instead of retrying it
forever; a queue that no worker serves is visible. Real NATS, gateway, worker and functions.
"""

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from nats.aio.client import Client as NatsClient
from nats.js.api import DiscardPolicy, KeyValueConfig, RetentionPolicy, StorageType, StreamConfig

from faas_gateway.nats.provision import StorageLimitError
from gateway.app import create_app
from queue_worker.worker import Worker
from tests.conftest import (
    RunningGateway,
    StartGateway,
    StartRecorder,
    StartWorker,
    gateway_settings,
    ready_gateway,
    stream_message_count,
    worker_settings,
)
from tests.harness import NatsServer, RecordedRequest, registry_of, sample, scrape, wait_until

DEADLINE_S = 20.0
KIB = 1024
MIB = 1024 * KIB
DAY_S = 24 * 3600.0


async def post_async(
    http: aiohttp.ClientSession, gateway: RunningGateway, function: str, body: bytes
) -> tuple[int, dict[str, Any], Any]:
    async with http.post(gateway.url(f"/async-function/{function}"), data=body) as response:
        return response.status, await response.json(), response.headers


# a full queue


async def test_a_full_queue_answers_503_with_retry_after_and_takes_calls_again_once_drained(
    start_gateway: StartGateway,
    start_worker: StartWorker,
    recorder: StartRecorder,
    http: aiohttp.ClientSession,
    nats_client: NatsClient,
) -> None:
    function = await recorder()
    registry = registry_of(work=function.url)
    # Both processes set the stream's limits at start: they must agree.
    limit = {"async_queue_max_bytes": 64 * KIB}
    gateway = await ready_gateway(start_gateway, http, registry, **limit)
    body = b"x" * (2 * KIB)

    # No worker yet: calls stay queued until the queue is full.
    accepted: list[str] = []
    for _ in range(200):  # 64 KiB hold about 30 of these
        status, document, headers = await post_async(http, gateway, "work", body)
        if status != 202:
            break
        accepted.append(document["callId"])
    assert status == 503, f"still accepting after {len(accepted)} calls"
    assert accepted, "the first call was refused"
    assert headers["Retry-After"] == "5"
    assert document["error"] == (
        "the async queue is full (max_bytes 65536 of stream faas-async); try again later"
    )
    assert document["callId"] == headers["X-Call-Id"]

    # Refused means not queued, and nothing accepted made room for it.
    status, _, _ = await post_async(http, gateway, "work", body)
    assert status == 503
    assert await stream_message_count(nats_client) == len(accepted)

    await start_worker(registry, **limit)

    async def drained() -> bool:
        return await stream_message_count(nats_client) == 0

    await wait_until(drained, DEADLINE_S, "the worker to finish the queued calls")
    ran = function.by_call_id()
    assert sorted(ran) == sorted(accepted)
    assert all(len(requests) == 1 for requests in ran.values())

    status, document, _ = await post_async(http, gateway, "work", body)
    assert status == 202, document
    await function.wait_for_requests(len(accepted) + 1, DEADLINE_S)
    assert function.requests[-1].headers["X-Call-Id"] == document["callId"]


# every store bounded, and bounded again at start


def expected_streams() -> dict[str, tuple[int, DiscardPolicy, float]]:
    """{stream: (max_bytes, discard, max_age)} under the defaults."""
    return {
        "faas-async": (1024 * MIB, DiscardPolicy.NEW, 7 * DAY_S),
        "KV_faas-activations": (1024 * MIB, DiscardPolicy.OLD, 3 * DAY_S),
        "OBJ_faas-activations-results": (2048 * MIB, DiscardPolicy.NEW, 3 * DAY_S),
        "faas-activations-index": (256 * MIB, DiscardPolicy.OLD, 3 * DAY_S),
        "faas-dead-letters": (1024 * MIB, DiscardPolicy.OLD, 7 * DAY_S),
        "KV_faas-cancellations": (64 * MIB, DiscardPolicy.NEW, 3 * DAY_S),
        "KV_faas-functions": (64 * MIB, DiscardPolicy.NEW, 0.0),
        "KV_faas-triggers": (64 * MIB, DiscardPolicy.NEW, 0.0),
        "KV_faas-rules": (64 * MIB, DiscardPolicy.NEW, 0.0),
        "KV_faas-feeds": (64 * MIB, DiscardPolicy.NEW, 0.0),
        "faas-fires": (256 * MIB, DiscardPolicy.NEW, 7 * DAY_S),
    }


async def stream_limits(nats_client: NatsClient) -> dict[str, tuple[int, DiscardPolicy, float]]:
    streams = await nats_client.jetstream().streams_info()
    return {
        info.config.name: (
            info.config.max_bytes,
            info.config.discard,
            round(info.config.max_age or 0.0, 3),
        )
        for info in streams
        if info.config.name is not None
    }


async def test_every_stream_bucket_and_object_store_the_processes_create_has_a_size_limit(
    start_gateway: StartGateway,
    start_worker: StartWorker,
    recorder: StartRecorder,
    http: aiohttp.ClientSession,
    nats_client: NatsClient,
) -> None:
    function = await recorder()
    registry = registry_of(echo=function.url)
    await ready_gateway(start_gateway, http, registry)
    await start_worker(registry)

    assert await stream_limits(nats_client) == expected_streams()


async def test_streams_made_without_limits_get_them_at_start_and_keep_what_they_hold(
    start_gateway: StartGateway,
    start_worker: StartWorker,
    recorder: StartRecorder,
    http: aiohttp.ClientSession,
    nats_client: NatsClient,
) -> None:
    js = nats_client.jetstream()
    # As an earlier version made them: no max_bytes, discard old (JetStream's default).
    await js.add_stream(
        StreamConfig(
            name="faas-async",
            subjects=["faas.async.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
        )
    )
    for name in ("faas-activations-index", "faas-dead-letters"):
        await js.add_stream(
            StreamConfig(name=name, subjects=[f"{name}.>"], storage=StorageType.FILE)
        )
    for bucket in ("faas-activations", "faas-cancellations", "faas-functions"):
        await js.create_key_value(KeyValueConfig(bucket=bucket, storage=StorageType.FILE))
    await js.create_object_store("faas-activations-results")
    # Queued by then: more than the new limit below holds, for a function no worker serves.
    for number in range(40):
        await js.publish("faas.async.default.work", b"y" * (2 * KIB) + str(number).encode())
    function = await recorder()
    registry = registry_of(work=function.url)

    limit = {"async_queue_max_bytes": 64 * KIB}
    gateway = await ready_gateway(start_gateway, http, registry, **limit)
    # A worker of another queue: it sets up every store, and leaves those calls queued.
    await start_worker(registry, worker_queue="other", **limit)

    expected = expected_streams()
    expected["faas-async"] = (64 * KIB, DiscardPolicy.NEW, 7 * DAY_S)
    assert await stream_limits(nats_client) == expected
    # A lower limit drops none of what the stream held; it takes no more until there is room.
    assert await stream_message_count(nats_client) == 40
    status, document, _ = await post_async(http, gateway, "work", b"z")
    assert (status, document["error"]) == (
        503,
        "the async queue is full (max_bytes 65536 of stream faas-async); try again later",
    )
    assert await stream_message_count(nats_client) == 40


async def test_limits_nats_cannot_set_aside_stop_the_gateway_and_worker_naming_the_setting(
    tmp_path: Path, recorder: StartRecorder
) -> None:
    # JetStream reserves every stream's max_bytes from the server's storage at once; the
    # defaults ask for about 5.4 GiB, and the results store's 2 GiB are the ones over 3.
    server = NatsServer(tmp_path / "small", config="jetstream { max_file_store: 3GB }")
    await server.start()
    try:
        registry = registry_of(echo=(await recorder()).url)
        expected = (
            r"NATS cannot set aside 2147483648 bytes for stream 'OBJ_faas-activations-results' "
            r"\(activation_results_max_bytes\).*Lower activation_results_max_bytes"
        )
        app = create_app(gateway_settings(server.url), registry)
        gateway = TestServer(app, host="127.0.0.1")
        try:
            with pytest.raises(StorageLimitError, match=expected):
                await asyncio.wait_for(gateway.start_server(), DEADLINE_S)
        finally:
            await gateway.close()
        worker = Worker(worker_settings(server.url), registry)
        with pytest.raises(StorageLimitError, match=expected):
            await asyncio.wait_for(worker.main(), DEADLINE_S)
        assert not worker.ready.is_set()
    finally:
        server.kill()


# a full results store


async def test_a_result_that_does_not_fit_the_results_store_is_cut_and_the_call_finishes(
    start_gateway: StartGateway,
    start_worker: StartWorker,
    recorder: StartRecorder,
    http: aiohttp.ClientSession,
) -> None:
    big = bytes(range(256)) * (700 * KIB // 256)  # over the 512 KiB kept inline

    async def large(request: web.Request, recorded: RecordedRequest) -> web.StreamResponse:
        return web.Response(body=big, content_type="application/octet-stream")

    function = await recorder(large)
    registry = registry_of(big=function.url)
    limits = {"activation_results_max_bytes": 1 * MIB}
    gateway = await ready_gateway(start_gateway, http, registry, **limits)
    await start_worker(registry, **limits)

    async def finished(call_id: str) -> dict[str, Any] | None:
        async with http.get(gateway.url(f"/system/activations/{call_id}")) as response:
            record = await response.json()
        return record if record.get("status") == "succeeded" else None

    async def result(call_id: str) -> tuple[bytes, Any]:
        async with http.get(gateway.url(f"/system/activations/{call_id}/result")) as response:
            assert response.status == 200
            return await response.read(), response.headers

    status, first, _ = await post_async(http, gateway, "big", b"")
    assert status == 202
    record = await wait_until(lambda: finished(first["callId"]), DEADLINE_S, "the first call")
    assert record["response"]["storedIn"] == "objectStore"
    assert record["response"]["truncated"] is False
    assert (await result(first["callId"]))[0] == big

    # The store holds one such result: the next does not fit.
    status, second, _ = await post_async(http, gateway, "big", b"")
    assert status == 202
    record = await wait_until(lambda: finished(second["callId"]), DEADLINE_S, "the second call")
    assert record["attempts"] == 1
    assert record["response"] == {
        "contentType": "application/octet-stream",
        "bodySize": len(big),
        "truncated": True,
        "storageFull": True,
    }
    kept, headers = await result(second["callId"])
    assert kept == big[: 512 * KIB]
    assert headers["X-Result-Truncated"] == "true"
    assert len(function.requests) == 2


# a queue no worker serves


async def test_a_queue_no_worker_serves_is_warned_about_at_deploy_and_shown_by_a_metric(
    start_gateway: StartGateway,
    start_worker: StartWorker,
    recorder: StartRecorder,
    http: aiohttp.ClientSession,
) -> None:
    function = await recorder()
    gateway = await ready_gateway(start_gateway, http, registry_of())
    deployment = {
        "service": "encode",
        "url": function.url,
        "annotations": {"com.openfaas.queue": "bulk"},
    }

    async with http.post(gateway.url("/system/functions"), json=deployment) as response:
        assert response.status == 202
        warning = response.headers.get("Warning")
        status_body = await response.json()
    assert warning == (
        "299 - \"no worker serves queue 'bulk' (consumer faas-queue-worker-bulk on stream "
        "faas-async): its async calls wait in the queue until one does "
        '(faas-queue-worker --queue bulk)"'
    )
    assert status_body["name"] == "encode"  # the FunctionStatus as before

    async def unserved() -> float | None:
        metrics = await scrape(http, gateway.url("/metrics"))
        return sample(metrics, "gateway_queue_unserved", queue_name="bulk")

    assert await unserved() == 1

    worker = await start_worker(registry_of(), worker_queue="bulk")

    async def served() -> bool:
        return await unserved() == 0

    await wait_until(served, DEADLINE_S, "the metric to see the worker")
    async with http.put(gateway.url("/system/functions"), json=deployment) as response:
        assert response.status == 200
        assert "Warning" not in response.headers

    # The consumer outlives its worker; the queue is unserved again all the same.
    worker.request_stop()

    async def unserved_again() -> bool:
        return await unserved() == 1

    await wait_until(unserved_again, DEADLINE_S, "the metric to see the worker gone")
