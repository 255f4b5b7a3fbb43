"""The queue-worker's lifecycle and what happens when parts fail, against a real nats-server.

Nothing on the NATS side is mocked: the tests kill and restart nats-server, run the worker as a
real process and send it signals. Functions and callback receivers are aiohttp servers.
"""

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import nats
import nats.errors
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from nats.aio.client import Client as NatsClient
from nats.js.api import RetentionPolicy, StorageType, StreamConfig

from faas_gateway.core.functions import Registry
from faas_gateway.nats.provision import StreamConfigConflictError
from gateway.app import create_app
from queue_worker.worker import Worker
from tests.conftest import RunningGateway, gateway_settings, stream_message_count, worker_settings
from tests.harness import (
    ROOT,
    NatsServer,
    RecordedRequest,
    Recorder,
    nats_server_binary,
    registry_of,
    stop_process,
    subprocess_env,
    wait_until,
)

# Generous: other people's test runs share this 2-core machine.
WAIT_S = 30.0
STREAM = "faas-async"
CONSUMER = "faas-queue-worker"


# helpers


class HeldFunction:
    """A fake function whose calls wait until the test releases them (or ``hold_s`` passes).

    ``hold_repeats=False`` answers a call id it has seen before at once: the second attempt of
    a call goes through while the first one stays held.
    """

    def __init__(self, hold_s: float, hold_repeats: bool) -> None:
        self.released = asyncio.Event()
        self.hold_s = hold_s
        self.hold_repeats = hold_repeats
        self.seen: list[str] = []
        self.aborted: list[str] = []  # the caller went away while the call was held
        self.answered: list[str] = []
        self.running = 0
        self.most_running = 0

    async def __call__(self, request: web.Request, recorded: RecordedRequest) -> web.Response:
        call_id = recorded.headers.get("X-Call-Id", "")
        repeat = call_id in self.seen
        self.seen.append(call_id)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            if self.hold_repeats or not repeat:
                await self._hold(call_id)
        finally:
            self.running -= 1
        self.answered.append(call_id)
        return web.Response(body=b"done")

    async def _hold(self, call_id: str) -> None:
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.released.wait(), self.hold_s)
        except asyncio.CancelledError:
            self.aborted.append(call_id)
            raise


HeldStarter = Callable[..., Awaitable[tuple[Recorder, HeldFunction]]]
WorkerStarter = Callable[..., Awaitable[tuple[Worker, "asyncio.Task[None]"]]]


@pytest.fixture
async def held(recorder: Callable[..., Awaitable[Recorder]]) -> AsyncIterator[HeldStarter]:
    """``await held(hold_s=..., hold_repeats=...)``: a function server and its hold control.

    Every hold is released at teardown, before the servers close (which waits for handlers).
    """
    made: list[HeldFunction] = []

    async def start(
        hold_s: float = 60.0, hold_repeats: bool = True
    ) -> tuple[Recorder, HeldFunction]:
        function = HeldFunction(hold_s, hold_repeats)
        made.append(function)
        return await recorder(function), function

    yield start
    for function in made:
        function.released.set()


@pytest.fixture
async def run_worker(nats_server: NatsServer) -> AsyncIterator[WorkerStarter]:
    """Like ``start_worker`` but also hands back the ``main()`` task, and can skip the wait."""
    running: list[tuple[Worker, asyncio.Task[None]]] = []

    async def start(
        registry: Registry, *, wait_ready: bool = True, **overrides: Any
    ) -> tuple[Worker, asyncio.Task[None]]:
        worker = Worker(worker_settings(nats_server.url, **overrides), registry)
        task = asyncio.create_task(worker.main())
        running.append((worker, task))
        if wait_ready:
            await wait_until(
                lambda: worker.ready.is_set() or task.done(), WAIT_S, "the worker to consume"
            )
            if task.done():
                task.result()
        return worker, task

    yield start
    for worker, _ in running:
        worker.request_stop()
        worker.request_stop()  # tests end at once: running calls go back to the queue
    for _, task in running:
        if task.done() and not task.cancelled() and task.exception() is not None:
            continue  # a failure the test looked at already
        await asyncio.wait_for(task, WAIT_S)


