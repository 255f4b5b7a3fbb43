"""NATS subjects as event sources: the built-in feed ``/whisk.system/nats/subject`` (each
message fires a trigger) and OpenFaaS's nats-connector convention (a function whose ``topic``
annotation names subjects is invoked for each message on them).

Each source is one core NATS subscription per gateway process, in a queue group shared by all
of them (the feed's ``queue``, else ``faas-feed-<trigger>``; ``faas-topic-<function>``), so
NATS hands each message to one process, which writes it to the fire stream as a fire. From
there on it is durable; before, it is core NATS: at most once. A message published while no
gateway listens, or held by a process that dies before the fire stream took it, is lost
(docs/events.md says what that means and how to get more).
"""

import asyncio
import base64
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import nats.errors
import orjson
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from faas_gateway.core.events import (
    SOURCE_SUBJECT,
    SOURCE_TOPIC,
    is_valid_subject,
    subject_within,
)
from faas_gateway.core.feeds import SUBJECT
from faas_gateway.core.functions import CRON_TOPIC, TOPIC_ANNOTATION, Registry
from faas_gateway.nats.events import EventWatch
from faas_gateway.nats.link import NatsLink, NatsUnavailableError
from faas_gateway.runtime.loops import stop_task
from gateway.events.fires import Fires
from gateway.queue import GatewayQueue, QueueError

log = logging.getLogger("faas.events")

# What a function gets as Content-Type for a message without one (the connector-sdk's).
DEFAULT_CONTENT_TYPE = "text/plain"


@dataclass(frozen=True, slots=True)
class Listener:
    subject: str
    group: str
    trigger: str | None = None
    function: str | None = None


def message_payload(data: bytes) -> dict[str, Any]:
    """A message as a trigger's payload: a JSON object as it is; other text as
    ``{"payload": text}``; bytes that are not UTF-8 in base64, saying so."""
    if data[:1] == b"{" or data.strip()[:1] == b"{":
        with contextlib.suppress(orjson.JSONDecodeError):
            parsed = orjson.loads(data)
            if isinstance(parsed, dict):
                return parsed
    try:
        return {"payload": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"payload": base64.b64encode(data).decode("ascii"), "encoding": "base64"}


class SubjectFeeds:
    def __init__(
        self,
        link: NatsLink,
        fires: Fires,
        watch: EventWatch,
        registry: Registry,
        queue: GatewayQueue,
        spaces: list[str],
    ) -> None:
        self._link = link
        self._fires = fires
        self._watch = watch
        self._registry = registry
        self._queue = queue
        self._spaces = spaces
        self.subscriptions: dict[Listener, Subscription] = {}
        self._warned: set[tuple[str, str]] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._watch.feeds.listeners.append(self._wake.set)
            self._registry.on_change(self._wake.set)
            self._task = asyncio.create_task(self._run(), name="subject-feeds")

    async def close(self) -> None:
        if self._task is not None:
            await stop_task(self._task)
        for subscription in self.subscriptions.values():
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        self.subscriptions.clear()

    def wanted(self) -> set[Listener]:
        listeners: set[Listener] = set()
        for state in self._watch.feeds.entries.values():
            if state.feed == SUBJECT and state.active:
                group = state.options.get("queue") or f"faas-feed-{state.trigger}"
                listeners.add(Listener(state.options["subject"], group, trigger=state.trigger))
        for function in self._registry:
            topics = function.annotations.get(TOPIC_ANNOTATION)
            if not topics:
                continue
            for topic in (topic.strip() for topic in topics.split(",")):
                if not topic or topic == CRON_TOPIC:
                    continue
                if not is_valid_subject(topic) or not any(
                    subject_within(topic, space) for space in self._spaces
                ):
                    self._warn_once(function.name, topic)
                    continue
                listeners.add(
                    Listener(topic, f"faas-topic-{function.name}", function=function.name)
                )
        return listeners

    def _warn_once(self, function: str, topic: str) -> None:
        if (function, topic) not in self._warned:
            self._warned.add((function, topic))
            log.warning(
                "function %s: topic %r is not a subject within event_subjects (%s); not "
                "listened to",
                function,
                topic,
                ", ".join(self._spaces),
            )

    async def _run(self) -> None:
        await self._watch.feeds.synced.wait()
        while True:
            self._wake.clear()
            await self._queue.wait_until_ready()
            try:
                await self._reconcile()
            except (nats.errors.Error, NatsUnavailableError) as exc:
                log.warning("subject feeds not set up yet: %s", exc)
                await asyncio.sleep(1.0)
                self._wake.set()
            await self._wake.wait()

    async def _reconcile(self) -> None:
        wanted = self.wanted()
        for listener in [known for known in self.subscriptions if known not in wanted]:
            subscription = self.subscriptions.pop(listener)
            with contextlib.suppress(nats.errors.Error):
                await subscription.unsubscribe()
        for listener in wanted - set(self.subscriptions):
            self.subscriptions[listener] = await self._link.nc.subscribe(
                listener.subject, queue=listener.group, cb=self._handler(listener)
            )
            log.info(
                "listening on %s (queue group %s) for %s",
                listener.subject,
                listener.group,
                listener.trigger or listener.function,
            )

    def _handler(self, listener: Listener) -> Any:
        async def handle(msg: Msg) -> None:
            try:
                await self._on_message(listener, msg)
            except QueueError as exc:
                log.warning("message on %s lost: %s", msg.subject, exc)

        return handle

    async def _on_message(self, listener: Listener, msg: Msg) -> None:
        if listener.trigger is not None:
            trigger = self._watch.triggers.get(listener.trigger)
            if trigger is None:
                return
            fire = self._fires.of_trigger(trigger, message_payload(msg.data), source=SOURCE_SUBJECT)
            if fire is not None:
                await self._fires.publish(fire)
            return
        content_type = (msg.headers or {}).get("Content-Type", DEFAULT_CONTENT_TYPE)
        await self._fires.publish(
            self._fires.of_function(
                str(listener.function),
                msg.data,
                (("Content-Type", content_type), ("X-Topic", msg.subject)),
                source=SOURCE_TOPIC,
            )
        )
