"""Crashes and pauses: the worker's own code failing mid-call, a busy worker SIGKILLed, NATS
SIGKILLed during a burst, and redeliveries of calls that ran (a lost ack, a worker paused past
its lease): no accepted call is lost and none that finished runs again.
"""

import asyncio
import contextlib
import signal
import sys

import nats
import nats.errors
from aiohttp import web

from faas_gateway.core.functions import Registry
from tests.conftest import stream_message_count
from tests.harness import (
    ROOT,
    STREAM,
    RecordedRequest,
    get_json,
    registry_of,
    stop_process,
    wait_until,
)
from tests.system.helpers import (
    WAIT_S,
    accepted,
    call_ids,
    http_status,
    post_async,
    status_is,
    wait_stream_empty,
    worker_process_env,
    write_functions_file,
)


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
    # still runs (docs/delivery.md); only a request in flight at the kill can be one.
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
    worker = await start_worker(registry, max_inflight=50, ack_wait_s=10.0)
    await wait_until(lambda: len(receiver.requests) >= 100, WAIT_S, "a third of the callbacks")
    nats_server.kill()
    killed_at = asyncio.get_running_loop().time()
    await wait_until(
        lambda: asyncio.get_running_loop().time() > killed_at + 4.0, WAIT_S, "4 s to pass"
    )
    await nats_server.start()
    try:
        await wait_until(
            lambda: set(call_ids(receiver.requests)) >= set(queued), WAIT_S * 2, "every callback"
        )
    except AssertionError as exc:
        # Seen once in a full suite run and never alone: say where the missing calls are.
        missing = sorted(set(queued) - set(call_ids(receiver.requests)))
        records = [
            await get_json(http, gateway.url(f"/system/activations/{call_id}"))
            for call_id in missing[:5]
        ]
        raise AssertionError(
            f"{exc}: {len(missing)} not called back; worker running {worker.inflight}, "
            f"connected {worker._link.connected}; their records: {records}"
        ) from exc
    await wait_until(lambda: stream_empty(nats_server.url), WAIT_S, "an empty queue")
    invoked = call_ids(function.requests)
    called_back = call_ids(receiver.requests)
    assert sorted(invoked) == sorted(queued), f"{len(invoked) - len(set(invoked))} ran twice"
    assert sorted(called_back) == sorted(queued), (
        f"{len(called_back) - len(set(called_back))} called back twice"
    )