async def post_async(
    http: aiohttp.ClientSession,
    gateway: RunningGateway,
    function: str,
    callback_url: str,
    call_id: str | None = None,
) -> tuple[int, dict[str, Any]]:
    headers = {"X-Callback-Url": callback_url}
    if call_id is not None:
        headers["X-Call-Id"] = call_id
    async with http.post(
        gateway.url(f"/async-function/{function}"), data=b"work", headers=headers
    ) as response:
        assert response.content_type == "application/json"
        return response.status, await response.json()


async def accepted(
    http: aiohttp.ClientSession,
    gateway: RunningGateway,
    function: str,
    callback_url: str,
    call_id: str | None = None,
) -> str:
    status, body = await post_async(http, gateway, function, callback_url, call_id)
    assert status == 202, body
    return str(body["callId"])


async def http_status(http: aiohttp.ClientSession, url: str) -> int:
    """The status of GET ``url``; 0 when there was no answer."""
    try:
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=5)) as response:
            return response.status
    except (aiohttp.ClientError, TimeoutError):
        return 0


async def status_is(status: Awaitable[int], expected: int) -> bool:
    return await status == expected


async def status_is_text(status: Awaitable[str], expected: str) -> bool:
    return await status == expected


async def worker_nats_state(http: aiohttp.ClientSession, worker: Worker) -> str | None:
    try:
        async with http.get(f"http://127.0.0.1:{worker.status_port}/healthz") as response:
            return str((await response.json())["nats"])
    except (aiohttp.ClientError, TimeoutError):
        return None


async def messages_in_stream(client: NatsClient) -> int | None:
    """None while the client cannot ask (NATS down or reconnecting)."""
    try:
        return await stream_message_count(client, STREAM)
    except (TimeoutError, nats.errors.Error):
        return None


async def wait_stream_empty(client: NatsClient) -> None:
    async def empty() -> bool:
        return await messages_in_stream(client) == 0

    await wait_until(empty, WAIT_S, "the stream to be empty")


def call_ids(requests: list[RecordedRequest]) -> list[str]:
    return [request.headers.get("X-Call-Id", "") for request in requests]


def write_functions_file(path: Path, **urls: str) -> Path:
    path.write_text(
        yaml.safe_dump({"functions": {name: {"url": url} for name, url in urls.items()}})
    )
    return path


def worker_process_env(nats_url: str, functions_file: Path, **settings: str) -> dict[str, str]:
    return subprocess_env(
        nats_url=nats_url,
        functions_file=str(functions_file),
        worker_port="0",
        nats_reconnect_wait="0.1",
        fetch_wait="0.5",
        log_level="info",
        **settings,
    )


async def start_nats_without_jetstream(port: int, log_path: Path) -> asyncio.subprocess.Process:
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            nats_server_binary(), "--addr", "127.0.0.1", "--port", str(port), stdout=log, stderr=log
        )
    try:
        await wait_until(
            lambda: b"Server is ready" in log_path.read_bytes(), WAIT_S, "plain nats-server"
        )
    except BaseException:
        await stop_process(process)
        raise
    return process


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


# NATS outages


async def test_async_calls_get_503_while_nats_is_down_and_recover(
    nats_server, nats_client, recorder, start_gateway, start_worker, http
):
    function = await recorder()
    receiver = await recorder()
    registry = registry_of(echo=function.url)
    gateway = await start_gateway(registry, publish_timeout_s=0.5)
    worker = await start_worker(registry)
    healthz = gateway.url("/healthz")
    assert await http_status(http, healthz) == 200

    nats_server.kill()
    # At once, before the gateway may have noticed, and again once it has.
    status, body = await asyncio.wait_for(
        post_async(http, gateway, "echo", receiver.url, "refused-at-once"), WAIT_S
    )
    assert (status, body["callId"]) == (503, "refused-at-once")
    assert body["error"]
    await wait_until(
        lambda: status_is(http_status(http, healthz), 503), WAIT_S, "gateway /healthz to be 503"
    )
    status, body = await asyncio.wait_for(
        post_async(http, gateway, "echo", receiver.url, "refused-later"), WAIT_S
    )
    assert (status, body["callId"]) == (503, "refused-later")

    await nats_server.start()
    await wait_until(
        lambda: status_is(http_status(http, healthz), 200), WAIT_S, "gateway /healthz to recover"
    )
    later = await accepted(http, gateway, "echo", receiver.url, "after-restart")

    await receiver.wait_for_requests(1, WAIT_S)
    await wait_until(lambda: worker.completed == 1, WAIT_S, "the worker to ack")
    await wait_stream_empty(nats_client)
    assert call_ids(function.requests) == [later]
    assert call_ids(receiver.requests) == [later]


