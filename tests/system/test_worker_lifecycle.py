"""The queue-worker's lifecycle against a real nats-server: a call longer than the lease runs
once, two workers share the queue, stopping (in-process and as a real process on a signal)
lets running calls finish or hands them back, and a stream it must not use stops it at start.
"""

import asyncio
import contextlib
import signal
import sys
from collections.abc import Awaitable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from nats.js.api import RetentionPolicy, StorageType, StreamConfig

from faas_gateway.nats.provision import StreamConfigConflictError
from gateway.app import create_app
from tests.conftest import gateway_settings, stream_message_count
from tests.harness import ROOT, STREAM, RecordedRequest, registry_of, stop_process, wait_until
from tests.system.helpers import (
    CONSUMER,
    WAIT_S,
    accepted,
    call_ids,
    wait_stream_empty,
    worker_process_env,
    write_functions_file,
)


async def status_is_text(status: Awaitable[str], expected: str) -> bool:
    return await status == expected


# lease


async def test_call_lasting_three_ack_waits_runs_once(
    nats_client, held, recorder, start_gateway, start_worker, http
):
    # Held for 3.5 s against a 1 s lease: without renewal JetStream would hand it out again.
    function, _ = await held(hold_s=3.5)
    receiver = await recorder()
    registry = registry_of(slow=function.url)
    gateway = await start_gateway(registry)
    worker = await start_worker(registry, ack_wait_s=1.0)

    call_id = await accepted(http, gateway, "slow", receiver.url)

    [callback] = await receiver.wait_for_requests(1, WAIT_S)
    await wait_until(lambda: worker.completed == 1, WAIT_S, "the call to be acked")
    await wait_stream_empty(nats_client)
    assert callback.headers["X-Call-Id"] == call_id
    assert callback.headers["X-Function-Status"] == "200"
    assert call_ids(function.requests) == [call_id]
    assert len(receiver.requests) == 1
    info = await nats_client.jetstream().consumer_info(STREAM, CONSUMER)
    assert info.num_redelivered == 0
    assert info.num_ack_pending == 0


# sharing the queue


async def brief_work(request: web.Request, recorded: RecordedRequest) -> web.Response:
    # Long enough that one worker's ten slots cannot keep up with the whole queue alone.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.Event().wait(), 0.02)
    return web.Response(body=b"ok")


async def test_two_workers_split_the_queue_without_duplicates(
    nats_client, recorder, start_gateway, start_worker, http
):
    function = await recorder(brief_work)
    receiver = await recorder()
    registry = registry_of(work=function.url)
    gateway = await start_gateway(registry)
    workers = [await start_worker(registry, max_inflight=10) for _ in range(2)]

    posted = await asyncio.gather(
        *(accepted(http, gateway, "work", receiver.url) for _ in range(200))
    )

    await receiver.wait_for_requests(200, WAIT_S)
    await wait_until(
        lambda: sum(worker.completed for worker in workers) >= 200, WAIT_S, "200 acked calls"
    )
    await wait_stream_empty(nats_client)
    assert len(set(posted)) == 200
    invoked = function.by_call_id()
    assert set(invoked) == set(posted)
    assert all(len(attempts) == 1 for attempts in invoked.values())
    called_back = receiver.by_call_id()
    assert set(called_back) == set(posted)
    assert all(len(callbacks) == 1 for callbacks in called_back.values())
    assert sum(worker.completed for worker in workers) == 200
    assert all(worker.completed > 0 for worker in workers), [w.completed for w in workers]


# stopping in-process


async def test_stop_lets_the_running_call_finish_and_takes_no_more(
    nats_client, held, recorder, start_gateway, run_worker, http
):
    function, hold = await held()
    receiver = await recorder()
    registry = registry_of(held=function.url)
    gateway = await start_gateway(registry)
    worker, task = await run_worker(registry, shutdown_grace_s=20.0)
    running = await accepted(http, gateway, "held", receiver.url)
    await function.wait_for_requests(1, WAIT_S)

    worker.request_stop()
    after_stop = await accepted(http, gateway, "held", receiver.url)
    assert not task.done(), "the worker quit with a call running"
    hold.released.set()
    await asyncio.wait_for(task, WAIT_S)

    assert call_ids(receiver.requests) == [running]
    assert receiver.requests[0].headers["X-Function-Status"] == "200"
    assert call_ids(function.requests) == [running]
    assert (worker.completed, worker.interrupted) == (1, 0)
    assert await stream_message_count(nats_client) == 1

    # The call posted after the stop waits for the next worker, which need not wait out a
    # lease (30 s by default) if the stopping worker happened to fetch it and nak'd it.
    successor, _ = await run_worker(registry)
    await receiver.wait_for_requests(2, timeout_s=20.0)
    await wait_until(lambda: successor.completed == 1, WAIT_S, "the next worker to ack")
    await wait_stream_empty(nats_client)
    assert call_ids(function.requests) == [running, after_stop]
    assert call_ids(receiver.requests) == [running, after_stop]


