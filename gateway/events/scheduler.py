"""Alarms and cron functions: every gateway process computes the same ticks and publishes
each one to the fire stream, where JetStream keeps one per tick.

The ticks come from stored state that every process reads alike (a built-in alarm feed's
parameters and creation time; a function's ``schedule`` annotation), so all of them publish
tick T under the same message id, ``alarm-<trigger>-<T in ms>`` (``cron-<function>-<T>``),
and the fire stream's duplicate window (two minutes by default) keeps the first. The fire's
id is derived from that message id too: a copy published after the window (a process that
was stopped for minutes in the middle of a tick) is the same fire, whose calls exist already.

A process fires every tick from its start on, late ones too; ticks that passed while it was
not running are not fired at its start (skipped): with several gateways another one fired
them, and with every gateway down nobody did, by design (docs/events.md).
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from faas_gateway.core.events import SOURCE_ALARM, SOURCE_CRON, tick_fire_id, tick_message_id
from faas_gateway.core.feeds import ONCE, FeedError, FeedState, Schedule, parse_cron
from faas_gateway.core.functions import (
    CRON_TOPIC,
    SCHEDULE_ANNOTATION,
    TOPIC_ANNOTATION,
    Registry,
)
from faas_gateway.core.retry import Backoff
from faas_gateway.nats.events import EventWatch
from faas_gateway.runtime.loops import stop_task
from gateway.events.fires import Fires
from gateway.metrics import GatewayMetrics
from gateway.queue import GatewayQueue, MessageTooLargeError, QueueError

log = logging.getLogger("faas.events")

# A tick that cannot be published (NATS away) is tried again for this long, then dropped.
PUBLISH_FOR_S = 60.0
# The longest sleep between two looks at the clock, in case the clock jumps.
MAX_SLEEP_S = 30.0

# Deletes a trigger once its alarms/once fired (deleteAfterFire true, or "rules": its rules too).
DeleteAfterFire = Callable[[str, bool], Awaitable[None]]


@dataclass(eq=False)
class Timer:
    source: str  # SOURCE_ALARM (a trigger's feed) or SOURCE_CRON (a function's schedule)
    target: str
    schedule: Schedule
    payload: dict[str, Any] = field(default_factory=dict)
    delete_after_fire: bool | str = False
    next_ms: int | None = None

    def same_as(self, other: "Timer") -> bool:
        return (self.schedule, self.payload, self.delete_after_fire) == (
            other.schedule,
            other.payload,
            other.delete_after_fire,
        )


def cron_schedules(registry: Registry) -> dict[str, Schedule]:
    """Functions with OpenFaaS's cron-connector annotations, and when each runs."""
    schedules: dict[str, Schedule] = {}
    for function in registry:
        topics = function.annotations.get(TOPIC_ANNOTATION, "")
        if CRON_TOPIC not in (topic.strip() for topic in topics.split(",")):
            continue
        try:
            cron = parse_cron(function.annotations.get(SCHEDULE_ANNOTATION))
        except FeedError as exc:
            log.warning("function %s: not scheduled: %s", function.name, exc)
            continue
        schedules[function.name] = Schedule(anchor_ms=0, cron=cron)
    return schedules