async def test_accepted_calls_survive_a_nats_crash(
    nats_server, nats_client, recorder, start_gateway, start_worker, http
):
    function = await recorder()
    receiver = await recorder()
    registry = registry_of(echo=function.url)
    gateway = await start_gateway(registry)
    posted = await asyncio.gather(
        *(accepted(http, gateway, "echo", receiver.url) for _ in range(20))
    )
    assert await stream_message_count(nats_client) == 20

    nats_server.kill()
    await nats_server.start()

    async def all_still_queued() -> bool:
        return await messages_in_stream(nats_client) == 20

    await wait_until(all_still_queued, WAIT_S, "the restarted server to hold all 20 calls")
    worker = await start_worker(registry)
    await receiver.wait_for_requests(20, WAIT_S)
    await wait_until(lambda: worker.completed >= 20, WAIT_S, "20 acked calls")
    await wait_stream_empty(nats_client)
    assert worker.completed == 20
    invoked = function.by_call_id()
    assert set(invoked) == set(posted)
    assert all(len(attempts) == 1 for attempts in invoked.values())
    called_back = receiver.by_call_id()
    assert set(called_back) == set(posted)
    assert all(len(callbacks) == 1 for callbacks in called_back.values())


async def test_running_worker_reconnects_after_nats_restart(
    nats_server, nats_client, recorder, start_gateway, start_worker, http
):
    function = await recorder()
    receiver = await recorder()
    registry = registry_of(echo=function.url)
    gateway = await start_gateway(registry)
    worker = await start_worker(registry)
    before = await accepted(http, gateway, "echo", receiver.url)
    await receiver.wait_for_requests(1, WAIT_S)
    await wait_until(lambda: worker.completed == 1, WAIT_S, "the first call to be acked")
    await wait_stream_empty(nats_client)

    nats_server.kill()
    await nats_server.start()
    await wait_until(
        lambda: status_is(http_status(http, gateway.url("/healthz")), 200),
        WAIT_S,
        "the gateway to reconnect",
    )
    after = [await accepted(http, gateway, "echo", receiver.url) for _ in range(5)]

    await receiver.wait_for_requests(6, WAIT_S)
    await wait_until(lambda: worker.completed >= 6, WAIT_S, "6 acked calls")
    await wait_stream_empty(nats_client)
    assert worker.completed == 6
    # Each exactly once; the five after the restart run concurrently, in any order.
    assert call_ids(function.requests)[0] == before
    assert sorted(call_ids(function.requests)) == sorted([before, *after])
    assert sorted(call_ids(receiver.requests)) == sorted([before, *after])
    assert await http_status(http, f"http://127.0.0.1:{worker.status_port}/healthz") == 200


async def test_worker_idle_through_an_outage_takes_no_more_than_max_inflight_after(
    nats_server, nats_client, held, recorder, start_gateway, start_worker, http
):
    blocker, blocking = await held()
    function, hold = await held()
    receiver = await recorder()
    registry = registry_of(blocker=blocker.url, held=function.url)
    gateway = await start_gateway(registry)
    # Short fetches: a worker that kept fetching while NATS is away would try many times.
    # No fetching ahead, so that both slots are free, and nothing held, during the outage.
    worker = await start_worker(registry, max_inflight=2, fetch_wait_s=0.05, prefetch=0)
    for _ in range(2):
        await accepted(http, gateway, "blocker", receiver.url)
    await blocker.wait_for_requests(2, WAIT_S)
    queued = [await accepted(http, gateway, "held", receiver.url) for _ in range(10)]

    # A clean stop: after a SIGKILL JetStream may forget deliveries that were in flight and
    # hand them out again, which is at least once but would blur what this test counts.
    nats_server.stop()

    async def worker_disconnected() -> bool:
        return await worker_nats_state(http, worker) == "disconnected"

    await wait_until(worker_disconnected, WAIT_S, "the worker to notice NATS is gone")
    # Both slots come free while NATS is down; the callbacks go out, and the records and acks
    # wait for the reconnect.
    blocking.released.set()
    await receiver.wait_for_requests(2, WAIT_S)
    await wait_until(lambda: worker.inflight == 0, WAIT_S, "both slots to be free")
    await nats_server.start()

    await function.wait_for_requests(2, WAIT_S)
    await wait_until(lambda: worker.completed >= 2, WAIT_S, "the first two calls acked")
    info = await nats_client.jetstream().consumer_info(STREAM, CONSUMER)
    assert info.num_ack_pending == 2, "more calls were handed to the worker than it may run"
    assert worker.inflight == 2
    hold.released.set()
    await receiver.wait_for_requests(12, WAIT_S)
    await wait_until(lambda: worker.completed >= 12, WAIT_S, "12 acked calls")
    await wait_stream_empty(nats_client)
    assert hold.most_running == 2
    assert sorted(call_ids(function.requests)) == sorted(queued)
    assert sorted(call_ids(receiver.requests)) == sorted([*call_ids(blocker.requests), *queued])


