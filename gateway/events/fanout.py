"""The fan-out: every gateway process takes fires from one durable consumer of the fire
stream and turns each into its invocations, then acknowledges it.

A trigger's fire: each rule's action is queued (GatewayQueue.enqueue: record, then the durable
publish) under a call id derived from the fire's id and the rule's name, then the trigger's
activation record is written with one log line per rule, then the fire is acknowledged. A
fire handled again (the gateway died before its ack, or a late duplicate of an alarm tick)
derives the same call ids: the records already there make each enqueue the same call, so no
action starts twice and no rule is lost. What cannot be done now (the queue full or away) is
tried again later (a nak with a delay); what can never be done (an action deleted since) is
said in the rule's log line.

A function's event (OpenFaaS's connector annotations): one invocation under the fire's id,
queued, or called from here when the function asks for a sync call (``com.openfaas.sync``).
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from faas_gateway.core.call import QueuedCall
from faas_gateway.core.events import (
    STATUS_APPLICATION_ERROR,
    STATUS_WHISK_ERROR,
    Fire,
    MalformedFireError,
    rule_call_id,
    rule_log_line,
)
from faas_gateway.core.functions import FunctionSpec, Registry
from faas_gateway.core.openwhisk import TRIGGER_KIND
from faas_gateway.core.outcome import Outcome
from faas_gateway.core.retry import Backoff, backoff_s
from faas_gateway.nats.activations import (
    SUCCEEDED,
    Activation,
    ActivationExistsError,
    ActivationStore,
    ActivationStoreError,
    RecordConflictError,
)
from faas_gateway.nats.jetstream import Delivery
from faas_gateway.nats.link import NatsLink, NatsUnavailableError
from faas_gateway.nats.names import Names
from faas_gateway.runtime.logs import call_context
from faas_gateway.runtime.loops import stop_task
from gateway.errors import TooManyRequestsError
from gateway.handlers.openwhisk import OpenWhisk
from gateway.metrics import GatewayMetrics
from gateway.queue import CallIdTakenError, GatewayQueue, MessageTooLargeError, QueueError
from gateway.request import CallContext

log = logging.getLogger("faas.events")

# The annotation that makes a function's events (cron ticks, topic messages) sync calls.
SYNC_ANNOTATION = "com.openfaas.sync"
# Fires fetched at once, and handled at once by one process.
FETCH_BATCH = 64
MAX_FIRES_HANDLED = 256
FETCH_WAIT_S = 1.0
# A fire whose fan-out stops (the process died) goes to another process after this long; a
# sync call that runs longer says it is still at work every half of it.
ACK_WAIT_S = 10.0
# Waits before a fire that could not be fanned out now is tried again.
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 10.0
MAX_ACK_PENDING = 20_000
# What "not now" is: the queue or NATS away or full, a record not written, the function busy.
TRANSIENT = (
    QueueError,
    ActivationStoreError,
    NatsUnavailableError,
    nats.errors.Error,
    TimeoutError,
    TooManyRequestsError,
)


class FanOut:
    def __init__(
        self,
        link: NatsLink,
        names: Names,
        queue: GatewayQueue,
        records: ActivationStore | None,
        registry: Registry,
        whisk: OpenWhisk,
        metrics: GatewayMetrics,
        *,
        namespace: str,
    ) -> None:
        self._link = link
        self._names = names
        self._queue = queue
        self._records = records  # None: record_activations off (benchmarks only)
        self._registry = registry
        self._whisk = whisk
        self._metrics = metrics
        self._namespace = namespace
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._handling: set[asyncio.Task[None]] = set()
        self._room = asyncio.Semaphore(MAX_FIRES_HANDLED)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="fanout")

    async def close(self) -> None:
        """Stop taking fires; those being handled get a moment to finish, the rest are
        handed back (a nak) for another process."""
        self._closing = True
        if self._task is not None:
            await stop_task(self._task)
        if self._handling:
            await asyncio.wait(set(self._handling), timeout=2.0)
        for task in list(self._handling):
            task.cancel()
        if self._handling:
            await asyncio.wait(set(self._handling), timeout=2.0)

    # taking fires

    async def _run(self) -> None:
        backoff = Backoff(max_s=5.0)
        while not self._closing:
            await self._queue.wait_until_ready()
            try:
                subscription = await self._subscribe(self._link.js)
            except (nats.errors.Error, NatsUnavailableError, TimeoutError) as exc:
                log.warning("cannot take fires yet: %s", exc)
                await asyncio.sleep(backoff.next_s())
                continue
            backoff.reset()
            try:
                await self._consume(subscription)
            except (nats.errors.Error, NatsUnavailableError) as exc:
                log.info("taking fires interrupted, starting again: %s", exc)
                await asyncio.sleep(backoff.next_s())
            finally:
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()

    async def _subscribe(self, js: JetStreamContext) -> JetStreamContext.PullSubscription:
        stream, durable = self._names.fire_stream, self._names.fanout_consumer
        try:
            await js.consumer_info(stream, durable)
        except NotFoundError:
            await js.add_consumer(
                stream,
                ConsumerConfig(
                    durable_name=durable,
                    description="faas gateways fanning out trigger fires",
                    ack_policy=AckPolicy.EXPLICIT,
                    deliver_policy=DeliverPolicy.ALL,
                    ack_wait=ACK_WAIT_S,
                    max_deliver=-1,
                    filter_subject=self._names.fire_subjects,
                    max_ack_pending=MAX_ACK_PENDING,
                ),
            )
        return await js.pull_subscribe_bind(durable=durable, stream=stream)

    async def _consume(self, subscription: JetStreamContext.PullSubscription) -> None:
        while not self._closing:
            free = MAX_FIRES_HANDLED - len(self._handling)
            if free <= 0:
                await asyncio.wait(set(self._handling), return_when=asyncio.FIRST_COMPLETED)
                continue
            if not self._queue.is_ready:
                await self._queue.wait_until_ready()
            try:
                messages = await subscription.fetch(min(free, FETCH_BATCH), timeout=FETCH_WAIT_S)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            for msg in messages:
                task = asyncio.create_task(self._handle(msg))
                self._handling.add(task)
                task.add_done_callback(self._handling.discard)

    async def _handle(self, msg: Msg) -> None:
        delivery = Delivery.from_msg(msg)
        try:
            fire = Fire.decode(msg.data)
        except MalformedFireError as exc:
            log.error("a message on the fire stream cannot be read, dropped: %s", exc)
            await msg.term()
            return
        try:
            if fire.trigger is not None:
                await self._fan_out(fire)
            else:
                await self._function_event(fire, msg)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await msg.nak()  # stopping: another process takes it at once
            raise
        except TRANSIENT as exc:
            wait_s = backoff_s(delivery.count, RETRY_FIRST_S, RETRY_MAX_S, RETRY_FIRST_S)
            log.info(
                "fire %s not fanned out yet (%s); again in %.1fs",
                fire.fire_id,
                exc,
                wait_s,
                extra=call_context(fire.fire_id, fire.trigger or fire.function or ""),
            )
            with contextlib.suppress(Exception):
                await msg.nak(delay=wait_s)
            return
        with contextlib.suppress(Exception):
            await msg.ack()

    # a trigger's fire

    async def _fan_out(self, fire: Fire) -> None:
        """Queue every rule's action at once, then record the fire with a line per rule."""
        outcomes = await asyncio.gather(
            *(self._enqueue_rule(fire, rule, action) for rule, action in fire.rules),
            return_exceptions=True,
        )
        lines = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome  # not now: all of it again later, the queued ones are kept
            lines.append(outcome)
        if self._records is not None:
            await self._record_fire(fire, lines)

    async def _enqueue_rule(self, fire: Fire, rule: str, action: str) -> str:
        function = self._registry.get(action)
        if function is None:
            self._metrics.count_fanout("failed")
            return rule_log_line(
                self._namespace,
                rule,
                action,
                error=f"action {self._namespace}/{action} does not exist",
                status_code=STATUS_APPLICATION_ERROR,
            )
        call_id = rule_call_id(fire.fire_id, rule)
        queued = QueuedCall(
            call_id=call_id,
            function=function.name,
            method="POST",
            path="",
            query="",
            headers=[("Content-Type", "application/json")],
            body=fire.arguments,
            callback_url=None,
            accepted_at_ns=fire.fired_at_ns,
        )
        try:
            await self._queue.enqueue(queued, function.queue)
        except (CallIdTakenError, MessageTooLargeError) as exc:
            # Never: the id is this fire's and rule's, the size was checked at the fire.
            self._metrics.count_fanout("failed")
            return rule_log_line(
                self._namespace, rule, action, error=str(exc), status_code=STATUS_WHISK_ERROR
            )
        self._metrics.count_fanout("queued")
        return rule_log_line(self._namespace, rule, action, activation_id=call_id)

    async def _record_fire(self, fire: Fire, lines: list[str]) -> None:
        """The trigger's activation: its payload as the result, a log line per rule. Kept
        once: a fire handled again finds it there."""
        assert self._records is not None and fire.trigger is not None
        now_ns = time.time_ns()
        outcome = Outcome(
            status_code=200,
            headers=[("Content-Type", "application/json")],
            body=fire.payload,
            duration_s=(now_ns - fire.fired_at_ns) / 1e9,
        )
        request: dict[str, object] = {
            "source": fire.source,
            "contentType": "application/json",
            "bodySize": len(fire.payload),
        }
        if fire.scheduled_at_ms is not None:
            request["scheduledAtMs"] = fire.scheduled_at_ms
        activation = Activation(
            call_id=fire.fire_id,
            function=fire.trigger,
            status=SUCCEEDED,
            queued_at_ns=fire.fired_at_ns,
            request=request,
            status_code=200,
            attempts=1,
            started_at_ns=fire.fired_at_ns,
            logs=lines,
            kind=TRIGGER_KIND,
        )
        kept, stored = await self._records.store_result(fire.fire_id, outcome)
        activation.finish(outcome, stored)
        # Recorded already when this fire was handled before.
        with contextlib.suppress(ActivationExistsError):
            await self._records.create(activation, kept)

    # a function's event

    async def _function_event(self, fire: Fire, msg: Msg) -> None:
        function = self._registry.get(str(fire.function))
        if function is None:
            log.warning(
                "event for function %s, which is gone: dropped",
                fire.function,
                extra=call_context(fire.fire_id, str(fire.function)),
            )
            self._metrics.count_fanout("failed")
            return
        queued = QueuedCall(
            call_id=fire.fire_id,
            function=function.name,
            method="POST",
            path="",
            query="",
            headers=list(fire.headers),
            body=fire.arguments,
            callback_url=None,
            accepted_at_ns=fire.fired_at_ns,
        )
        if function.annotations.get(SYNC_ANNOTATION, "").lower() == "true":
            async with _still_working(msg):
                await self._call(queued, function)
            return
        try:
            await self._queue.enqueue(queued, function.queue)
        except (CallIdTakenError, MessageTooLargeError) as exc:
            log.error("event for %s not queued: %s", function.name, exc)
            self._metrics.count_fanout("failed")
            return
        self._metrics.count_fanout("queued")

    async def _call(self, queued: QueuedCall, function: FunctionSpec) -> None:
        """A sync invocation from here: claimed by creating its record (a fire handled again
        finds it and calls nobody), called, then its outcome recorded. At most once: a
        gateway that dies during the call leaves the call unrun and its record queued."""
        call = CallContext(queued.call_id)
        activation = Activation.queued(queued)
        if self._records is not None:
            try:
                await self._records.create(activation)
            except ActivationExistsError:
                return
        try:
            outcome = await self._whisk.call_blocking(queued, function, call, record=False)
        except TooManyRequestsError:
            # At its max_inflight: not called, so not claimed either; again later.
            if self._records is not None:
                with contextlib.suppress(ActivationStoreError, RecordConflictError):
                    await self._records.delete(activation)
            raise
        self._metrics.count_fanout("called")
        if self._records is None:
            return
        activation.start(attempts=1, started_at_ns=call.start_ns)
        kept, stored = await self._records.store_result(queued.call_id, outcome)
        activation.finish(outcome, stored)
        try:
            await self._records.put(activation, kept)
        except RecordConflictError as exc:
            log.warning("record of %s not written: %s", queued.call_id, exc)


@contextlib.asynccontextmanager
async def _still_working(msg: Msg) -> AsyncIterator[None]:
    """Tells JetStream every half ack wait that the fire is still being handled."""

    async def beat() -> None:
        while True:
            await asyncio.sleep(ACK_WAIT_S / 2)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    beating = asyncio.create_task(beat())
    try:
        yield
    finally:
        beating.cancel()
