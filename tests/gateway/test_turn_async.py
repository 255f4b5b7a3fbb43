"""Prefer: wait, and sync calls that turn async: a call that finishes in time answers as it
would, a slow one turns into a 202 with a record that gets its result, and one still running
when the gateway stops is recorded failed. Real nats-server, gateway, worker."""

import asyncio
from typing import Any

import aiohttp

from gateway.handlers.turn_async import TurnAsync
from tests.conftest import StartGateway, StartRecorder, StartWorker, ready_gateway
from tests.gateway.helpers import answer_with_status, listed, record_of, wait_for_status
from tests.harness import DEADLINE_S, Gate, get_json, registry_of


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
    function = await recorder(gate)
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
    function = await recorder(gate)
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
    function = await recorder(gate)
    registry = registry_of(held=function.url)
    gateway = await ready_gateway(start_gateway, http, registry, sync_async_after_s=0.3)
    async with http.get(gateway.url("/function/held")) as response:
        assert response.status == 202
        call_id = response.headers["X-Call-Id"]
        assert "Preference-Applied" not in response.headers
    gate.opened.set()
    done = await wait_for_status(http, gateway, call_id, "succeeded")
    assert done["request"]["method"] == "GET" and done["callback"] is None


async def test_a_call_turned_async_still_running_when_the_gateway_stops_is_recorded_failed(
    recorder: StartRecorder, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gate = Gate()
    function = await recorder(gate)
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


async def test_turned_async_calls_share_the_grace_that_began_when_the_gateway_stopped() -> None:
    """On SIGTERM aiohttp first waits up to shutdown_grace for the running sync calls, and
    only then does the cleanup wait for the calls that turned async: their wait counts from
    when the stop began (on_shutdown), so a stop takes one grace, not two."""
    now = [1000.0]
    nothing: Any = None  # what a turned-async call would need, and this one never reaches
    turn_async = TurnAsync(
        nothing,
        nothing,
        nothing,
        nothing,
        max_turned_async=1,
        max_wait_s=1.0,
        sync_async_after_s=1.0,
        shutdown_grace_s=60.0,
        max_held_bytes=1,
        clock=lambda: now[0],
    )
    running = asyncio.create_task(asyncio.Event().wait())  # a call that never ends
    turn_async._tasks.add(running)
    turn_async.stopping()
    now[0] += 60.0  # the grace, spent waiting for a sync call

    await asyncio.wait_for(turn_async.close(), DEADLINE_S)  # not another 60 s
    assert running.cancelled()
