"""The worker: pull calls from the shared consumer, run up to max_inflight at once, drain on stop.

Lifecycle: ``run()`` blocks (the CLI), ``main()`` is awaitable (tests), ``request_stop()`` is
what SIGTERM and SIGINT call, ``close()`` stops and waits. Phases: ``_start`` (connect,
provision, bind), ``_consume`` (fetch and dispatch), ``_drain``, ``_release``. What happens to
one call is queue_worker/handling.py; what may be taken and started, queue_worker/admission.py.
"""

import asyncio
import contextlib
import gc
import logging
import signal
import time
from typing import Any

import nats.errors
from nats.js.errors import APIError, NotFoundError

from faas_gateway.core.call import MalformedMessageError, QueuedCall
from faas_gateway.core.functions import Registry
from faas_gateway.core.retry import Backoff, RetryPolicy, parse_codes
from faas_gateway.http.callbacks import CallbackSender
from faas_gateway.http.client import Timeouts, UpstreamClient
from faas_gateway.nats.activations import ActivationStore, ActivationStoreError, StoredActivation
from faas_gateway.nats.cancellations import CancellationWatch
from faas_gateway.nats.dead_letters import DeadLetters
from faas_gateway.nats.function_store import FunctionWatch
from faas_gateway.nats.jetstream import Delivery
from faas_gateway.nats.link import NatsLink, retry_until_answers
from faas_gateway.nats.names import Names
from faas_gateway.nats.provision import Plan, ensure_all
from faas_gateway.nats.results import ResultStore
from faas_gateway.runtime.logs import call_context
from faas_gateway.runtime.loops import new_event_loop
from queue_worker.admission import Admission, Claim, RecentIds
from queue_worker.consumer import Puller, ensure_consumer
from queue_worker.decisions import Ending, Settle, heartbeat_interval_s, settle
from queue_worker.handling import CallHandler, Lease
from queue_worker.invoker import FunctionInvoker
from queue_worker.metrics import WorkerMetrics
from queue_worker.pending import read_pending
from queue_worker.settings import WorkerSettings
from queue_worker.status import StatusServer

log = logging.getLogger("faas.worker")

# How long start-up waits for the functions deployed through the API before consuming.
FUNCTIONS_SYNC_WAIT_S = 5.0
# Calls finished here are remembered this long, for a redelivery whose batch read of the
# records was answered just before the outcome was written.
FINISHED_KEEP_S = 60.0
FINISHED_MAX_IDS = 100_000
# Container objects allocated (net) between two young-generation collections; Python's
# default is 700. See tune_garbage_collector.
GC_YOUNG_THRESHOLD = 10_000


def tune_garbage_collector() -> None:
    """Fewer and cheaper cyclic collections: a call allocates a few dozen objects that nearly
    all die young, freed by their reference counts, and Python's default threshold collected
    about every 20 calls (6-8% of the worker's CPU in bench scenario 6, a third of it in full
    collections that walked every module, setting and metric). What exists at start-up lives
    as long as the process: frozen, no collection walks it again."""
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