async def test_sync_calls_work_while_nats_is_down(nats_server, recorder, start_gateway, http):
    function = await recorder()
    registry = registry_of(echo=function.url)
    gateway = await start_gateway(registry)
    nats_server.kill()
    await wait_until(
        lambda: status_is(http_status(http, gateway.url("/healthz")), 503),
        WAIT_S,
        "the gateway to notice NATS is gone",
    )
    # A gateway that starts while NATS is down serves sync calls too.
    late_gateway = await start_gateway(registry, nats_startup_wait_s=0.2)

    for running in (gateway, late_gateway):
        async with http.post(running.url("/function/echo/sub"), data=b"sync") as response:
            assert response.status == 200
            assert await response.read() == b"ok"
    assert [(r.path, r.body) for r in function.requests] == [("/sub", b"sync")] * 2


async def test_worker_started_while_nats_is_down_consumes_once_it_is_up(
    nats_server, recorder, start_gateway, run_worker, http
):
    function = await recorder()
    receiver = await recorder()
    registry = registry_of(echo=function.url)
    nats_server.kill()
    worker, task = await run_worker(registry, wait_ready=False)
    await wait_until(lambda: worker.status_port is not None, WAIT_S, "the status listener")
    status_url = f"http://127.0.0.1:{worker.status_port}/healthz"
    assert await http_status(http, status_url) == 503
    assert not worker.ready.is_set()
    assert not task.done()

    await nats_server.start()
    await asyncio.wait_for(worker.ready.wait(), WAIT_S)
    gateway = await start_gateway(registry)
    call_id = await accepted(http, gateway, "echo", receiver.url)

    [callback] = await receiver.wait_for_requests(1, WAIT_S)
    assert callback.headers["X-Call-Id"] == call_id
    assert call_ids(function.requests) == [call_id]
    assert await http_status(http, status_url) == 200


async def test_worker_waits_for_jetstream_to_become_available(
    nats_server, recorder, start_gateway, run_worker, http, tmp_path, caplog
):
    function = await recorder()
    receiver = await recorder()
    registry = registry_of(echo=function.url)
    nats_server.kill()
    plain = await start_nats_without_jetstream(nats_server.port, tmp_path / "plain-nats.log")
    try:
        worker, task = await run_worker(registry, wait_ready=False)
        await wait_until(
            lambda: task.done() or "cannot set up stream and consumer yet" in caplog.text,
            WAIT_S,
            "the worker to find JetStream missing",
        )
        assert not task.done(), "the worker gave up instead of waiting for JetStream"
        assert not worker.ready.is_set()
    finally:
        await stop_process(plain)

    await nats_server.start()
    await asyncio.wait_for(worker.ready.wait(), WAIT_S)
    gateway = await start_gateway(registry)
    call_id = await accepted(http, gateway, "echo", receiver.url)
    [callback] = await receiver.wait_for_requests(1, WAIT_S)
    assert callback.headers["X-Call-Id"] == call_id


