"""The worker: pull calls from the shared consumer, run up to max_inflight at once, drain on stop.

Lifecycle: ``run()`` blocks (the CLI), ``main()`` is awaitable (tests), ``request_stop()`` is
what SIGTERM and SIGINT call, ``close()`` stops and waits.
"""

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError

from faas_common import jetstream
from faas_common.activations import (
    RUNNING,
    Activation,
    ActivationStore,
    ActivationStoreError,
    ensure_activation_storage,
)
from faas_common.callbacks import CallbackResult, CallbackSender
from faas_common.cancellations import CancellationWatch
from faas_common.dead_letters import DeadLetterError, ensure_dead_letter_stream, keep_dead_letter
from faas_common.function_store import FunctionWatch
from faas_common.headers import RETRY, RETRY_MAX
from faas_common.logs import call_context
from faas_common.loops import new_event_loop
from faas_common.message import MalformedMessageError, QueuedCall
from faas_common.outcome import Outcome
from faas_common.registry import FunctionSpec, Registry
from faas_common.retries import (
    InvalidRetryPolicyError,
    RetryPolicy,
    judge_call_attempt,
    parse_codes,
    parse_retry_after_s,
)
from faas_common.upstream import UpstreamClient
from queue_worker.consumer import ensure_consumer
from queue_worker.decisions import Ending, Settle, heartbeat_interval_s, outcome_label, settle
from queue_worker.invoker import FunctionInvoker
from queue_worker.metrics import WorkerMetrics
from queue_worker.pending import read_pending
from queue_worker.settings import WorkerSettings
from queue_worker.status import StatusServer

log = logging.getLogger("faas.worker")

T = TypeVar("T")

