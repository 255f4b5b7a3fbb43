"""Activation records: lifecycle through the API, results, listing, expiry, Prefer: wait,
sync calls that turn async, and records surviving restarts. Real nats-server, gateway, worker.
"""

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from faas_gateway.core.call import QueuedCall
from faas_gateway.nats.activations import (
    Activation,
    ActivationChangedError,
    ActivationExistsError,
    ActivationStore,
)
from faas_gateway.nats.names import Names
from faas_gateway.runtime.settings import CommonSettings
from queue_worker.worker import Worker
from tests.conftest import RunningGateway, get_json, ready_gateway
from tests.harness import NatsServer, RecordedRequest, Recorder, registry_of, wait_until

DEADLINE_S = 30.0

StartGateway = Callable[..., Awaitable[RunningGateway]]
StartWorker = Callable[..., Awaitable[Worker]]
StartRecorder = Callable[..., Awaitable[Recorder]]


class Gate:
    """A function that holds every call until the test opens the gate."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.entered = asyncio.Event()

    async def responder(self, request: web.Request, recorded: RecordedRequest) -> web.Response:
        self.entered.set()
        await self.opened.wait()
        return web.Response(status=201, body=b"made: " + recorded.body, content_type="text/x-made")


async def record_of(http: aiohttp.ClientSession, gateway: RunningGateway, call_id: str) -> Any:
    status, record = await get_json(http, gateway.url(f"/system/activations/{call_id}"))
    assert status == 200, record
    return record


async def wait_for_status(
    http: aiohttp.ClientSession, gateway: RunningGateway, call_id: str, *statuses: str
) -> Any:
    async def reached() -> Any:
        record = await record_of(http, gateway, call_id)
        return record if record["status"] in statuses else None

    return await wait_until(reached, DEADLINE_S, f"{call_id} to be {' or '.join(statuses)}")


async def test_record_goes_queued_running_succeeded_and_the_result_follows(
    recorder: StartRecorder,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    http: aiohttp.ClientSession,
) -> None:
    gate = Gate()
    function = await recorder(gate.responder)
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


async def answer_with_status(request: web.Request, recorded: RecordedRequest) -> web.Response:
    code = int(request.query.get("code", "200"))
    return web.Response(
        status=code, body=json.dumps({"code": code}).encode(), content_type="application/json"
    )


async def post_async(
    http: aiohttp.ClientSession, gateway: RunningGateway, path: str, **kwargs: Any
) -> str:
    async with http.post(gateway.url(path), **kwargs) as response:
        assert response.status == 202, await response.text()
        return str((await response.json())["callId"])


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


async def listed(http: aiohttp.ClientSession, gateway: RunningGateway, query: str) -> list[Any]:
    status, body = await get_json(http, gateway.url(f"/system/activations{query}"))
    assert status == 200, body
    assert isinstance(body, list)
    return body


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


async def test_prefer_wait_returns_the_result_when_the_call_finishes_in_time(
    recorder: StartRecorder,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    http: aiohttp.ClientSession,
) -> None:
    function = await recorder(answer_with_status)
    registry = registry_of(status=function.url)
    gateway = await ready_gateway(start_gateway, http, registry, max_wait_s=20.0)
    await start_worker(registry)
    async with http.post(
        gateway.url("/async-function/status?code=418"),
        headers={"Prefer": "wait=100", "X-Call-Id": "prefer-1"},
    ) as response:
        assert response.status == 418
        assert response.headers["Preference-Applied"] == "wait=20"  # capped by max_wait
        assert response.headers["X-Call-Id"] == "prefer-1"
        assert response.headers["Content-Type"] == "application/json"
        assert await response.json() == {"code": 418}
    assert (await record_of(http, gateway, "prefer-1"))["status"] == "failed"


async def test_prefer_wait_turns_into_202_with_the_record_when_the_call_is_slow(
    recorder: StartRecorder,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    http: aiohttp.ClientSession,
) -> None:
    gate = Gate()
    function = await recorder(gate.responder)
    registry = registry_of(held=function.url)
    gateway = await ready_gateway(start_gateway, http, registry)
    await start_worker(registry)
    async with http.post(
        gateway.url("/async-function/held"), data=b"a", headers={"Prefer": "wait=0.5"}
    ) as response:
        assert response.status == 202
        record = await response.json()
        call_id = response.headers["X-Call-Id"]
        assert record["callId"] == call_id
        assert record["status"] in ("queued", "running")
        assert response.headers["Location"] == f"/system/activations/{call_id}"
        assert "Preference-Applied" not in response.headers
    gate.opened.set()
    done = await wait_for_status(http, gateway, call_id, "succeeded")
    assert done["statusCode"] == 201


async def test_sync_call_with_prefer_respond_async_turns_async_and_records_its_result(
    recorder: StartRecorder, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gate = Gate()
    function = await recorder(gate.responder)
    callbacks = await recorder()
    registry = registry_of(held=function.url)
    gateway = await ready_gateway(start_gateway, http, registry)
    async with http.post(
        gateway.url("/function/held/x?y=2"),
        data=b"slow work",
        headers={
            "Prefer": "respond-async, wait=0.3",
            "X-Callback-Url": callbacks.url + "/done",
            "Content-Type": "text/plain",
        },
    ) as response:
        assert response.status == 202
        call_id = response.headers["X-Call-Id"]
        assert response.headers["Location"] == f"/system/activations/{call_id}"
        assert response.headers["Preference-Applied"] == "respond-async, wait=0.3"
        record = await response.json()
    assert record["status"] == "running" and record["attempts"] == 1
    assert record["request"]["path"] == "/x" and record["request"]["bodySize"] == 9
    assert (await record_of(http, gateway, call_id))["status"] == "running"
    assert [r["callId"] for r in await listed(http, gateway, "?function=held")] == [call_id]

    gate.opened.set()
    received = await callbacks.wait_for_requests(1, DEADLINE_S)
    assert received[0].body == b"made: slow work"
    assert received[0].headers["X-Call-Id"] == call_id
    assert received[0].headers["X-Function-Status"] == "201"
    done = await wait_for_status(http, gateway, call_id, "succeeded")
    assert done["statusCode"] == 201
    async with http.get(gateway.url(f"/system/activations/{call_id}/result")) as response:
        assert response.status == 201 and await response.read() == b"made: slow work"
    assert len(function.requests) == 1


async def test_sync_calls_answered_in_time_stay_sync_and_leave_no_record(
    recorder: StartRecorder, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    function = await recorder(answer_with_status)
    registry = registry_of(status=function.url)
    gateway = await ready_gateway(start_gateway, http, registry, sync_async_after_s=5.0)
    async with http.post(
        gateway.url("/function/status?code=200"),
        data=b"x",
        headers={"X-Call-Id": "quick-1", "Prefer": "respond-async, wait=5"},
    ) as response:
        assert response.status == 200
        assert "Preference-Applied" not in response.headers
    status, _ = await get_json(http, gateway.url("/system/activations/quick-1"))
    assert status == 404


async def test_gateway_setting_turns_every_slow_sync_call_async(
    recorder: StartRecorder, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gate = Gate()
    function = await recorder(gate.responder)
    registry = registry_of(held=function.url)
    gateway = await ready_gateway(start_gateway, http, registry, sync_async_after_s=0.3)
    async with http.get(gateway.url("/function/held")) as response:
        assert response.status == 202
        call_id = response.headers["X-Call-Id"]
        assert "Preference-Applied" not in response.headers
    gate.opened.set()
    done = await wait_for_status(http, gateway, call_id, "succeeded")
    assert done["request"]["method"] == "GET" and done["callback"] is None


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


async def test_a_call_turned_async_still_running_when_the_gateway_stops_is_recorded_failed(
    recorder: StartRecorder, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gate = Gate()
    function = await recorder(gate.responder)
    registry = registry_of(held=function.url)
    gateway = await ready_gateway(
        start_gateway, http, registry, sync_async_after_s=0.2, shutdown_grace_s=0.5
    )
    async with http.get(gateway.url("/function/held")) as response:
        assert response.status == 202
        call_id = response.headers["X-Call-Id"]
    await gateway.server.close()  # waits shutdown_grace, then cuts the call off

    other = await ready_gateway(start_gateway, http, registry)
    record = await record_of(http, other, call_id)
    assert record["status"] == "failed" and record["statusCode"] == 502
    assert "gateway stopped" in record["error"]
    gate.opened.set()


async def test_a_record_is_created_once_and_written_only_over_the_revision_read(
    nats_server: NatsServer, connected_link: Any
) -> None:
    """No writer overwrites a record it did not see: create is create-if-absent, and every
    later write is conditional on the revision the writer last read or wrote."""
    settings = CommonSettings(nats_url=nats_server.url)
    link = await connected_link(settings)
    store = ActivationStore(link, Names.of(settings), settings.activation_max_result_bytes, 3600.0)
    call = QueuedCall(
        call_id="taken-1",
        function="echo",
        method="POST",
        path="",
        query="",
        headers=[],
        body=b"x",
        callback_url=None,
        accepted_at_ns=time.time_ns(),
    )
    first = Activation.queued(call)
    await store.create(first)
    assert first.revision > 0

    with pytest.raises(ActivationExistsError) as taken:
        await store.create(Activation.queued(call))
    assert taken.value.stored is not None
    assert taken.value.stored.record["requestDigest"] == call.request_digest()

    # A second writer that read the record, and the first writer, both change it: the one
    # whose revision is stale loses, and the record keeps what the other wrote.
    stored = await store.get("taken-1")
    assert stored is not None and stored.revision == first.revision
    cancelling = Activation.from_stored(stored)
    cancelling.cancel()
    await store.put(cancelling)
    first.start(attempts=1)
    with pytest.raises(ActivationChangedError):
        await store.put(first)
    after = await store.get("taken-1")
    assert after is not None and after.record["status"] == "cancelled"

    # A record deleted (a call that could not be queued) frees its id for a new create.
    await store.delete(cancelling)
    assert await store.get("taken-1") is None
    again = Activation.queued(call)
    await store.create(again)
    records = await store.get_many(["taken-1", "never-accepted"])
    assert list(records) == ["taken-1"] and records["taken-1"].revision == again.revision
    assert await store.get("never-accepted") is None