class Scheduler:
    def __init__(
        self,
        fires: Fires,
        watch: EventWatch,
        registry: Registry,
        queue: GatewayQueue,
        metrics: GatewayMetrics,
        delete_after_fire: DeleteAfterFire,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._fires = fires
        self._watch = watch
        self._registry = registry
        self._queue = queue
        self._metrics = metrics
        self._delete_after_fire = delete_after_fire
        self._clock = clock
        self.timers: dict[tuple[str, str], Timer] = {}
        self._wake = asyncio.Event()
        self._stale = True
        self._task: asyncio.Task[None] | None = None
        self._publishing: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        if self._task is None:
            self._watch.feeds.listeners.append(self._changed)
            self._registry.on_change(self._changed)
            self._task = asyncio.create_task(self._run(), name="scheduler")

    async def close(self) -> None:
        for task in [self._task, *self._publishing]:
            if task is not None:
                await stop_task(task)

    def _changed(self) -> None:
        self._stale = True
        self._wake.set()

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _rebuild(self) -> None:
        """The timers for what is stored now; one whose schedule did not change keeps its next
        tick, a new or changed one starts at the first tick from now."""
        wanted: dict[tuple[str, str], Timer] = {}
        for state in self._watch.feeds.entries.values():
            schedule = state.schedule()
            if schedule is not None and state.active:
                wanted[(SOURCE_ALARM, state.trigger)] = _alarm_timer(state, schedule)
        for function, schedule in cron_schedules(self._registry).items():
            wanted[(SOURCE_CRON, function)] = Timer(SOURCE_CRON, function, schedule)
        now_ms = self._now_ms()
        for key, timer in wanted.items():
            before = self.timers.get(key)
            if before is not None and before.same_as(timer):
                timer.next_ms = before.next_ms
            else:
                timer.next_ms = timer.schedule.next_tick_ms(now_ms)
        self.timers = wanted
        self._stale = False

    async def _run(self) -> None:
        # Ticks are computed from the stored feeds: wait until this process has read them.
        await self._watch.feeds.synced.wait()
        while True:
            if self._stale:
                self._rebuild()
            self._wake.clear()
            now_ms = self._now_ms()
            for timer in list(self.timers.values()):
                while timer.next_ms is not None and timer.next_ms <= now_ms:
                    self._publish_in_background(timer, timer.next_ms)
                    timer.next_ms = timer.schedule.next_tick_ms(timer.next_ms)
            upcoming = [timer.next_ms for timer in self.timers.values() if timer.next_ms]
            sleep_s = MAX_SLEEP_S
            if upcoming:
                sleep_s = min(MAX_SLEEP_S, max(0.0, (min(upcoming) - self._now_ms()) / 1000))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), sleep_s)

    def _publish_in_background(self, timer: Timer, tick_ms: int) -> None:
        task = asyncio.create_task(self._tick(timer, tick_ms))
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def _tick(self, timer: Timer, tick_ms: int) -> None:
        self._metrics.alarm_lateness.observe(max(0.0, self._clock() - tick_ms / 1000))
        fire_id = tick_fire_id(timer.source, timer.target, tick_ms)
        msg_id = tick_message_id(timer.source, timer.target, tick_ms)
        backoff = Backoff(first_s=0.2, max_s=5.0)
        while True:
            try:
                duplicate = await self._publish(timer, tick_ms, fire_id, msg_id)
                break
            except MessageTooLargeError as exc:
                log.error("alarm of %s at %d not fired: %s", timer.target, tick_ms, exc)
                return
            except QueueError as exc:
                if self._clock() - tick_ms / 1000 > PUBLISH_FOR_S:
                    log.error("alarm of %s at %d not fired: %s", timer.target, tick_ms, exc)
                    return
                await asyncio.sleep(backoff.next_s())
        if duplicate is None:
            return
        if timer.delete_after_fire and not duplicate:
            # The one process whose publish JetStream kept deletes the trigger.
            await self._delete_after_fire(timer.target, timer.delete_after_fire == "rules")

    async def _publish(self, timer: Timer, tick_ms: int, fire_id: str, msg_id: str) -> bool | None:
        """Publish one tick; None when there was nothing to fire (no trigger, no rule)."""
        await self._queue.wait_until_ready()
        if timer.source == SOURCE_CRON:
            fire = self._fires.of_function(
                timer.target,
                b"",
                (("X-Topic", CRON_TOPIC),),
                source=SOURCE_CRON,
                fire_id=fire_id,
                scheduled_at_ms=tick_ms,
            )
            return await self._fires.publish(fire, msg_id)
        trigger = self._watch.triggers.get(timer.target)
        if trigger is None:
            log.debug("alarm of trigger %s, which does not exist: not fired", timer.target)
            return None
        trigger_fire = self._fires.of_trigger(
            trigger, timer.payload, source=SOURCE_ALARM, fire_id=fire_id, scheduled_at_ms=tick_ms
        )
        if trigger_fire is None:
            return None
        return await self._fires.publish(trigger_fire, msg_id)


def _alarm_timer(state: FeedState, schedule: Schedule) -> Timer:
    delete_after: bool | str = False
    if state.feed == ONCE:
        delete_after = state.options.get("deleteAfterFire", False)
    return Timer(SOURCE_ALARM, state.trigger, schedule, state.payload, delete_after)