# How long start-up waits for the functions deployed through the API before consuming.
FUNCTIONS_SYNC_WAIT_S = 5.0


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
        self._slot_freed = asyncio.Event()
        self._reconnected = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        # Messages taken that have not finished their function call yet: running it, or
        # fetched ahead and waiting for a slot. The rest of self._tasks are calling back.
        self._claimed = 0
        self._running = 0
        self._slots = asyncio.Semaphore(settings.max_inflight)
        self._waiting_for_slot: set[asyncio.Task[Any]] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._cancelled: set[str] = set()  # call ids cancelled through the API
        self._calls_running: dict[str, asyncio.Task[Any]] = {}
        self._running_by_function: dict[str, int] = {}
        self._recorded_attempts: dict[str, int] = {}  # from the record, on a redelivery
        self._retry_policy = RetryPolicy(
            max_attempts=settings.max_retry_attempts,
            retry_codes=parse_codes(settings.retry_http_codes),
            min_wait_s=settings.initial_retry_wait_s,
            max_wait_s=max(settings.max_retry_wait_s, settings.initial_retry_wait_s),
        )
        self._policies: dict[str, tuple[FunctionSpec, RetryPolicy]] = {}
        self._acks: jetstream.AckedPublisher | None = None
        self._cancellations: CancellationWatch | None = None
        self._functions = FunctionWatch(registry, settings)
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._sub: JetStreamContext.PullSubscription | None = None
        self._client: UpstreamClient | None = None
        self._invoker: FunctionInvoker | None = None
        self._callbacks: CallbackSender | None = None
        self._activations: ActivationStore | None = None
        self._status: StatusServer | None = None

    # lifecycle

    def run(self) -> None:
        with asyncio.Runner(
            loop_factory=lambda: new_event_loop(self.settings.event_loop)
        ) as runner:
            runner.run(self.main())

    async def main(self) -> None:
        if self.handle_signals:
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self.request_stop)
        try:
            if await self._start():
                await self._consume()
            await self._drain()
        finally:
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
        return self._running

    @property
    def held(self) -> int:
        """Messages this worker holds: running, fetched ahead, or calling back."""
        return len(self._tasks)

    async def _start(self) -> bool:
        """Connect and bind the consumer; False when asked to stop before that succeeded."""
        self._client = UpstreamClient(keepalive_s=self.settings.upstream_keepalive_s)
        self._invoker = FunctionInvoker(self.settings, self._client)
        self._callbacks = CallbackSender(self.settings, self._client)
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
        self._nc = await jetstream.connect(
            self.settings, "faas-queue-worker", on_reconnected=self._on_reconnected
        )
        self._js = self._nc.jetstream()
        self._acks = jetstream.AckedPublisher(self._nc)
        await self._acks.start()
        if self.settings.record_activations:
            self._activations = ActivationStore(self._nc, self._js, self._acks, self.settings)
        await jetstream.retry_until_jetstream_answers(self._bind, "stream and consumer")

    async def _on_reconnected(self) -> None:
        self.metrics.nats_reconnects.inc()
        self._reconnected.set()
        self._functions.restart()

    async def _bind(self) -> None:
        assert self._js is not None
        await jetstream.ensure_stream(self._js, self.settings)
        if self.settings.record_activations:
            await ensure_activation_storage(self._js, self.settings)
        await ensure_dead_letter_stream(self._js, self.settings)
        if self._cancellations is None:
            # Before the first fetch: a call cancelled while queued must never start.
            watch = CancellationWatch(self._js, self.settings, self.on_cancelled)
            await watch.start()
            self._cancellations = watch
        if not self._functions.synced.is_set():
            # Before the first fetch too: a call of a function deployed through the API must
            # find it, not fail as unknown.
            self._functions.start(self._js)
            await self._wait_for(self._functions.synced, FUNCTIONS_SYNC_WAIT_S)
        await ensure_consumer(self._js, self.settings)
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
        self._sub = await self._js.pull_subscribe_bind(
            durable=self.settings.consumer_name, stream=self.settings.nats_stream
        )

    # consuming

    async def _consume(self) -> None:
        retry_wait_s = 0.1
        while not self._stopping.is_set():
            free = self._free_slots()
            if free <= 0:
                self._slot_freed.clear()
                await self._wait_for(self._slot_freed, timeout_s=None)
                continue
            if not self._is_connected():
                await self._wait_until_connected()
                continue
            assert self._sub is not None
            try:
                messages = await self._sub.fetch(
                    min(free, self.settings.max_fetch_batch), timeout=self.settings.fetch_wait_s
                )
            except TimeoutError:
                retry_wait_s = 0.1
                continue
            except APIError as exc:
                if exc.code == 404 or isinstance(exc, NotFoundError):
                    log.warning("stream or consumer missing; setting them up again")
                    await self._rebind()
                else:
                    log.debug("fetch refused: %s", exc)
                    await self._wait_for(self._stopping, timeout_s=retry_wait_s)
                    retry_wait_s = min(retry_wait_s * 2, 2.0)
                continue
            except nats.errors.Error as exc:
                log.debug("fetch failed: %s", exc)
                await self._wait_for(self._stopping, timeout_s=retry_wait_s)
                retry_wait_s = min(retry_wait_s * 2, 2.0)
                continue
            retry_wait_s = 0.1
            for msg in messages:
                if self._stopping.is_set():
                    await self._settle(msg, Settle.NAK)
                    continue
                self._claimed += 1  # counted now, before the task runs, so no fetch overshoots
                task = asyncio.create_task(self._process(msg))
                self._tasks.add(task)
                task.add_done_callback(self._task_done)

    def _free_slots(self) -> int:
        """How many more messages to take.

        Up to max_inflight function calls run at once, and a few more messages are fetched
        ahead, so that a slot that frees up starts its next call at once instead of after a
        fetch round trip. A call whose function has returned no longer holds a slot while its
        callback is sent, but messages held in all stay below twice max_inflight (plus those
        fetched ahead), so a receiver that is down slows intake instead of piling up results.
        """
        ahead = self.prefetch
        calls = self.settings.max_inflight + ahead - self._claimed
        held = 2 * self.settings.max_inflight + ahead - len(self._tasks)
        return min(calls, held)

    @property
    def prefetch(self) -> int:
        if self.settings.prefetch is not None:
            return self.settings.prefetch
        return max(1, self.settings.max_inflight // 4)

    def _is_connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

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

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slot_freed.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("call handling failed", exc_info=task.exception())

    def _release_claim(self) -> None:
        self._claimed -= 1
        self._slot_freed.set()

    async def _process(self, msg: Msg) -> None:
        lease = asyncio.create_task(self._keep_lease(msg))
        slot = SlotRelease(self._release_claim)
        try:
            try:
                call = QueuedCall.decode(msg.data)
            except MalformedMessageError as exc:
                log.error("dropping unreadable message %s: %s", _sequence(msg), exc)
                self.metrics.function("").processed(Ending.MALFORMED.value)
                await self._settle(msg, settle(Ending.MALFORMED))
                return
            context = call_context(call.call_id, call.function)
            attempt = _delivery_count(msg)
            retry_in_s: float | None = None
            function: FunctionSpec | None = None
            try:
                function = self.registry.get(call.function)
                if call.call_id in self._cancelled:
                    slot.release()
                    await self._record_cancelled(call, attempt)
                elif attempt > 1 and await self._finished_before(call, slot):
                    pass  # a redelivery of a call whose outcome is recorded: never run twice
                elif (
                    function is None and not self._functions.synced.is_set()
                ) or not self._reserve(function):
                    # Back to the queue, holding no slot that a call of another function could
                    # use: the function is at its own limit, or not known yet perhaps only
                    # because the registry watch has not caught up (not a reason to fail it).
                    self._recorded_attempts.pop(call.call_id, None)
                    slot.release()
                    await self._settle(msg, Settle.NAK_LATER, delay_s=self.settings.defer_wait_s)
                    return
                else:
                    recorded = self._recorded_attempts.pop(call.call_id, None)
                    if recorded is not None:
                        attempt = recorded + 1
                    try:
                        # Only the first attempt: a retry's wait is the backoff, not the queue.
                        published_ns = _published_ns(msg) if attempt == 1 else None
                        retry_in_s = await self._run_call(
                            call, function, slot, attempt, published_ns
                        )
                    finally:
                        self._unreserve(function)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if call.call_id in self._cancelled and task is not None and task.uncancel() == 0:
                    # Cancelled through the API while it ran, not by a stop.
                    log.info("cancelled while running", extra=context)
                    await self._record_cancelled(call, attempt)
                    await self._settle(msg, Settle.ACK)
                    return
                self.interrupted += 1
                log.info("interrupted; back to the queue", extra=context)
                await self._settle(msg, settle(Ending.INTERRUPTED))
                raise
            except Exception:
                log.exception("handling failed; the call goes back to the queue", extra=context)
                self.metrics.function(call.function).processed(Ending.CRASHED.value)
                await self._settle(msg, settle(Ending.CRASHED))
                return
            if retry_in_s is not None:
                self.metrics.function(call.function).retried()
                await self._settle(msg, Settle.NAK_LATER, delay_s=retry_in_s)
                return
            await self._settle(msg, settle(Ending.COMPLETED))
            self.completed += 1
        finally:
            slot.release()
            lease.cancel()

    async def _finished_before(self, call: QueuedCall, slot: "SlotRelease") -> bool:
        """On a redelivery: True if the call's outcome is already recorded (a worker died, or
        was stopped, after the function returned). Then only a callback still owed is sent.

        Otherwise the record also says how many times the function was called: deliveries
        that were deferred (function at its max_inflight) do not count as attempts.
        """
        if self._activations is None:
            return False
        try:
            stored = await self._activations.get(call.call_id)
        except ActivationStoreError:
            return False  # cannot tell: run it again, at least once
        if stored is not None and not stored.is_final:
            self._recorded_attempts[call.call_id] = int(stored.record.get("attempts") or 0)
        if stored is None or not stored.is_final:
            return False
        slot.release()
        record = stored.record
        callback = record.get("callback") or {}
        if call.callback_url is None or callback.get("state") != "pending":
            return True
        response = record.get("response") or {}
        content_type = response.get("contentType")
        outcome = Outcome(
            status_code=int(record.get("statusCode") or 502),
            headers=[("Content-Type", str(content_type))] if content_type else [],
            body=await self._activations.result_body(stored),
            duration_s=float(record.get("durationMs") or 0) / 1000,
            error=record.get("error"),
        )
        attempts = int(record.get("attempts") or 1)
        policy = self._policy_for(self.registry.get(call.function))
        result = await self._call_back(call, outcome, attempts, policy.max_attempts)
        record["callback"] = {
            **callback,
            "state": "delivered" if result.delivered else "failed",
            "attempts": result.attempts,
            "lastStatus": result.last_status,
        }
        await self._activations.put_record(call.call_id, record, stored.inline_body)
        return True

    async def _record_cancelled(self, call: QueuedCall, attempt: int) -> None:
        self.metrics.function(call.function).processed("cancelled")
        if self._activations is None:
            return
        activation = Activation.queued(call)
        activation.attempts = attempt - 1
        activation.cancel()
        try:
            await self._activations.put(activation)
        except ActivationStoreError as exc:
            log.warning(
                "cancellation not recorded: %s",
                exc,
                extra=call_context(call.call_id, call.function),
            )

    def _reserve(self, function: FunctionSpec | None) -> bool:
        """Count a call of ``function`` as running here, unless it is at its max_inflight."""
        if function is None:
            return True
        running = self._running_by_function.get(function.name, 0)
        limit = function.max_inflight
        if limit is not None and running >= limit:
            return False
        self._running_by_function[function.name] = running + 1
        return True

    def _unreserve(self, function: FunctionSpec | None) -> None:
        if function is not None:
            self._running_by_function[function.name] -= 1

    def on_cancelled(self, call_id: str) -> None:
        """A call was cancelled through the API: never start it, and stop it if it runs here."""
        self._cancelled.add(call_id)
        task = self._calls_running.get(call_id)
        if task is not None:
            task.cancel()

    def _policy_for(self, function: FunctionSpec | None) -> RetryPolicy:
        if function is None:
            return self._retry_policy
        cached = self._policies.get(function.name)
        if cached is not None and cached[0] is function:
            return cached[1]
        try:
            policy = self._retry_policy.overridden_by(function.annotations)
        except InvalidRetryPolicyError as exc:
            log.warning("function %s: retry annotations ignored: %s", function.name, exc)
            policy = self._retry_policy
        self._policies[function.name] = (function, policy)
        return policy

    async def _run_call(
        self,
        call: QueuedCall,
        function: FunctionSpec | None,
        slot: "SlotRelease",
        attempt: int,
        published_ns: int | None = None,
    ) -> float | None:
        """Run the call once; None when it is done, else seconds until it is tried again.

        ``published_ns``: when JetStream took the message, to observe the time it was queued.
        """
        assert self._invoker is not None and self._callbacks is not None
        context = call_context(call.call_id, call.function)
        await self._take_slot()
        series = self.metrics.function(call.function)
        if published_ns is not None:
            # Clocks of the NATS server and this host may differ a little: never below 0.
            series.queued.observe(max(0.0, (time.time_ns() - published_ns) / 1e9))
        self._running += 1
        activation = Activation.queued(call) if self._activations is not None else None
        running_record: asyncio.TimerHandle | None = None
        if activation is not None:
            activation.start(attempt)
            # Delayed: most calls end sooner and are then written once, finished (with their
            # startedAt), which saves every such call a write; see running_record_delay.
            running_record = asyncio.get_running_loop().call_later(
                self.settings.running_record_delay_s, self._record_running, activation
            )
        policy = self._policy_for(function)
        self._calls_running[call.call_id] = asyncio.current_task()  # type: ignore[assignment]
        series.inflight.inc()  # next to the try, so that nothing can skip the dec
        try:
            outcome = await self._invoker.invoke(call, function, attempt, policy.max_attempts)
        finally:
            self._calls_running.pop(call.call_id, None)
            if running_record is not None:
                running_record.cancel()
            series.inflight.dec()
            self._running -= 1
            self._slots.release()
            slot.release()
        label = outcome_label(outcome.status_code)
        series.duration(outcome.status_code, outcome.duration_s)
        # One line per call at debug; calls that failed at info, so they show by default.
        log.log(
            logging.DEBUG if outcome.succeeded else logging.INFO,
            "%s with %d in %.3fs%s%s",
            label,
            outcome.status_code,
            outcome.duration_s,
            f": {outcome.error}" if outcome.error else "",
            f" ({outcome.detail})" if outcome.detail else "",
            extra=context,
        )
        verdict = judge_call_attempt(
            outcome.status_code,
            outcome.unreachable_or_timed_out,
            attempt,
            policy,
            parse_retry_after_s(outcome.header("retry-after"), time.time()),
        )
        if call.call_id in self._cancelled:
            raise asyncio.CancelledError  # cancelled just as it ended: recorded as cancelled
        if not verdict.final:
            log.info("attempt %d; next in %.1fs", attempt, verdict.wait_s, extra=context)
            if activation is not None:
                activation.wait_for_retry(outcome, verdict.wait_s)
                await self._record_final(activation, outcome, keep_body=False)
            return verdict.wait_s
        # Once per call, with its final outcome; attempts before it count as retries.
        series.processed(label)
        if not outcome.succeeded and self._acks is not None:
            await self._keep_dead_letter(call, outcome, attempt)
        retry_headers = (attempt, policy.max_attempts)
        if activation is None or self._activations is None:
            if call.callback_url is not None:
                await self._call_back(call, outcome, *retry_headers)
            return None
        # The outcome is recorded before the callback, so a receiver that looks the call up
        # finds it finished; while NATS is away, the callback goes first and the record is
        # written once NATS is back (the message is acked only after that).
        activation.finish(outcome)
        recorded_first = self._is_connected()
        kept_body = await self._record_final(activation, outcome) if recorded_first else b""
        if call.callback_url is not None:
            result = await self._call_back(call, outcome, *retry_headers)
            activation.note_callback(result.delivered, result.attempts, result.last_status)
            if recorded_first:
                # Not awaited: the record is final already; only the callback detail is new.
                await self._activations.put_nowait(activation, kept_body)
        if not recorded_first:
            await self._record_final(activation, outcome)
        return None

    async def _keep_dead_letter(self, call: QueuedCall, outcome: Outcome, attempts: int) -> None:
        """Before the final record: a call recorded failed always has its dead letter."""
        assert self._acks is not None
        acks = self._acks

        async def keep() -> None:
            await keep_dead_letter(acks, self.settings, call, outcome, attempts, time.time_ns())

        await self._while_nats_is_away(keep, "keeping the dead letter", call.call_id, call.function)
        self.metrics.function(call.function).dead_lettered()

    async def _while_nats_is_away(
        self, write: Callable[[], Awaitable[T]], what: str, call_id: str, function: str
    ) -> T:
        """Retry a write while NATS is away, for up to ack_wait (the call's lease is renewed
        meanwhile); after that the error goes up and the call goes back to the queue, rather
        than finish without what the write keeps."""
        deadline = time.monotonic() + self.settings.ack_wait_s
        wait_s = 0.1
        while True:
            try:
                return await write()
            except (ActivationStoreError, DeadLetterError) as exc:
                if time.monotonic() + wait_s > deadline or self._forced.is_set():
                    raise
                log.info(
                    "%s failed, retrying: %s", what, exc, extra=call_context(call_id, function)
                )
                await asyncio.sleep(wait_s)
                wait_s = min(wait_s * 2, 2.0)

    def _record_running(self, activation: Activation) -> None:
        task = asyncio.create_task(self._write_running(activation))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _write_running(self, activation: Activation) -> None:
        # Skipped if the call finished meanwhile: 'running' must never follow the outcome.
        if activation.status == RUNNING and self._activations is not None:
            # Not awaited: the final write supersedes it.
            await self._activations.put_nowait(activation)

    async def _call_back(
        self, call: QueuedCall, outcome: Outcome, attempt: int, max_attempts: int
    ) -> CallbackResult:
        assert self._callbacks is not None and call.callback_url is not None
        result = await self._callbacks.deliver(
            call.callback_url,
            call.call_id,
            call.function,
            outcome,
            [(RETRY, str(attempt)), (RETRY_MAX, str(max_attempts))],
        )
        self.metrics.function(call.function).called_back(result.delivered)
        return result

    async def _record_final(
        self, activation: Activation, outcome: Outcome, keep_body: bool = True
    ) -> bytes:
        """Write the outcome (see _while_nats_is_away); returns the part of the body kept in
        the record itself."""
        store = self._activations
        assert store is not None

        async def write() -> bytes:
            if not keep_body:
                await store.put(activation)
                return b""
            body, stored = await store.store_result(activation.call_id, outcome.body)
            activation.note_stored(stored)
            await store.put(activation, body)
            return body

        return await self._while_nats_is_away(
            write, "recording the outcome", activation.call_id, activation.function
        )

    async def _take_slot(self) -> None:
        """Wait for one of the max_inflight slots; a stop cancels the waiters (see _drain)."""
        task = asyncio.current_task()
        assert task is not None
        self._waiting_for_slot.add(task)
        try:
            await self._slots.acquire()
        finally:
            self._waiting_for_slot.discard(task)

    async def _keep_lease(self, msg: Msg) -> None:
        interval_s = heartbeat_interval_s(self.settings.ack_wait_s)
        while True:
            await asyncio.sleep(interval_s)
            try:
                await msg.in_progress()
            except nats.errors.Error as exc:
                log.debug("lease renewal failed: %s", exc)

    async def _settle(self, msg: Msg, action: Settle, delay_s: float | None = None) -> None:
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
            log.warning("could not %s message %s: %s", action.value, _sequence(msg), exc)

    # stopping

    async def _drain(self) -> None:
        # Messages fetched ahead and still waiting for a slot go back at once; only calls
        # already running get the grace period.
        for task in list(self._waiting_for_slot):
            task.cancel()
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

    async def _release(self) -> None:
        await self._functions.close()
        if self._cancellations is not None:
            await self._cancellations.close()
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await self._nc.flush(timeout=2)
            await jetstream.close_quietly(self._nc)
        if self._client is not None:
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
            "nats": "connected" if self._nc and self._nc.is_connected else "disconnected",
            "consumer": self.settings.consumer_name,
            "inflight": self.inflight,
            "held": self.held,
            "maxInflight": self.settings.max_inflight,
        }
        if self._js is None or not self.ready.is_set() or not self._nc or not self._nc.is_connected:
            return False, details
        try:
            info = await self._js.consumer_info(
                self.settings.nats_stream, self.settings.consumer_name, timeout=1.0
            )
        except (nats.errors.Error, TimeoutError) as exc:
            details["problem"] = f"consumer check failed: {type(exc).__name__}"
            return False, details
        details["pending"] = info.num_pending
        return True, details

    async def refresh_metrics(self) -> None:
        counts = None
        if self._js is not None and self._nc is not None and self._nc.is_connected:
            counts = await read_pending(self._js, self.settings, timeout_s=1.0)
        self.metrics.set_pending(self.settings.worker_queue, counts)