async def test_worker_closed_while_connecting_stops_promptly(nats_server, run_worker):
    nats_server.kill()
    worker, task = await run_worker(registry_of(echo="http://127.0.0.1:9"), wait_ready=False)
    await wait_until(lambda: worker.status_port is not None, WAIT_S, "the status listener")

    await asyncio.wait_for(worker.close(), 10)

    await asyncio.wait_for(task, 10)
    assert not worker.ready.is_set()
    assert worker.completed == 0


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


class RegistryFailingOnce(Registry):
    """The worker's own code failing once, in the middle of handling a call."""

    def __init__(self, inner: Registry) -> None:
        super().__init__({function.name: function for function in inner})
        self.failures_left = 1

    def get(self, name: str):  # type: ignore[no-untyped-def]
        if self.failures_left:
            self.failures_left -= 1
            raise RuntimeError("simulated bug in the worker")
        return super().get(name)


async def test_unexpected_failure_keeps_the_call_and_retries_it_later(
    nats_client, recorder, start_gateway, start_worker, http
):
    function = await recorder()
    receiver = await recorder()
    registry = registry_of(echo=function.url)
    gateway = await start_gateway(registry)
    worker = await start_worker(RegistryFailingOnce(registry), ack_wait_s=0.5)

    call_id = await accepted(http, gateway, "echo", receiver.url)

    [callback] = await receiver.wait_for_requests(1, WAIT_S)
    await wait_until(lambda: worker.completed == 1, WAIT_S, "the retried call to be acked")
    await wait_stream_empty(nats_client)
    assert callback.headers["X-Call-Id"] == call_id
    assert call_ids(function.requests) == [call_id]
    crashed = worker.metrics.registry.get_sample_value(
        "queue_worker_messages_processed_total", {"function_name": "echo", "outcome": "crashed"}
    )
    assert crashed == 1


async def test_sigkill_of_a_busy_worker_loses_no_call_and_repeats_only_those_in_flight(
    nats_server, recorder, start_gateway, http, tmp_path
):
    async def brief(request: web.Request, recorded: RecordedRequest) -> web.Response:
        await asyncio.sleep(0.02)
        return web.Response(text="done")

    function = await recorder(brief)
    receiver = await recorder()
    gateway = await start_gateway(registry_of(work=function.url))
    functions_file = write_functions_file(tmp_path / "functions.yml", work=function.url)
    queued = [await accepted(http, gateway, "work", receiver.url) for _ in range(500)]
    # A short lease, so that the killed worker's calls come back soon.
    env = worker_process_env(nats_server.url, functions_file, max_inflight="50", ack_wait="2")

    async def start_worker_process(name: str) -> asyncio.subprocess.Process:
        with (tmp_path / f"{name}.log").open("wb") as log:
            return await asyncio.create_subprocess_exec(
                sys.executable, "-m", "queue_worker", env=env, cwd=ROOT, stdout=log, stderr=log
            )

    first = await start_worker_process("first")
    second = None
    try:
        await wait_until(lambda: len(receiver.requests) >= 250, WAIT_S, "half the callbacks")
        first.send_signal(signal.SIGKILL)
        await first.wait()
        # What the killed worker had not finished: calls started and not yet called back, and
        # calls called back whose delivery it had not recorded yet. Only they may run, or be
        # called back, twice.
        called_back = set(call_ids(receiver.requests))
        in_flight = set(call_ids(function.requests)) - called_back
        for call_id in called_back:
            async with http.get(gateway.url(f"/system/activations/{call_id}")) as response:
                record = await response.json()
            if record["callback"]["state"] != "delivered":
                in_flight.add(call_id)
        second = await start_worker_process("second")

        await wait_until(
            lambda: len(set(call_ids(receiver.requests))) == len(queued),
            60,
            "a callback for every call",
        )
        for call_id in queued[::25]:  # the records agree
            async with http.get(gateway.url(f"/system/activations/{call_id}")) as response:
                record = await response.json()
                assert record["status"] == "succeeded", record
    finally:
        for process in (first, second):
            if process is not None:
                await stop_process(process)

    invoked: dict[str, int] = {}
    for call_id in call_ids(function.requests):
        invoked[call_id] = invoked.get(call_id, 0) + 1
    callbacks: dict[str, int] = {}
    for call_id in call_ids(receiver.requests):
        callbacks[call_id] = callbacks.get(call_id, 0) + 1
    assert set(invoked) == set(queued) == set(callbacks)
    invoked_again = {call_id for call_id, count in invoked.items() if count > 1}
    called_back_again = {call_id for call_id, count in callbacks.items() if count > 1}
    assert invoked_again <= in_flight, f"{len(invoked_again)} invoked twice"
    assert called_back_again <= in_flight, f"{len(called_back_again)} called back twice"
    print(
        f"SIGKILL with {len(in_flight)} calls in flight: {len(invoked_again)} invoked again, "
        f"{len(called_back_again)} called back again; "
        f"{len(queued) - len(invoked_again | called_back_again)} ran and were called back once"
    )


