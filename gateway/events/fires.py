"""Accepted events, each written once to the fire stream: the one durable write a 202 for a
trigger fire waits for, and what alarm ticks and NATS messages become.

A fire names its target (a trigger, with the rules active at that moment; or a function, for
OpenFaaS's connector annotations) and carries what the fan-out needs to make the calls
(faas_gateway/core/events.py ``Fire``), so the fan-out reads nothing that may have changed
since.
"""

import time
from collections.abc import Mapping
from typing import Any

import orjson

from faas_gateway.core.events import Fire, Trigger, fire_arguments
from faas_gateway.nats.events import EventWatch
from faas_gateway.nats.provision import Plan
from gateway.metrics import GatewayMetrics
from gateway.queue import GatewayQueue, MessageTooLargeError, QueueError
from gateway.request import new_call_id

TRIGGER_TARGET = "trigger"
FUNCTION_TARGET = "function"


class Fires:
    def __init__(
        self, queue: GatewayQueue, plan: Plan, watch: EventWatch, metrics: GatewayMetrics
    ) -> None:
        self._queue = queue
        self._plan = plan
        self._names = plan.names
        self._watch = watch
        self._metrics = metrics

    def of_trigger(
        self,
        trigger: Trigger,
        payload: Mapping[str, Any],
        *,
        source: str,
        headers: Mapping[str, str] | None = None,
        fire_id: str | None = None,
        scheduled_at_ms: int | None = None,
    ) -> Fire | None:
        """A fire of ``trigger`` with ``payload``; None when no rule of it is active (OpenWhisk
        answers 204 then, and stores nothing). MessageTooLargeError (413) when the actions'
        parameters would not fit in a queued call."""
        rules = self._watch.active_rules(trigger.name)
        if not rules:
            self._metrics.count_fire(source, "no_rules")
            return None
        arguments = orjson.dumps(fire_arguments(trigger.parameters, payload, headers))
        payload_bytes = orjson.dumps(payload)
        limit = self._queue.max_body_bytes()
        if len(arguments) + len(payload_bytes) > limit:
            self._metrics.count_fire(source, "rejected")
            raise MessageTooLargeError(
                f"the fire is too large: its payload and the trigger's parameters come to "
                f"{len(arguments) + len(payload_bytes)} bytes with the payload kept for its "
                f"activation; at most {limit}"
            )
        return Fire(
            fire_id=fire_id or new_call_id(),
            source=source,
            fired_at_ns=time.time_ns(),
            trigger=trigger.name,
            rules=tuple((rule.name, rule.action) for rule in rules),
            arguments=arguments,
            payload=payload_bytes,
            scheduled_at_ms=scheduled_at_ms,
        )

    def of_function(
        self,
        function: str,
        body: bytes,
        headers: tuple[tuple[str, str], ...],
        *,
        source: str,
        fire_id: str | None = None,
        scheduled_at_ms: int | None = None,
    ) -> Fire:
        """An event for a function (a cron tick, a message on a topic): one invocation."""
        return Fire(
            fire_id=fire_id or new_call_id(),
            source=source,
            fired_at_ns=time.time_ns(),
            function=function,
            headers=headers,
            arguments=body,
            scheduled_at_ms=scheduled_at_ms,
        )

    async def publish(self, fire: Fire, msg_id: str | None = None) -> bool:
        """Write ``fire`` to the fire stream and wait for the ack; True when JetStream had it
        already (another gateway published the same tick). QueueError as for a queued call
        (503 not ready or full, 413 too large)."""
        if fire.trigger is not None:
            subject = self._names.fire_subject(TRIGGER_TARGET, fire.trigger)
        else:
            subject = self._names.fire_subject(FUNCTION_TARGET, str(fire.function))
        try:
            duplicate = await self._queue.publish(
                subject,
                fire.encode(),
                msg_id or fire.fire_id,
                stream=(self._names.fire_stream, self._plan.fires_limits),
            )
        except QueueError:
            self._metrics.count_fire(fire.source, "rejected")
            raise
        self._metrics.count_fire(fire.source, "duplicate" if duplicate else "accepted")
        return duplicate