class SlotRelease:
    """Gives a message's slot back exactly once: when its function returns, or at the end."""

    __slots__ = ("_release",)

    def __init__(self, release: Callable[[], None]) -> None:
        self._release: Callable[[], None] | None = release

    def release(self) -> None:
        if self._release is not None:
            self._release()
            self._release = None


def _delivery_count(msg: Msg) -> int:
    """How many times JetStream has delivered this message, read off its reply subject
    ($JS.ACK.<stream>.<consumer>.<delivered>.<...>, or with <domain>.<account hash> after ACK):
    nats-py's msg.metadata parses all of it into objects, for every message."""
    tokens = msg.reply.split(".") if msg.reply else []
    try:
        if len(tokens) == 9:
            return int(tokens[4])
        if len(tokens) >= 12:
            return int(tokens[6])
        return int(msg.metadata.num_delivered or 1)
    except (ValueError, nats.errors.Error):
        return 1


def _published_ns(msg: Msg) -> int | None:
    """When JetStream stored the message (its publish time), from the reply subject like
    _delivery_count; None when the subject has no such field."""
    tokens = msg.reply.split(".") if msg.reply else []
    try:
        if len(tokens) == 9:
            return int(tokens[7])
        if len(tokens) >= 11:
            return int(tokens[9])
    except ValueError:
        pass
    return None


def _sequence(msg: Msg) -> str:
    try:
        return f"#{msg.metadata.sequence.stream}"
    except Exception:
        return "?"