async def test_nats_sigkilled_during_a_burst_keeps_every_202_and_runs_no_clear_503(
    nats_server, recorder, start_gateway, start_worker, http
):
    function = await recorder()
    receiver = await recorder()
    registry = registry_of(echo=function.url)
    gateway = await start_gateway(registry, publish_timeout_s=2.0)
    await wait_until(
        lambda: status_is(http_status(http, gateway.url("/healthz")), 200), WAIT_S, "gateway"
    )
    answered: dict[str, int] = {}
    sent_at_kill: set[str] = set()
    unanswered: set[str] = set()

    async def post(index: int) -> None:
        call_id = f"burst-{index}"
        unanswered.add(call_id)
        status, _ = await post_async(http, gateway, "echo", receiver.url, call_id)
        answered[call_id] = status
        unanswered.discard(call_id)

    posts = [asyncio.create_task(post(index)) for index in range(500)]
    await wait_until(lambda: len(answered) >= 150, WAIT_S, "a third of the burst answered")
    nats_server.kill()
    sent_at_kill.update(unanswered)  # their fate was being decided at the kill
    await asyncio.gather(*posts)
    await nats_server.start()
    await start_worker(registry)

    accepted = {call_id for call_id, status in answered.items() if status == 202}
    rejected = {call_id for call_id, status in answered.items() if status == 503}
    assert accepted | rejected == set(answered), set(answered.values())
    assert len(rejected) > 0, "the kill came too late to test anything"
    await wait_until(
        lambda: accepted <= set(call_ids(receiver.requests)), WAIT_S, "every 202 to complete"
    )
    # Everything queued has run: nothing else can turn up later.
    await wait_until(lambda: stream_empty(nats_server.url), WAIT_S, "an empty queue")
    ran_after_503 = rejected & set(call_ids(function.requests))
    # A publish the server stored just before dying, whose ack never left it, is a 503 that
    # still runs (README, delivery guarantee); only a request in flight at the kill can be one.
    assert ran_after_503 <= sent_at_kill, ran_after_503
    print(f"{len(accepted)} accepted, {len(rejected)} rejected, {len(ran_after_503)} ran anyway")


async def stream_empty(nats_url: str) -> bool:
    client = await nats.connect(nats_url)
    try:
        return await stream_message_count(client, STREAM) == 0
    finally:
        await client.close()


# redeliveries of calls that ran (issue: trust boundaries, crashes and pauses)


async def test_a_finished_call_delivered_again_with_count_1_is_not_run_again(
    nats_client, recorder, start_gateway, start_worker, http
):
    """The server may lose an ack (a crash) and hand a finished call out again as a first
    delivery: the worker goes by the call's record, not by the delivery count."""
    function = await recorder()
    receiver = await recorder()
    registry = registry_of(echo=function.url)
    gateway = await start_gateway(registry)
    await wait_until(
        lambda: status_is(http_status(http, gateway.url("/healthz")), 200), WAIT_S, "gateway"
    )
    call_id = await accepted(http, gateway, "echo", receiver.url)
    message = await nats_client.jetstream().get_msg(STREAM, 1)  # as queued, before it runs
    assert message.data is not None and message.subject is not None
    worker = await start_worker(registry)
    await receiver.wait_for_requests(1, WAIT_S)
    await wait_until(lambda: worker.completed == 1, WAIT_S, "the call to be acked")
    await wait_stream_empty(nats_client)

    await nats_client.jetstream().publish(message.subject, message.data)  # delivered once more
    await wait_stream_empty(nats_client)  # the copy is acked

    assert call_ids(function.requests) == [call_id]
    assert call_ids(receiver.requests) == [call_id]


