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
from dataclasses import dataclass

from aiohttp import web

from faas_common.activations import Activation, ActivationStoreError
from faas_common.callbacks import CallbackSender
from faas_common.headers import end_to_end
from faas_common.logs import call_context
from faas_common.message import QueuedCall
from faas_common.outcome import Outcome, failure
from faas_common.registry import FunctionSpec
from faas_common.upstream import (
    UpstreamError,
    UpstreamResponse,
    UpstreamTimeoutError,
    failure_for_caller,
)
from gateway.activation_api import location_of
from gateway.callback_urls import CallbackUrls
from gateway.calls import CallContext
from gateway.errors import GatewayError
from gateway.prefer import PREFER, PREFERENCE_APPLIED, parse_prefer
from gateway.publisher import Publisher
from gateway.settings import GatewaySettings

log = logging.getLogger("faas.gateway")


class Demotions:
    def __init__(
        self,
        settings: GatewaySettings,
        publisher: Publisher,
        callbacks: CallbackSender,
        callback_urls: CallbackUrls,
    ) -> None:
        self.callback_urls = callback_urls
        self._settings = settings
        self._publisher = publisher
        self._callbacks = callbacks
        self._tasks: set[asyncio.Task[None]] = set()

    def wait_before_async(self, request: web.Request) -> "AsyncAfter | None":
        """How long this sync call waits before it turns async; None: it never does.

        ``Prefer: respond-async, wait=N`` asks for N seconds (capped by max_wait);
        respond-async alone waits sync_async_after when that is set, else max_wait. Without
        the header, sync_async_after applies to every call when it is set.
        """
        settings = self._settings
        if PREFER in request.headers:
            prefer = parse_prefer(request.headers.getall(PREFER))
            if prefer.respond_async:
                wanted_s = prefer.wait_s
                if wanted_s is None:
                    wanted_s = settings.sync_async_after_s or settings.max_wait_s
                wait_s = min(wanted_s, settings.max_wait_s)
                return AsyncAfter(wait_s, f"respond-async, wait={wait_s:g}")
        if settings.sync_async_after_s > 0:
            return AsyncAfter(settings.sync_async_after_s, None)
        return None

    def fits(self, request: web.Request) -> bool:
        """Only a request body that can be held whole may turn async (see SyncProxy)."""
        if not request.body_exists:
            return True
        length = request.content_length
        return length is not None and length <= self._publisher.max_body_bytes()

    async def demote(
        self,
        call: CallContext,
        queued: QueuedCall,
        function: FunctionSpec,
        pending: "asyncio.Task[UpstreamResponse]",
        after: "AsyncAfter",
    ) -> web.Response | None:
        """Record the call as running and answer 202; None if it cannot be recorded, in
        which case the caller keeps waiting as for any sync call."""
        activation = Activation.queued(queued)
        activation.start(attempts=1, started_at_ns=call.start_ns)
        try:
            await self._publisher.activations().create(activation)
        except (ActivationStoreError, GatewayError) as exc:
            log.info(
                "not turning async, the record cannot be written: %s",
                exc,
                extra=call_context(call.call_id, function.name),
            )
            return None
        task = asyncio.create_task(self._finish(call, queued, function, activation, pending))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        response = web.Response(
            status=202, body=activation.encode().rstrip(b"\n"), content_type="application/json"
        )
        response.headers["Location"] = location_of(call.call_id)
        if after.preference_applied is not None:
            response.headers[PREFERENCE_APPLIED] = after.preference_applied
        return response

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
            outcome = await outcome_of(pending, function, call)
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
        if queued.callback_url is None:
            return
        result = await self._callbacks.deliver(
            queued.callback_url, call.call_id, function.name, outcome
        )
        activation.note_callback(result.delivered, result.attempts, result.last_status)
        store = self._publisher.activations()
        try:
            await store.put(activation, kept)
        except ActivationStoreError as exc:
            log.warning("callback state not recorded: %s", exc, extra=context)

    async def _record(
        self, activation: Activation, outcome: Outcome, context: dict[str, str]
    ) -> bytes:
        try:
            store = self._publisher.activations()
            kept, stored = await store.store_result(activation.call_id, outcome.body)
            activation.finish(outcome, stored)
            await store.put(activation, kept)
            return kept
        except (ActivationStoreError, GatewayError) as exc:
            log.error("outcome of a call turned async not recorded: %s", exc, extra=context)
            return b""

    async def close(self) -> None:
        if not self._tasks:
            return
        log.info("waiting for %d calls that turned async", len(self._tasks))
        _, still_running = await asyncio.wait(
            set(self._tasks), timeout=self._settings.shutdown_grace_s
        )
        for task in still_running:
            task.cancel()
        for task in still_running:
            with contextlib.suppress(asyncio.CancelledError):
                await task


@dataclass(frozen=True, slots=True)
class AsyncAfter:
    wait_s: float
    preference_applied: str | None  # for a wait the client asked for with Prefer


async def outcome_of(
    pending: "asyncio.Task[UpstreamResponse]", function: FunctionSpec, call: CallContext
) -> Outcome:
    try:
        upstream = await pending
        async with upstream:
            body = await upstream.read()
            return Outcome(
                status_code=upstream.status,
                headers=list(end_to_end(upstream.headers, frozenset({"content-length"})).items()),
                body=body,
                duration_s=call.elapsed_s(),
            )
    except UpstreamTimeoutError:
        return failure(
            504, f"function {function.name!r} did not answer within its timeout", call.elapsed_s()
        )
    except (UpstreamError, ValueError) as exc:
        # The record and the callback say what went wrong, not where the function listens.
        return failure(
            502,
            f"function {function.name!r} did not answer: {failure_for_caller(exc)}",
            call.elapsed_s(),
            detail=f"{type(exc).__name__}: {exc}",
        )
