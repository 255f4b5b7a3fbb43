"""Sync calls that turn async: after N seconds without an answer, a 202 and a record instead.

The call itself goes on inside this gateway process (it is not queued: the function already
has the request), under the same timeouts as any sync call. Its outcome is written to its
activation record and posted to X-Callback-Url when one was given. On SIGTERM the gateway
waits up to ``shutdown_grace`` for such calls; calls still running after that are cut off and
recorded as failed (502, "the gateway stopped"); no callback is sent for them. A gateway that
is killed outright leaves their records at ``running`` until they expire.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from multidict import MultiMapping

from faas_gateway.core.call import QueuedCall
from faas_gateway.core.functions import FunctionSpec
from faas_gateway.core.outcome import Outcome, failure
from faas_gateway.http.callbacks import CallbackSender
from faas_gateway.http.client import UpstreamResponse
from faas_gateway.http.outcomes import outcome_of
from faas_gateway.nats.activations import (
    Activation,
    ActivationExistsError,
    ActivationStore,
    ActivationStoreError,
    RecordConflictError,
)
from faas_gateway.runtime.logs import call_context
from gateway.callback_urls import CallbackUrls
from gateway.errors import TooManyRequestsError
from gateway.queue import CallIdTakenError, GatewayQueue
from gateway.request import PREFER, PREFERENCE_APPLIED, CallContext, parse_prefer
from gateway.responses import location_of, waited_response

log = logging.getLogger("faas.gateway")

# What a 429 for a gateway at its max_turned_async tells the client to wait.
RETRY_AFTER_FULL_S = 5


class TurnAsync:
    def __init__(
        self,
        queue: GatewayQueue,
        records: ActivationStore,
        callbacks: CallbackSender,
        callback_urls: CallbackUrls,
        *,
        max_turned_async: int,
        max_wait_s: float,
        sync_async_after_s: float,
        shutdown_grace_s: float,
        max_held_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.callback_urls = callback_urls
        self._queue = queue
        self._records = records
        self._callbacks = callbacks
        self._max_turned_async = max_turned_async
        self._max_wait_s = max_wait_s
        self._sync_async_after_s = sync_async_after_s
        self._shutdown_grace_s = shutdown_grace_s
        self._max_held_bytes = max_held_bytes
        self._tasks: set[asyncio.Task[None]] = set()
        self._clock = clock
        self._stop_by: float | None = None  # set when the gateway starts to stop

    def raise_if_full(self) -> None:
        """Calls that turned async run on in this process, each holding its request and a
        connection: at most max_turned_async of them; a call that could become one more is
        refused before it is sent."""
        if len(self._tasks) >= self._max_turned_async:
            raise TooManyRequestsError(
                f"this gateway runs {len(self._tasks)} calls that turned async, its "
                f"max_turned_async; try again",
                {"Retry-After": str(RETRY_AFTER_FULL_S)},
            )

    async def posted_before(
        self, queued: QueuedCall, after: "AsyncAfter"
    ) -> web.StreamResponse | None:
        """A sync call that may turn async, with a client-chosen call id that has a record:
        the same request is the same call (not sent again: its record or result answers),
        another request is a 409. None: the id is free."""
        try:
            stored = await self._records.get(queued.call_id)
        except ActivationStoreError:
            return None  # it cannot turn async then either (its record cannot be written)
        if stored is None:
            return None
        if stored.record.get("requestDigest") != queued.request_digest():
            raise CallIdTakenError(queued.call_id)
        return await waited_response(
            self._records,
            queued.call_id,
            after.wait_s,
            applied_to_unfinished=after.preference_applied,
        )

    def wait_before_async(self, request: web.Request) -> "AsyncAfter | None":
        """How long this sync call waits before it turns async; None: it never does.

        ``Prefer: respond-async, wait=N`` asks for N seconds (capped by max_wait);
        respond-async alone waits sync_async_after when that is set, else max_wait. Without
        the header, sync_async_after applies to every call when it is set.
        """
        return self.wait_before_async_for(request.headers)

    def wait_before_async_for(self, headers: MultiMapping[str]) -> "AsyncAfter | None":
        """wait_before_async from a request's headers alone."""
        if PREFER in headers:
            prefer = parse_prefer(headers.getall(PREFER))
            if prefer.respond_async:
                wanted_s = prefer.wait_s
                if wanted_s is None:
                    wanted_s = self._sync_async_after_s or self._max_wait_s
                wait_s = min(wanted_s, self._max_wait_s)
                return AsyncAfter(wait_s, f"respond-async, wait={wait_s:g}")
        if self._sync_async_after_s > 0:
            return AsyncAfter(self._sync_async_after_s, None)
        return None

    def fits(self, request: web.Request) -> bool:
        """Only a request body that can be held whole may turn async (see SyncProxy)."""
        if not request.body_exists:
            return True
        length = request.content_length
        return length is not None and length <= self._queue.max_body_bytes()

    async def demote(
        self,
        call: CallContext,
        queued: QueuedCall,
        function: FunctionSpec,
        pending: "asyncio.Task[UpstreamResponse]",
        after: "AsyncAfter",
        hold: "Hold",
    ) -> web.Response | None:
        """Record the call as running and answer 202; None if it cannot be recorded (or its
        call id was taken meanwhile), in which case the caller keeps waiting as for any sync
        call. The call keeps its place in the function's max_inflight until it ends."""
        activation = await self.take_over(call, queued, function, pending, hold)
        if activation is None:
            return None
        response = web.Response(
            status=202, body=activation.encode(), content_type="application/json"
        )
        response.headers["Location"] = location_of(call.call_id)
        if after.preference_applied is not None:
            response.headers[PREFERENCE_APPLIED] = after.preference_applied
        return response

    async def take_over(
        self,
        call: CallContext,
        queued: QueuedCall,
        function: FunctionSpec,
        pending: "asyncio.Task[UpstreamResponse]",
        hold: "Hold",
    ) -> Activation | None:
        """Record the call as running and let it run on in this process, its outcome
        recorded when it ends; the caller answers 202 its own way (``demote``, or OpenWhisk's
        ``{"activationId"}``). None if it cannot be recorded, or its call id was taken
        meanwhile: then the caller keeps waiting as for any sync call."""
        if len(self._tasks) >= self._max_turned_async:
            return None
        activation = Activation.queued(queued)
        activation.start(attempts=1, started_at_ns=call.start_ns)
        try:
            await self._records.create(activation)
        except (ActivationStoreError, ActivationExistsError) as exc:
            log.info(
                "not turning async, the record cannot be written: %s",
                exc,
                extra=call_context(call.call_id, function.name),
            )
            return None
        task = asyncio.create_task(self._finish(call, queued, function, activation, pending))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        kept = hold.hand_over()
        task.add_done_callback(lambda _: kept.release())
        return activation

    async def _finish(
        self,
        call: CallContext,
        queued: QueuedCall,
        function: FunctionSpec,
        activation: Activation,
        pending: "asyncio.Task[UpstreamResponse]",
    ) -> None:
        context = call_context(call.call_id, function.name)
        try:
            outcome = await outcome_of(
                pending,
                function=function.name,
                spool_name=call.call_id,
                started_monotonic=call.started_monotonic,
                max_held_bytes=self._max_held_bytes,
                spool=self._records.results,
                timeout_error=f"function {function.name!r} did not answer within its timeout",
            )
        except asyncio.CancelledError:
            pending.cancel()
            outcome = failure(
                502, "the gateway stopped before the function answered", call.elapsed_s()
            )
            await self._record(activation, outcome, context)
            raise
        if outcome.detail is not None:
            log.info(
                "call turned async failed: %s (%s)", outcome.error, outcome.detail, extra=context
            )
        kept = await self._record(activation, outcome, context)
        if kept is None or queued.callback_url is None:
            return
        result = await self._callbacks.deliver(
            queued.callback_url, call.call_id, function.name, outcome
        )
        activation.note_callback(result.delivered, result.attempts, result.last_status)
        try:
            await self._records.put(activation, kept)
        except (ActivationStoreError, RecordConflictError) as exc:
            log.warning("callback state not recorded: %s", exc, extra=context)

    async def _record(
        self, activation: Activation, outcome: Outcome, context: dict[str, str]
    ) -> bytes | None:
        """The outcome into the record; None when it was not written: NATS away, or the call
        was cancelled meanwhile (the cancellation stands, and no callback is sent)."""
        try:
            kept, stored = await self._records.store_result(activation.call_id, outcome)
            activation.finish(outcome, stored)
            await self._records.put(activation, kept)
            return kept
        except RecordConflictError:
            log.info("cancelled while it ran: its outcome is not recorded", extra=context)
            return None
        except ActivationStoreError as exc:
            log.error("outcome of a call turned async not recorded: %s", exc, extra=context)
            return None

    def stopping(self) -> None:
        """The gateway starts to stop (aiohttp's on_shutdown, before it waits for running
        sync calls): calls that turned async run on meanwhile, so their share of
        shutdown_grace starts now too, and the whole stop takes one grace, not two."""
        if self._stop_by is None:
            self._stop_by = self._clock() + self._shutdown_grace_s

    async def close(self) -> None:
        self.stopping()
        if not self._tasks:
            return
        assert self._stop_by is not None
        left_s = max(0.0, self._stop_by - self._clock())
        log.info("waiting up to %.1f s for %d calls that turned async", left_s, len(self._tasks))
        _, still_running = await asyncio.wait(set(self._tasks), timeout=left_s)
        for task in still_running:
            task.cancel()
        for task in still_running:
            with contextlib.suppress(asyncio.CancelledError):
                await task


class Hold:
    """A call's place in its function's max_inflight count: released once, by the sync call,
    or by a call that turned async when it ends (it still runs the function meanwhile)."""

    __slots__ = ("_release",)

    def __init__(self, release: Callable[[], None] | None) -> None:
        self._release = release

    def release(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            release()

    def hand_over(self) -> "Hold":
        taken, self._release = Hold(self._release), None
        return taken


@dataclass(frozen=True, slots=True)
class AsyncAfter:
    wait_s: float
    preference_applied: str | None  # for a wait the client asked for with Prefer