async def test_a_worker_paused_past_its_lease_runs_no_call_twice(
    nats_server, held, recorder, start_gateway, http, tmp_path
):
    """SIGSTOP a worker while its calls run, past ack_wait: JetStream hands them out again
    when it resumes, to the same worker, which still runs them and must not start them twice."""
    function, control = await held(hold_s=60.0)
    receiver = await recorder()
    gateway = await start_gateway(registry_of(slow=function.url))
    functions_file = write_functions_file(tmp_path / "functions.yml", slow=function.url)
    env = worker_process_env(nats_server.url, functions_file, max_inflight="20", ack_wait="1")
    with (tmp_path / "worker.log").open("wb") as log:
        worker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "queue_worker", env=env, cwd=ROOT, stdout=log, stderr=log
        )
    try:
        queued = [await accepted(http, gateway, "slow", receiver.url) for _ in range(20)]
        await wait_until(lambda: len(function.requests) == 20, WAIT_S, "every call to start")
        worker.send_signal(signal.SIGSTOP)
        stopped_at = asyncio.get_running_loop().time()
        # Three leases' time: every held message's lease runs out while the worker sleeps.
        await wait_until(
            lambda: asyncio.get_running_loop().time() > stopped_at + 3.0, WAIT_S, "3 s to pass"
        )
        worker.send_signal(signal.SIGCONT)
        resumed_at = asyncio.get_running_loop().time()
        # The calls still run when JetStream hands them out again: the worker knows them (its
        # log says so), or after a while the test goes on and sees what it did with them.
        log_path = tmp_path / "worker.log"
        await wait_until(
            lambda: (
                log_path.read_bytes().count(b"redelivered while handled here") == 20
                or asyncio.get_running_loop().time() > resumed_at + 5.0
            ),
            WAIT_S,
            "the calls to be handed out again",
        )
        control.released.set()
        await wait_until(
            lambda: set(call_ids(receiver.requests)) == set(queued), WAIT_S, "every callback"
        )
        await wait_until(lambda: stream_empty(nats_server.url), WAIT_S, "an empty queue")
    finally:
        with contextlib.suppress(ProcessLookupError):
            worker.send_signal(signal.SIGCONT)
        await stop_process(worker)
    assert sorted(call_ids(function.requests)) == sorted(queued), "a call ran twice"
    assert sorted(call_ids(receiver.requests)) == sorted(queued), "a call was called back twice"


async def test_nats_killed_for_seconds_runs_no_call_twice(
    nats_server, recorder, start_gateway, start_worker, http
):
    """nats-server SIGKILLed for a few seconds (far below ack_wait) while calls finish: acks
    and writes in flight are lost, and what comes back is settled by the records."""

    async def brief(request: web.Request, recorded: RecordedRequest) -> web.Response:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.Event().wait(), 0.01)
        return web.Response(text="done")

    function = await recorder(brief)
    receiver = await recorder()
    registry = registry_of(work=function.url)
    gateway = await start_gateway(registry)
    await wait_until(
        lambda: status_is(http_status(http, gateway.url("/healthz")), 200), WAIT_S, "gateway"
    )
    queued = [await accepted(http, gateway, "work", receiver.url) for _ in range(300)]
    # A lease longer than the outage (as the default 30 s is), yet short enough that messages
    # whose delivery the server forgot come back soon.
    await start_worker(registry, max_inflight=50, ack_wait_s=10.0)
    await wait_until(lambda: len(receiver.requests) >= 100, WAIT_S, "a third of the callbacks")
    nats_server.kill()
    killed_at = asyncio.get_running_loop().time()
    await wait_until(
        lambda: asyncio.get_running_loop().time() > killed_at + 4.0, WAIT_S, "4 s to pass"
    )
    await nats_server.start()
    await wait_until(
        lambda: set(call_ids(receiver.requests)) >= set(queued), WAIT_S * 2, "every callback"
    )
    await wait_until(lambda: stream_empty(nats_server.url), WAIT_S, "an empty queue")
    invoked = call_ids(function.requests)
    called_back = call_ids(receiver.requests)
    assert sorted(invoked) == sorted(queued), f"{len(invoked) - len(set(invoked))} ran twice"
    assert sorted(called_back) == sorted(queued), (
        f"{len(called_back) - len(set(called_back))} called back twice"
    )