async def test_call_outliving_the_grace_goes_back_to_the_queue_at_once(
    nats_client, held, recorder, start_gateway, run_worker, http
):
    function, hold = await held(hold_repeats=False)
    receiver = await recorder()
    registry = registry_of(held=function.url)
    gateway = await start_gateway(registry)
    # A 30 s lease: only the nak can make the call available to the next worker within it.
    first, first_task = await run_worker(registry, ack_wait_s=30.0, shutdown_grace_s=0.5)
    call_id = await accepted(http, gateway, "held", receiver.url)
    await function.wait_for_requests(1, WAIT_S)

    async def record_status() -> str:
        async with http.get(gateway.url(f"/system/activations/{call_id}")) as response:
            return str((await response.json())["status"])

    await wait_until(
        lambda: status_is_text(record_status(), "running"), WAIT_S, "the record: running"
    )
    first.request_stop()
    await asyncio.wait_for(first_task, WAIT_S)

    assert (first.completed, first.interrupted) == (0, 1)
    await wait_until(lambda: hold.aborted == [call_id], WAIT_S, "the first attempt to be aborted")
    assert receiver.requests == []

    second, _ = await run_worker(registry, ack_wait_s=30.0)
    # Well inside the 30 s lease the first worker took: the nak gave the call back.
    [callback] = await receiver.wait_for_requests(1, timeout_s=20.0)
    await wait_until(lambda: second.completed == 1, WAIT_S, "the second worker to ack")
    await wait_stream_empty(nats_client)
    assert callback.headers["X-Call-Id"] == call_id
    assert callback.headers["X-Function-Status"] == "200"
    assert hold.seen == [call_id, call_id]
    assert hold.answered == [call_id]
    assert len(receiver.requests) == 1
    # Not left 'running': the second worker's outcome is recorded, with both attempts.
    async with http.get(gateway.url(f"/system/activations/{call_id}")) as response:
        record = await response.json()
    assert record["status"] == "succeeded" and record["attempts"] == 2


# stopping the real process


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_worker_process_drains_on_signal_and_exits_0(
    signum, nats_server, held, recorder, start_gateway, http, tmp_path
):
    function, hold = await held()
    receiver = await recorder()
    gateway = await start_gateway(registry_of(held=function.url))
    functions_file = write_functions_file(tmp_path / "functions.yml", held=function.url)
    log_path = tmp_path / "worker.log"
    env = worker_process_env(nats_server.url, functions_file, shutdown_grace="10")
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "queue_worker", env=env, cwd=ROOT, stdout=log, stderr=log
        )
    try:
        call_id = await accepted(http, gateway, "held", receiver.url)
        await function.wait_for_requests(1, WAIT_S)

        process.send_signal(signum)
        await wait_until(
            lambda: b"stopping: no new calls" in log_path.read_bytes(),
            WAIT_S,
            "the worker to start draining",
        )
        assert process.returncode is None
        hold.released.set()
        returncode = await asyncio.wait_for(process.wait(), WAIT_S)
    finally:
        await stop_process(process)

    output = log_path.read_text()
    assert returncode == 0, output
    assert call_ids(receiver.requests) == [call_id], output
    assert "1 calls complete, 0 returned to the queue" in output


# a stream we must not use


async def test_conflicting_stream_stops_worker_and_gateway(
    nats_server, nats_client, run_worker, tmp_path
):
    js = nats_client.jetstream()
    await js.add_stream(
        StreamConfig(
            name=STREAM,
            subjects=["faas.async.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
        )
    )
    registry = registry_of(echo="http://127.0.0.1:9")
    expected = r"stream 'faas-async' exists with a conflicting config: retention is limits"

    worker, task = await run_worker(registry, wait_ready=False)
    with pytest.raises(StreamConfigConflictError, match=expected):
        await asyncio.wait_for(task, WAIT_S)
    assert not worker.ready.is_set()

    server = TestServer(create_app(gateway_settings(nats_server.url), registry), host="127.0.0.1")
    try:
        with pytest.raises(StreamConfigConflictError, match=expected):
            await asyncio.wait_for(server.start_server(), WAIT_S)
    finally:
        await server.close()

    functions_file = write_functions_file(tmp_path / "functions.yml", echo="http://127.0.0.1:9")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "queue_worker",
        env=worker_process_env(nats_server.url, functions_file),
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), WAIT_S)
    finally:
        await stop_process(process)
    assert process.returncode == 1
    assert "faas-queue-worker: NATS stream 'faas-async' exists with a conflicting config" in (
        stderr.decode()
    )

    # Nothing touched the stream that was there.
    info = await js.stream_info(STREAM)
    assert info.config.retention == RetentionPolicy.LIMITS
