"""Activation records through the API: lifecycle, results (large ones in the object store),
listing, expiry, and records surviving restarts. Real nats-server, gateway, worker."""

import asyncio
from typing import Any

import aiohttp
from aiohttp import web

from tests.conftest import RunningGateway, StartGateway, StartRecorder, StartWorker, ready_gateway
from tests.gateway.helpers import answer_with_status, listed, record_of, wait_for_status
from tests.harness import (
    DEADLINE_S,
    Gate,
    NatsServer,
    RecordedRequest,
    get_json,
    post_async,
    registry_of,
    wait_until,
)


async def test_record_goes_queued_running_succeeded_and_the_result_follows(
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

    async with http.post(
        gateway.url("/async-function/held/sub?x=1"),
        data=b"payload",
        headers={"Content-Type": "text/plain", "X-Callback-Url": callbacks.url + "/cb"},
    ) as response:
        assert response.status == 202
        call_id = (await response.json())["callId"]
        assert response.headers["Location"] == f"/system/activations/{call_id}"

    queued = await record_of(http, gateway, call_id)
    assert queued["status"] == "queued"
    assert queued["callId"] == call_id and queued["function"] == "held"
    assert queued["statusCode"] is None and queued["attempts"] == 0
    assert queued["queuedAt"].endswith("Z") and queued["startedAt"] is None
    assert queued["request"] == {
        "method": "POST",
        "path": "/sub",
        "query": "x=1",
        "contentType": "text/plain",
        "bodySize": 7,
    }
    assert queued["callback"] == {
        "url": callbacks.url + "/cb",
        "state": "pending",
        "attempts": 0,
        "lastStatus": None,
    }
    async with http.get(gateway.url(f"/system/activations/{call_id}/result")) as response:
        assert response.status == 202
        assert response.headers["Retry-After"] == "1"
        assert (await response.json())["status"] == "queued"

    await start_worker(registry)
    await asyncio.wait_for(gate.entered.wait(), DEADLINE_S)
    running = await wait_for_status(http, gateway, call_id, "running")
    assert running["attempts"] == 1 and running["startedAt"] is not None
    assert running["finishedAt"] is None

    gate.opened.set()
    await callbacks.wait_for_requests(1, DEADLINE_S)
    done = await wait_for_status(http, gateway, call_id, "succeeded")
    assert done["statusCode"] == 201
    assert done["response"]["contentType"] == "text/x-made"
    assert done["response"]["bodySize"] == len(b"made: payload")
    assert done["error"] is None
    assert done["finishedAt"] >= done["startedAt"] >= done["queuedAt"]
    assert done["durationMs"] >= 0

    async with http.get(gateway.url(f"/system/activations/{call_id}/result")) as response:
        assert response.status == 201
        assert response.headers["Content-Type"] == "text/x-made"
        assert response.headers["X-Call-Id"] == call_id
        assert await response.read() == b"made: payload"

    delivered = await wait_until(
        lambda: record_delivered(http, gateway, call_id), DEADLINE_S, "callback state recorded"
    )
    assert delivered["callback"]["attempts"] == 1
    assert delivered["callback"]["lastStatus"] == 200


async def record_delivered(
    http: aiohttp.ClientSession, gateway: RunningGateway, call_id: str
) -> Any:
    record = await record_of(http, gateway, call_id)
    return record if record["callback"]["state"] == "delivered" else None


async def test_failed_call_keeps_its_status_error_and_result(
    recorder: StartRecorder,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    http: aiohttp.ClientSession,
) -> None:
    function = await recorder(answer_with_status)
    registry = registry_of(status=function.url, gone="http://127.0.0.1:9")
    gateway = await ready_gateway(start_gateway, http, registry)
    await start_worker(registry)

    failed = await post_async(http, gateway, "/async-function/status?code=500", data=b"x")
    unreachable = await post_async(http, gateway, "/async-function/gone", data=b"x")
    record = await wait_for_status(http, gateway, failed, "succeeded", "failed")
    assert record["status"] == "failed" and record["statusCode"] == 500
    assert "500" in record["error"]
    async with http.get(gateway.url(f"/system/activations/{failed}/result")) as response:
        assert response.status == 500
        assert await response.json() == {"code": 500}
        assert response.headers["X-Call-Id"] == failed

    record = await wait_for_status(http, gateway, unreachable, "succeeded", "failed")
    assert record["statusCode"] == 502 and "did not answer" in record["error"]
    assert record["callback"] is None


async def test_unknown_and_invalid_ids(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gateway = await ready_gateway(start_gateway, http, registry_of())
    for path in ("/system/activations/no-such-call", "/system/activations/no-such-call/result"):
        status, body = await get_json(http, gateway.url(path))
        assert status == 404
        assert "no call with this id was accepted, or its record expired" in body["error"]
        assert "72h" in body["error"]
    status, body = await get_json(http, gateway.url("/system/activations/bad%20id"))
    assert status == 400 and "not a valid call id" in body["error"]
    async with http.post(gateway.url("/system/activations/some-id")) as response:
        assert response.status == 405


async def test_records_expire_after_the_retention(
    recorder: StartRecorder,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    http: aiohttp.ClientSession,
) -> None:
    function = await recorder()
    registry = registry_of(echo=function.url)
    gateway = await ready_gateway(
        start_gateway, http, registry, activation_retention_s=1.0, duplicate_window_s=1.0
    )
    await start_worker(registry, activation_retention_s=1.0, duplicate_window_s=1.0)
    call_id = await post_async(http, gateway, "/async-function/echo", data=b"x")
    await wait_for_status(http, gateway, call_id, "succeeded")

    async def gone() -> bool:
        status, _ = await get_json(http, gateway.url(f"/system/activations/{call_id}"))
        return status == 404

    await wait_until(gone, DEADLINE_S, "the record to expire")
    status, listed = await get_json(http, gateway.url("/system/activations"))
    assert status == 200 and listed == []


async def test_listing_is_newest_first_with_filters_and_limits(
    recorder: StartRecorder,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    http: aiohttp.ClientSession,
) -> None:
    function = await recorder(answer_with_status)
    registry = registry_of(ok=function.url, bad=function.url, idle=function.url)
    gateway = await ready_gateway(start_gateway, http, registry)
    await start_worker(registry)
    ok_ids, bad_ids = [], []
    for round_number in range(40):
        ok_ids.append(await post_async(http, gateway, "/async-function/ok", data=b"x"))
        if round_number % 4 == 0:
            bad_ids.append(await post_async(http, gateway, "/async-function/bad?code=503"))
        if round_number == 19:
            async with http.get(gateway.url("/system/activations?limit=1")) as response:
                middle = (await response.json())[0]["queuedAt"]
    everything = ok_ids[:20] + bad_ids[:5] + ok_ids[20:] + bad_ids[5:]
    for call_id in everything:
        await wait_for_status(http, gateway, call_id, "succeeded", "failed")

    newest = await listed(http, gateway, "")
    assert len(newest) == 30  # the default limit
    queued_at = [record["queuedAt"] for record in newest]
    assert queued_at == sorted(queued_at, reverse=True)
    assert newest[0]["callId"] in (ok_ids[-1], bad_ids[-1])

    all_ok = await listed(http, gateway, "?function=ok&limit=200")
    assert [record["callId"] for record in all_ok] == ok_ids[::-1]
    all_bad = await listed(http, gateway, "?status=failed&limit=200")
    assert [record["callId"] for record in all_bad] == bad_ids[::-1]
    assert {record["statusCode"] for record in all_bad} == {503}
    assert await listed(http, gateway, "?function=idle") == []
    assert len(await listed(http, gateway, "?limit=7&status=succeeded")) == 7

    recent = await listed(http, gateway, f"?since={middle}&limit=200")
    assert recent and all(record["queuedAt"] >= middle for record in recent)
    assert len(recent) < len(ok_ids) + len(bad_ids)
    assert ok_ids[-1] in {record["callId"] for record in recent}
    assert ok_ids[0] not in {record["callId"] for record in recent}
    in_ms = await listed(http, gateway, "?since=0&limit=200")
    assert len(in_ms) == len(ok_ids) + len(bad_ids)

    for query, word in [
        ("?limit=0", "limit"),
        ("?limit=201", "limit"),
        ("?limit=ten", "limit"),
        ("?status=done", "status"),
        ("?since=yesterday", "since"),
        ("?function=a%20b", "function"),
    ]:
        status, body = await get_json(http, gateway.url(f"/system/activations{query}"))
        assert status == 400, query
        assert word in body["error"]


async def test_records_survive_restarts_of_gateway_worker_and_nats_server(
    nats_server: NatsServer,
    recorder: StartRecorder,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    http: aiohttp.ClientSession,
) -> None:
    function = await recorder(answer_with_status)
    registry = registry_of(status=function.url)
    gateway = await ready_gateway(start_gateway, http, registry)
    worker = await start_worker(registry)
    finished = await post_async(http, gateway, "/async-function/status?code=202", data=b"1")
    await wait_for_status(http, gateway, finished, "succeeded")
    await worker.close()
    waiting = await post_async(http, gateway, "/async-function/status?code=200", data=b"2")
    await gateway.server.close()

    await nats_server.restart()
    gateway = await ready_gateway(start_gateway, http, registry)
    record = await record_of(http, gateway, finished)
    assert record["status"] == "succeeded" and record["statusCode"] == 202
    async with http.get(gateway.url(f"/system/activations/{finished}/result")) as response:
        assert response.status == 202 and await response.json() == {"code": 202}
    assert (await record_of(http, gateway, waiting))["status"] == "queued"

    await start_worker(registry)
    await wait_for_status(http, gateway, waiting, "succeeded")
    assert [r["callId"] for r in await listed(http, gateway, "")] == [waiting, finished]


async def big_answer(request: web.Request, recorded: RecordedRequest) -> web.Response:
    size = int(request.query["bytes"])
    return web.Response(body=bytes(i % 251 for i in range(size)), content_type="application/x-big")


async def test_large_results_go_to_the_object_store_and_longer_ones_are_cut(
    recorder: StartRecorder,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    http: aiohttp.ClientSession,
) -> None:
    function = await recorder(big_answer)
    callbacks = await recorder()
    registry = registry_of(big=function.url)
    limit = 1536 * 1024
    gateway = await ready_gateway(start_gateway, http, registry, activation_max_result_bytes=limit)
    await start_worker(registry, activation_max_result_bytes=limit)
    whole_size, cut_size = 1024 * 1024, 2 * 1024 * 1024
    whole = await post_async(http, gateway, f"/async-function/big?bytes={whole_size}")
    cut = await post_async(
        http,
        gateway,
        f"/async-function/big?bytes={cut_size}",
        headers={"X-Callback-Url": callbacks.url},
    )
    record = await wait_for_status(http, gateway, whole, "succeeded")
    assert record["response"] == {
        "contentType": "application/x-big",
        "bodySize": whole_size,
        "truncated": False,
        "storedIn": "objectStore",
    }
    async with http.get(gateway.url(f"/system/activations/{whole}/result")) as response:
        assert response.status == 200
        assert await response.read() == bytes(i % 251 for i in range(whole_size))
        assert "X-Result-Truncated" not in response.headers

    record = await wait_for_status(http, gateway, cut, "succeeded")
    assert record["response"]["bodySize"] == cut_size and record["response"]["truncated"]
    async with http.get(gateway.url(f"/system/activations/{cut}/result")) as response:
        assert response.headers["X-Result-Truncated"] == "true"
        assert await response.read() == bytes(i % 251 for i in range(limit))
    received = await callbacks.wait_for_requests(1, DEADLINE_S)
    assert len(received[0].body) == cut_size  # the callback gets the whole body