class Worker:
    def __init__(
        self,
        settings: WorkerSettings,
        registry: Registry,
        *,
        metrics: WorkerMetrics | None = None,
        handle_signals: bool = False,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics or WorkerMetrics()
        self.handle_signals = handle_signals
        self.ready = asyncio.Event()  # consuming: stream, consumer and status port are up
        self.completed = 0
        self.interrupted = 0
        self.status_port: int | None = None
        self._stopping = asyncio.Event()
        self._forced = asyncio.Event()
        self._finished = asyncio.Event()
        self._reconnected = asyncio.Event()
        self.admission = Admission(settings.max_inflight, self.prefetch)
        self._tasks: set[asyncio.Task[None]] = set()
        # Calls taken and not settled yet, by call id: a second delivery of one of them is
        # adopted by its lease (a redelivery) or dropped (a copy), never run again.
        self._handling: dict[str, Lease] = {}
        self._finished_here = RecentIds(FINISHED_KEEP_S, FINISHED_MAX_IDS)
        self._retry_policy = RetryPolicy(
            max_attempts=settings.max_retry_attempts,
            retry_codes=parse_codes(settings.retry_http_codes),
            min_wait_s=settings.initial_retry_wait_s,
            max_wait_s=max(settings.max_retry_wait_s, settings.initial_retry_wait_s),
        )
        # Built now, with no I/O; they connect (through the link) in _start.
        names = Names.of(settings)
        self._names = names
        self._plan = Plan.of(settings)
        self._link = NatsLink(settings, "faas-queue-worker")
        self._link.on_reconnected.append(self._on_reconnected)
        self._activations = (
            ActivationStore(
                self._link,
                names,
                settings.activation_max_result_bytes,
                settings.activation_retention_s,
            )
            if settings.record_activations
            else None
        )
        # Large responses go to the results store even with records off, never to memory.
        results = self._activations.results if self._activations else ResultStore(self._link, names)
        self._client = UpstreamClient(keepalive_s=settings.upstream_keepalive_s)
        self._functions = FunctionWatch(registry, self._link, names)
        self._handler = CallHandler(
            registry,
            self._functions.synced,
            self.admission,
            FunctionInvoker(
                self._client,
                results,
                Timeouts(
                    connect_s=settings.write_timeout_s,
                    read_s=settings.read_timeout_s,
                    total_s=settings.exec_timeout_s,
                ),
                settings.max_held_response_bytes,
            ),
            CallbackSender(settings, self._client, results),
            self.metrics,
            DeadLetters(self._link, names),
            self._activations,
            self._retry_policy,
            lambda: self._link.connected,
            self._forced,
            defer_wait_s=settings.defer_wait_s,
            running_record_delay_s=settings.running_record_delay_s,
            ack_wait_s=settings.ack_wait_s,
        )
        self._cancellations = CancellationWatch(self._link, names, self._handler.cancel)
        self._cancellations_started = False
        self._puller: Puller | None = None
        self._status: StatusServer | None = None

    # lifecycle

    def run(self) -> None:
        """The command's entry (tests use main(), and leave their process's collector as is)."""
        tune_garbage_collector()
        with asyncio.Runner(
            loop_factory=lambda: new_event_loop(self.settings.event_loop)
        ) as runner:
            runner.run(self.main())

    async def main(self) -> None:
        if self.handle_signals:
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self.request_stop)
        keeping: asyncio.Task[None] | None = None
        try:
            if await self._start():
                keeping = asyncio.create_task(self._keep_leases())
                await self._consume()
            await self._drain()
        finally:
            if keeping is not None:
                keeping.cancel()
            await self._release()
            self._finished.set()

    def request_stop(self) -> None:
        """First call: stop pulling and drain. Second call: stop now, returning running calls."""
        if self._stopping.is_set():
            log.warning("stopping now; running calls go back to the queue")
            self._forced.set()
        else:
            log.info(
                "stopping: no new calls; waiting up to %gs for running ones",
                self.settings.shutdown_grace_s,
            )
        self._stopping.set()

    async def close(self) -> None:
        self.request_stop()
        await self._finished.wait()

    @property
    def inflight(self) -> int:
        """Function calls running now (at most max_inflight)."""
        return self.admission.running

    @property
    def held(self) -> int:
        """Messages this worker holds: running, fetched ahead, or calling back."""
        return len(self._tasks)

    @property
    def prefetch(self) -> int:
        if self.settings.prefetch is not None:
            return self.settings.prefetch
        return max(1, self.settings.max_inflight // 4)

    async def _start(self) -> bool:
        """Connect and bind the consumer; False when asked to stop before that succeeded."""
        self._status = StatusServer(
            self.settings.worker_host,
            self.settings.worker_port,
            self.metrics,
            self.health,
            self.refresh_metrics,
        )
        await self._status.start()
        self.status_port = self._status.port
        connecting = asyncio.create_task(self._connect_and_bind())
        stop_waiter = asyncio.create_task(self._stopping.wait())
        await asyncio.wait({connecting, stop_waiter}, return_when=asyncio.FIRST_COMPLETED)
        stop_waiter.cancel()
        if not connecting.done():
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connecting
            return False
        connecting.result()  # a stream conflict stops the worker here
        self.ready.set()
        log.info(
            "consuming %s as %s; max_inflight %d; status on http://%s:%s",
            self.settings.nats_stream,
            self.settings.consumer_name,
            self.settings.max_inflight,
            self.settings.worker_host,
            self.status_port,
        )
        return True

    async def _connect_and_bind(self) -> None:
        await self._link.connect()
        await retry_until_answers(self._bind, "stream and consumer")

    async def _on_reconnected(self) -> None:
        self.metrics.nats_reconnects.inc()
        self._reconnected.set()
        self._functions.restart()

    async def _bind(self) -> None:
        js = self._link.js
        await ensure_all(js, self._plan)
        if not self._cancellations_started:
            # Before the first fetch: a call cancelled while queued must never start.
            await self._cancellations.start()
            self._cancellations_started = True
        if not self._functions.synced.is_set():
            # Before the first fetch too: a call of a function deployed through the API must
            # find it, not fail as unknown.
            self._functions.start()
            await self._wait_for(self._functions.synced, FUNCTIONS_SYNC_WAIT_S)
        await ensure_consumer(js, self.settings)
        if self._puller is not None:
            await self._puller.close()
        puller = Puller(self._link.nc, self.settings.nats_stream, self.settings.consumer_name)
        await puller.start()
        self._puller = puller

    # consuming

    async def _consume(self) -> None:
        backoff = Backoff()  # between fetches NATS refused or failed
        while not self._stopping.is_set():
            free = self.admission.free()
            if free <= 0:
                self.admission.freed.clear()
                await self._wait_for(self.admission.freed, timeout_s=None)
                continue
            if not self._is_connected():
                await self._wait_until_connected()
                continue
            assert self._puller is not None
            try:
                messages = await self._puller.fetch(
                    min(free, self.settings.max_fetch_batch), self.settings.fetch_wait_s
                )
            except TimeoutError:
                backoff.reset()
                continue
            except APIError as exc:
                if exc.code == 404 or isinstance(exc, NotFoundError):
                    log.warning("stream or consumer missing; setting them up again")
                    await self._rebind()
                else:
                    log.debug("fetch refused: %s", exc)
                    await self._wait_for(self._stopping, timeout_s=backoff.next_s())
                continue
            except nats.errors.Error as exc:
                log.debug("fetch failed: %s", exc)
                await self._wait_for(self._stopping, timeout_s=backoff.next_s())
                continue
            backoff.reset()
            await self._dispatch([Delivery.from_msg(msg) for msg in messages])

    async def _dispatch(self, deliveries: list[Delivery]) -> None:
        """Start handling each message of a fetched batch, with its call's record read for the
        whole batch in one request: whatever the delivery count says, a call that has a final
        record or is handled here already is never run again."""
        calls: list[tuple[QueuedCall, Delivery]] = []
        for delivery in deliveries:
            try:
                calls.append((QueuedCall.decode(delivery.msg.data), delivery))
            except MalformedMessageError as exc:
                log.error("dropping unreadable message #%d: %s", delivery.sequence, exc)
                self.metrics.function("").processed(Ending.MALFORMED.value)
                await self._settle(delivery, settle(Ending.MALFORMED))
        records: dict[str, StoredActivation] | None = None
        if self._activations is not None and calls and not self._stopping.is_set():
            try:
                records = await self._activations.get_many([call.call_id for call, _ in calls])
            except ActivationStoreError as exc:
                log.info("records of a batch unreadable, read one by one: %s", exc)
        for call, delivery in calls:
            lease = self._handling.get(call.call_id)
            if lease is not None:
                context = call_context(call.call_id, call.function)
                if lease.adopt(delivery):
                    log.info("redelivered while handled here; not run again", extra=context)
                else:
                    log.info("a copy of a call handled here; dropped", extra=context)
                    await self._settle(delivery, Settle.ACK)
                continue
            if call.call_id in self._finished_here:
                log.info(
                    "redelivered after it finished here; dropped",
                    extra=call_context(call.call_id, call.function),
                )
                await self._settle(delivery, Settle.ACK)
                continue
            if self._stopping.is_set():
                # Taken as the stop came (in this batch's fetch or its records' read), or
                # delivered after the last fetch: back at once, for another worker to run now
                # rather than after ack_wait. Only a redelivery of a call running here (above)
                # stays, or it would run twice at once.
                await self._settle(delivery, Settle.NAK)
                continue
            lease = Lease(delivery, time.monotonic())
            self._handling[call.call_id] = lease
            stored = records.get(call.call_id) if records is not None else None
            task = asyncio.create_task(
                self._process(call, lease, self.admission.take(), stored, records is not None)
            )
            self._tasks.add(task)
            task.add_done_callback(self._task_done)

    def _task_done(self, task: "asyncio.Task[None]") -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("call handling failed", exc_info=task.exception())

    async def _process(
        self,
        call: QueuedCall,
        lease: Lease,
        claim: Claim,
        stored: StoredActivation | None,
        record_read: bool,
    ) -> None:
        try:
            try:
                handled = await self._handler.handle(
                    call, lease.delivery, claim, stored, record_read
                )
            except asyncio.CancelledError:
                self.interrupted += 1
                log.info(
                    "interrupted; back to the queue",
                    extra=call_context(call.call_id, call.function),
                )
                await self._settle(lease.delivery, settle(Ending.INTERRUPTED))
                raise
            await self._settle(lease.delivery, handled.settle, handled.delay_s)
            if handled.completed:
                self.completed += 1
                self._finished_here.add(call.call_id)
        finally:
            del self._handling[call.call_id]
            claim.settled()

    async def _keep_leases(self) -> None:
        """Renew the lease of every call held here (running, waiting for a slot or calling
        back) at least once per heartbeat interval: checked twice per interval, each lease
        renewed when its next renewal would fall after the next check."""
        interval_s = heartbeat_interval_s(self.settings.ack_wait_s)
        while True:
            await asyncio.sleep(interval_s / 2)
            now = time.monotonic()
            for lease in list(self._handling.values()):
                if now - lease.renewed_at >= interval_s / 2:
                    await lease.renew(now)

    def _is_connected(self) -> bool:
        return self._link.connected

    async def _wait_until_connected(self) -> None:
        """Hold fetching while NATS is away.

        nats-py buffers a pull request made while disconnected and sends it on reconnect, long
        after its fetch gave up here; the server then delivers to every such orphan, and the
        next fetch hands all of those messages over at once, far past max_inflight.
        """
        while not self._is_connected() and not self._stopping.is_set():
            self._reconnected.clear()
            # The timeout only guards against a missed callback; reconnecting sets the event.
            await self._wait_for(self._reconnected, timeout_s=1.0)

    async def _rebind(self) -> None:
        try:
            await self._bind()
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("cannot set up stream and consumer yet: %s", exc)
            await self._wait_for(self._stopping, timeout_s=1.0)

    async def _settle(
        self, delivery: Delivery, action: Settle, delay_s: float | None = None
    ) -> None:
        msg = delivery.msg
        try:
            if action is Settle.ACK:
                await msg.ack()
            elif action is Settle.NAK:
                await msg.nak()
            elif action is Settle.NAK_LATER:
                await msg.nak(delay=self.settings.ack_wait_s if delay_s is None else delay_s)
            else:
                await msg.term()
        except nats.errors.Error as exc:
            # The lease runs out and JetStream redelivers: at least once, never lost.
            log.warning("could not %s message #%d: %s", action.value, delivery.sequence, exc)

    # stopping

    async def _drain(self) -> None:
        # Messages fetched ahead and still waiting for a slot go back at once, and so do those
        # that reached the subscription after the last fetch; only calls already running get
        # the grace period.
        self.admission.close()
        await self._hand_back_unfetched()
        if self._tasks:
            log.info("waiting for %d running calls", len(self._tasks))
            deadline = time.monotonic() + self.settings.shutdown_grace_s
            while self._tasks and not self._forced.is_set():
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    break
                forced = asyncio.create_task(self._forced.wait())
                await asyncio.wait(
                    {*self._tasks, forced}, timeout=remaining_s, return_when=asyncio.FIRST_COMPLETED
                )
                forced.cancel()
        leftovers = list(self._tasks)
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)
        log.info(
            "stopped: %d calls complete, %d returned to the queue",
            self.completed,
            self.interrupted,
        )

    async def _hand_back_unfetched(self) -> None:
        if self._puller is None:
            return
        messages = await self._puller.end(timeout_s=2.0)
        if messages:
            log.info("%d calls delivered after the last fetch go back to the queue", len(messages))
            await self._dispatch([Delivery.from_msg(msg) for msg in messages])

    async def _release(self) -> None:
        await self._functions.close()
        await self._cancellations.close()
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await self._link.flush(timeout_s=2)
        await self._link.close()
        await self._client.close()
        if self._status is not None:
            await self._status.close()

    async def _wait_for(self, event: asyncio.Event, timeout_s: float | None) -> None:
        """Wait until ``event`` or a stop request, at most ``timeout_s``."""
        waiters = {asyncio.create_task(event.wait()), asyncio.create_task(self._stopping.wait())}
        try:
            await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    # status

    async def health(self) -> tuple[bool, dict[str, Any]]:
        details: dict[str, Any] = {
            "nats": "connected" if self._link.connected else "disconnected",
            "consumer": self.settings.consumer_name,
            "inflight": self.inflight,
            "held": self.held,
            "maxInflight": self.settings.max_inflight,
        }
        if not self.ready.is_set() or not self._link.connected:
            return False, details
        try:
            info = await self._link.js.consumer_info(
                self.settings.nats_stream, self.settings.consumer_name, timeout=1.0
            )
        except (nats.errors.Error, TimeoutError) as exc:
            details["problem"] = f"consumer check failed: {type(exc).__name__}"
            return False, details
        details["pending"] = info.num_pending
        return True, details

    async def refresh_metrics(self) -> None:
        counts = None
        if self._link.connected:
            counts = await read_pending(self._link.js, self.settings, timeout_s=1.0)
        self.metrics.set_pending(self.settings.worker_queue, counts)
