"""One queued call, from the message handed over to what becomes of it.

``CallHandler.handle`` reads top to bottom as a call goes: cancelled? finished before (a
redelivery after a crash, a stop or a lost ack)? may it start (the function's max_inflight)?
Then run it, judge the outcome (done, or retry after N seconds), record it, keep a dead letter,
call back. It returns how the message is to be settled; the worker settles it.

Records: every write is conditional on the revision this worker read (with the batch the
message came in) or last wrote. A write that loses (a cancellation, another worker that ran a
copy of the call) leaves the other writer's record as it is and sends no callback.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import nats.errors

from faas_gateway.core.call import QueuedCall
from faas_gateway.core.functions import FunctionSpec, Registry
from faas_gateway.core.headers import RETRY, RETRY_MAX
from faas_gateway.core.outcome import Outcome
from faas_gateway.core.retry import (
    Backoff,
    InvalidRetryPolicyError,
    RetryPolicy,
    judge_call_attempt,
    parse_retry_after_s,
)
from faas_gateway.http.callbacks import CallbackResult, CallbackSender
from faas_gateway.nats.activations import (
    CANCELLED,
    RUNNING,
    Activation,
    ActivationStore,
    ActivationStoreError,
    RecordConflictError,
    StoredActivation,
)
from faas_gateway.nats.dead_letters import DeadLetterError, DeadLetters
from faas_gateway.nats.jetstream import Delivery
from faas_gateway.runtime.logs import call_context
from queue_worker.admission import Admission, Claim, RecentIds
from queue_worker.decisions import Ending, Settle, outcome_label, settle
from queue_worker.invoker import FunctionInvoker
from queue_worker.metrics import WorkerMetrics

log = logging.getLogger("faas.worker")

T = TypeVar("T")

# How long a cancelled call id is remembered, and how many at most: the record says
# cancelled for longer, and is read before a call starts; this covers calls already taken.
CANCELLED_KEEP_S = 3600.0
CANCELLED_MAX_IDS = 100_000


@dataclass(frozen=True, slots=True)
class Handled:
    """What became of a message: how to settle it, and when a retry comes back."""

    settle: Settle
    delay_s: float | None = None
    completed: bool = False  # the call is done here (counted in Worker.completed)


DONE = Handled(Settle.ACK, completed=True)


class Lease:
    """The delivery a call is settled with, renewed while the call is handled.

    JetStream redelivers a message whose lease ran out (a worker paused longer than ack_wait,
    or a server restarted with acks lost); if the call is still handled here, the newer
    delivery takes the place of the old one instead of running the call a second time.
    The worker renews every lease it holds from one task (Worker._keep_leases): a task of its
    own per call, started and cancelled around every call, cost more than the renewals.
    """

    __slots__ = ("delivery", "renewed_at")

    def __init__(self, delivery: Delivery, now: float) -> None:
        self.delivery = delivery
        self.renewed_at = now  # when JetStream last started its ack_wait (about: the fetch)

    def adopt(self, delivery: Delivery) -> bool:
        """True: a redelivery of this message, now the one to renew and settle. False: another
        message for the same call id (published again by a client's re-post)."""
        if delivery.sequence and delivery.sequence == self.delivery.sequence:
            self.delivery = delivery
            return True
        return False

    async def renew(self, now: float) -> None:
        self.renewed_at = now
        try:
            await self.delivery.msg.in_progress()
        except nats.errors.Error as exc:
            log.debug("lease renewal failed: %s", exc)


class CallHandler:
    def __init__(
        self,
        registry: Registry,
        functions_synced: asyncio.Event,
        admission: Admission,
        invoker: FunctionInvoker,
        callbacks: CallbackSender,
        metrics: WorkerMetrics,
        dead_letters: DeadLetters,
        store: ActivationStore | None,
        retry_policy: RetryPolicy,
        is_connected: Callable[[], bool],
        forced: asyncio.Event,
        *,
        defer_wait_s: float,
        running_record_delay_s: float,
        ack_wait_s: float,
    ) -> None:
        self._registry = registry
        self._functions_synced = functions_synced
        self._admission = admission
        self._invoker = invoker
        self._callbacks = callbacks
        self._metrics = metrics
        self._dead_letters = dead_letters
        self._store = store
        self._retry_policy = retry_policy
        self._is_connected = is_connected
        self._forced = forced
        self._defer_wait_s = defer_wait_s
        self._running_record_delay_s = running_record_delay_s
        self._ack_wait_s = ack_wait_s
        self.cancelled = RecentIds(CANCELLED_KEEP_S, CANCELLED_MAX_IDS)
        self._invoking: dict[str, asyncio.Task[object]] = {}
        self._policies: dict[str, tuple[FunctionSpec, RetryPolicy]] = {}
        self._background: set[asyncio.Task[None]] = set()

    def cancel(self, call_id: str) -> None:
        """A call was cancelled through the API: never start it, and stop it if it runs here."""
        self.cancelled.add(call_id)
        task = self._invoking.get(call_id)
        if task is not None:
            task.cancel()

    async def handle(
        self,
        call: QueuedCall,
        delivery: Delivery,
        claim: Claim,
        stored: StoredActivation | None,
        record_read: bool,
    ) -> Handled:
        """``stored``: the call's record as read with its batch (``record_read``), if any."""
        if self._store is not None and not record_read:
            try:
                stored = await self._store.get(call.call_id)
            except ActivationStoreError as exc:
                # Without the record this worker cannot tell whether the call ran already.
                log.info(
                    "record unreadable, the call comes back later: %s",
                    exc,
                    extra=call_context(call.call_id, call.function),
                )
                claim.release()
                return Handled(Settle.NAK_LATER, self._defer_wait_s)
        activation = None
        if self._store is not None:
            activation = Activation.from_stored(stored) if stored else Activation.queued(call)
        # Attempts are counted in the record: deliveries deferred by max_inflight are not.
        attempt = activation.attempts + 1 if stored and activation else delivery.count
        try:
            function = self._registry.get(call.function)
            if call.call_id in self.cancelled or (activation and activation.status == CANCELLED):
                claim.release()
                await self._record_cancelled(call, activation)
                return DONE
            if activation is not None and activation.is_final:
                # It ran before: a worker died or stopped after the outcome was recorded, or
                # the server lost the ack. Only a callback still owed is sent.
                claim.release()
                assert stored is not None
                await self._call_back_owed(call, activation, stored)
                return DONE
            if (
                function is None and not self._functions_synced.is_set()
            ) or not self._admission.reserve(function):
                # Back to the queue, holding no slot that a call of another function could
                # use: the function is at its own limit, or not known yet perhaps only
                # because the registry watch has not caught up (not a reason to fail it).
                claim.release()
                return Handled(Settle.NAK_LATER, self._defer_wait_s)
            try:
                retry_in_s = await self._run(call, function, activation, attempt, delivery, claim)
            finally:
                self._admission.unreserve(function)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if call.call_id in self.cancelled and task is not None and task.uncancel() == 0:
                # Cancelled through the API while it ran, not by a stop.
                log.info("cancelled while running", extra=call_context(call.call_id, call.function))
                await self._record_cancelled(call, activation)
                return DONE
            raise
        except Exception:
            log.exception(
                "handling failed; the call goes back to the queue",
                extra=call_context(call.call_id, call.function),
            )
            self._metrics.function(call.function).processed(Ending.CRASHED.value)
            return Handled(settle(Ending.CRASHED))
        if retry_in_s is not None:
            self._metrics.function(call.function).retried()
            return Handled(Settle.NAK_LATER, retry_in_s)
        return DONE

    async def _run(
        self,
        call: QueuedCall,
        function: FunctionSpec | None,
        activation: Activation | None,
        attempt: int,
        delivery: Delivery,
        claim: Claim,
    ) -> float | None:
        """Run the call once; None when it is done, else seconds until it is tried again."""
        await self._admission.take_slot()
        if call.call_id in self.cancelled:  # while it waited for the slot
            self._admission.release_slot()
            raise asyncio.CancelledError
        series = self._metrics.function(call.function)
        if attempt == 1 and delivery.published_ns is not None:
            # Only the first attempt: a retry's wait is the backoff, not the queue. Clocks of
            # the NATS server and this host may differ a little: never below 0.
            series.queued.observe(max(0.0, (time.time_ns() - delivery.published_ns) / 1e9))
        running_record: asyncio.TimerHandle | None = None
        running_write: list[asyncio.Task[None]] = []
        if activation is not None:
            activation.start(attempt)
            # Delayed: most calls end sooner and are then written once, finished (with their
            # startedAt), which saves every such call a write; see running_record_delay.
            running_record = asyncio.get_running_loop().call_later(
                self._running_record_delay_s,
                self._write_running,
                activation,
                running_write,
            )
        policy = self._policy_for(function)
        self._invoking[call.call_id] = asyncio.current_task()  # type: ignore[assignment]
        series.inflight += 1  # next to the try, so that nothing can skip the decrement
        try:
            outcome = await self._invoker.invoke(call, function, attempt, policy.max_attempts)
        finally:
            self._invoking.pop(call.call_id, None)
            if running_record is not None:
                running_record.cancel()
            series.inflight -= 1
            self._admission.release_slot()
            claim.release()
        for task in running_write:
            # The next write is conditional on the revision this one makes.
            with contextlib.suppress(Exception):
                await task
        label = outcome_label(outcome.status_code)
        series.duration(outcome.status_code, outcome.duration_s)
        # One line per call at debug; calls that failed at info, so they show by default.
        level = logging.DEBUG if outcome.succeeded else logging.INFO
        if log.isEnabledFor(level):
            log.log(
                level,
                "%s with %d in %.3fs%s%s",
                label,
                outcome.status_code,
                outcome.duration_s,
                f": {outcome.error}" if outcome.error else "",
                f" ({outcome.detail})" if outcome.detail else "",
                extra=call_context(call.call_id, call.function),
            )
        verdict = judge_call_attempt(
            outcome.status_code,
            outcome.unreachable_or_timed_out,
            attempt,
            policy,
            parse_retry_after_s(outcome.header("retry-after"), time.time()),
        )
        if call.call_id in self.cancelled:
            raise asyncio.CancelledError  # cancelled just as it ended: recorded as cancelled
        if not verdict.final:
            log.info(
                "attempt %d; next in %.1fs",
                attempt,
                verdict.wait_s,
                extra=call_context(call.call_id, call.function),
            )
            if activation is not None:
                activation.wait_for_retry(outcome, verdict.wait_s)
                await self._record(activation, outcome, keep_body=False)
            return verdict.wait_s
        # Once per call, with its final outcome; attempts before it count as retries.
        series.processed(label)
        if not outcome.succeeded:
            await self._keep_dead_letter(call, outcome, attempt)
        retry_headers = (attempt, policy.max_attempts)
        if activation is None or self._store is None:
            if call.callback_url is not None:
                await self._call_back(call, outcome, *retry_headers)
            return None
        # The outcome is recorded before the callback, so a receiver that looks the call up
        # finds it finished; while NATS is away, the callback goes first and the record is
        # written once NATS is back (the message is acked only after that).
        activation.finish(outcome)
        recorded_first = self._is_connected()
        kept_body = b""
        if recorded_first:
            kept = await self._record(activation, outcome)
            if kept is None:
                return None  # another writer finished or cancelled it: theirs stands
            kept_body = kept
        if call.callback_url is not None:
            result = await self._call_back(call, outcome, *retry_headers)
            activation.note_callback(result.delivered, result.attempts, result.last_status)
            if recorded_first:
                # Acked before the message is: a redelivery (a lost ack) that found the
                # callback still pending would send it again.
                await self._record_callback(activation, kept_body)
        if not recorded_first:
            await self._record(activation, outcome)
        return None

    async def _record_callback(self, activation: Activation, kept_body: bytes) -> None:
        store = self._store
        assert store is not None
        # A conflict: cancelled or rewritten meanwhile, and that record stands.
        with contextlib.suppress(RecordConflictError):
            await self._while_nats_is_away(
                lambda: store.put(activation, kept_body),
                "recording the callback",
                activation.call_id,
                activation.function,
            )

    async def _record(
        self, activation: Activation, outcome: Outcome, keep_body: bool = True
    ) -> bytes | None:
        """Write the call's state (retried while NATS is away, see _while_nats_is_away); the
        part of the body kept in the record itself, or None when another writer got there
        first with a final record (a cancellation, or another worker that ran a copy)."""
        store = self._store
        assert store is not None

        async def write() -> bytes:
            body = b""
            if keep_body:
                body, stored = await store.store_result(activation.call_id, outcome)
                activation.note_stored(stored)
            await self._write(activation, body)
            return body

        for _ in range(3):
            try:
                return await self._while_nats_is_away(
                    write, "recording the outcome", activation.call_id, activation.function
                )
            except RecordConflictError:
                latest = await self._while_nats_is_away(
                    lambda: store.get(activation.call_id),
                    "reading the record",
                    activation.call_id,
                    activation.function,
                )
                if latest is not None and Activation.from_stored(latest).is_final:
                    log.info(
                        "the record was finished by another writer; keeping it",
                        extra=call_context(activation.call_id, activation.function),
                    )
                    return None
                # Gone (expired), or only a 'running' of a copy run elsewhere: ours goes in.
                activation.revision = latest.revision if latest is not None else 0
        return None

    async def _write(self, activation: Activation, body: bytes = b"") -> None:
        assert self._store is not None
        if activation.revision == 0:  # the gateway's record was never written, or expired
            await self._store.create(activation, body)
        else:
            await self._store.put(activation, body)

    def _write_running(self, activation: Activation, writes: list[asyncio.Task[None]]) -> None:
        task = asyncio.create_task(self._running(activation))
        writes.append(task)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _running(self, activation: Activation) -> None:
        # Skipped if the call finished meanwhile: 'running' must never follow the outcome.
        if activation.status != RUNNING:
            return
        try:
            await self._write(activation)
        except (ActivationStoreError, RecordConflictError) as exc:
            # The final write finds out what happened (it is conditional too).
            log.debug(
                "running state not recorded: %s",
                exc,
                extra=call_context(activation.call_id, activation.function),
            )

    async def _call_back_owed(
        self, call: QueuedCall, activation: Activation, stored: StoredActivation
    ) -> None:
        """A finished call whose callback was not delivered or given up: send it now, from the
        stored outcome, and record how it went."""
        if call.callback_url is None or not activation.callback_owed or self._store is None:
            return
        outcome = activation.outcome(await self._store.result_body(stored))
        policy = self._policy_for(self._registry.get(call.function))
        result = await self._call_back(call, outcome, activation.attempts, policy.max_attempts)
        activation.note_callback(result.delivered, result.attempts, result.last_status)
        await self._record_callback(activation, stored.inline_body)

    async def _record_cancelled(self, call: QueuedCall, activation: Activation | None) -> None:
        self._metrics.function(call.function).processed("cancelled")
        if activation is None or activation.is_final:
            return  # the gateway recorded it (or it finished before the cancellation)
        activation.cancel()
        try:
            await self._write(activation)
        except (ActivationStoreError, RecordConflictError) as exc:
            log.info(
                "cancellation not recorded here: %s",
                exc,
                extra=call_context(call.call_id, call.function),
            )

    async def _keep_dead_letter(self, call: QueuedCall, outcome: Outcome, attempts: int) -> None:
        """Before the final record: a call recorded failed always has its dead letter."""

        async def keep() -> None:
            await self._dead_letters.keep(call, outcome, attempts, time.time_ns())

        await self._while_nats_is_away(keep, "keeping the dead letter", call.call_id, call.function)
        self._metrics.function(call.function).dead_lettered()

    async def _while_nats_is_away(
        self, write: Callable[[], Awaitable[T]], what: str, call_id: str, function: str
    ) -> T:
        """Retry a write while NATS is away, for up to ack_wait (the call's lease is renewed
        meanwhile); after that the error goes up and the call goes back to the queue, rather
        than finish without what the write keeps."""
        deadline = time.monotonic() + self._ack_wait_s
        backoff = Backoff()
        while True:
            try:
                return await write()
            except (ActivationStoreError, DeadLetterError) as exc:
                wait_s = backoff.next_s()
                if time.monotonic() + wait_s > deadline or self._forced.is_set():
                    raise
                log.info(
                    "%s failed, retrying: %s", what, exc, extra=call_context(call_id, function)
                )
                await asyncio.sleep(wait_s)

    async def _call_back(
        self, call: QueuedCall, outcome: Outcome, attempt: int, max_attempts: int
    ) -> CallbackResult:
        assert call.callback_url is not None
        result = await self._callbacks.deliver(
            call.callback_url,
            call.call_id,
            call.function,
            outcome,
            [(RETRY, str(attempt)), (RETRY_MAX, str(max_attempts))],
        )
        self._metrics.function(call.function).called_back(result.delivered)
        return result

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
