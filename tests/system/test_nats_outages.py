"""NATS outages: nats-server killed and restarted under a running gateway and worker, or not
there yet when they start. Async calls get 503 while the queue is down, nothing accepted is
lost, and both processes take up their work again once it is back.
"""

import asyncio
from pathlib import Path

import aiohttp

from queue_worker.worker import Worker
from tests.conftest import stream_message_count
from tests.harness import STREAM, nats_server_binary, registry_of, stop_process, wait_until
from tests.system.helpers import (
    CONSUMER,
    WAIT_S,
    accepted,
    call_ids,
    http_status,
    messages_in_stream,
    post_async,
    status_is,
    wait_stream_empty,
)


async def worker_nats_state(http: aiohttp.ClientSession, worker: Worker) -> str | None:
    try:
        async with http.get(f"http://127.0.0.1:{worker.status_port}/healthz") as response:
            return str((await response.json())["nats"])
    except (aiohttp.ClientError, TimeoutError):
        return None


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
