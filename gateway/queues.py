"""Whether a worker serves each queue that registered functions use.

Calls to a queue no worker serves are accepted and pile up in the stream until one starts,
or until async_retention. That should not be silent: a deploy to such a queue answers with a
warning, and gateway_queue_unserved says so for every queue in use.

A queue is served when its durable consumer exists and some worker is at it now: one has a
pull request waiting (an idle worker always has one) or holds messages (a busy one). The
consumer alone is not enough, since it outlives its last worker. An idle worker is without a
pull request only between two fetches, for a moment, so a consumer found idle is looked at
once more, a moment later, before its queue is called unserved.
"""

import asyncio
import logging
import math
import time
from collections.abc import Mapping

import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from faas_gateway.core.functions import Registry
from faas_gateway.nats.link import NatsLink, NatsUnavailableError
from faas_gateway.nats.names import Names

log = logging.getLogger("faas.gateway")

# Scrapes within this long of the last look reuse it, so that scrapers cannot make the
# gateway ask NATS for every queue each time.
LOOK_EVERY_S = 5.0
# A consumer found idle is looked at again after this long (see the module's docstring).
LOOK_AGAIN_AFTER_S = 0.2
LOOK_TIMEOUT_S = 2.0


class ServedQueues:
    def __init__(self, registry: Registry, link: NatsLink, names: Names) -> None:
        self._registry = registry
        self._link = link
        self._names = names
        self._served: dict[str, bool] = {}
        self._looked_at = -math.inf
        self._refreshing = asyncio.Lock()

    async def is_served(self, queue: str) -> bool | None:
        """Whether a worker serves ``queue`` now; None when NATS cannot tell."""
        try:
            served = await self._look(self._link.js, queue)
        except (TimeoutError, NatsUnavailableError, nats.errors.Error) as exc:
            log.debug("cannot tell whether queue %s is served: %s", queue, exc)
            return None
        self._served[queue] = served
        return served

    async def _look(self, js: JetStreamContext, queue: str) -> bool:
        for attempt in range(2):
            if attempt:
                await asyncio.sleep(LOOK_AGAIN_AFTER_S)
            try:
                info = await js.consumer_info(
                    self._names.stream, self._names.consumer_for(queue), timeout=LOOK_TIMEOUT_S
                )
            except NotFoundError:
                return False
            if (info.num_waiting or 0) > 0 or (info.num_ack_pending or 0) > 0:
                return True
        return False

    async def refresh(self) -> None:
        """Look at every queue in use, unless that was done within LOOK_EVERY_S."""
        async with self._refreshing:
            if time.monotonic() - self._looked_at < LOOK_EVERY_S:
                return
            queues = sorted({function.queue for function in self._registry})
            found = await asyncio.gather(*(self.is_served(queue) for queue in queues))
            # Queues NATS could not tell about are left out rather than shown as they were.
            self._served = {
                queue: served
                for queue, served in zip(queues, found, strict=True)
                if served is not None
            }
            self._looked_at = time.monotonic()

    def served(self) -> Mapping[str, bool]:
        """{queue: served} for the queues in use at the last look; only queues some
        registered function still uses, so a deleted function's queue drops out."""
        in_use = {function.queue for function in self._registry}
        return {queue: served for queue, served in self._served.items() if queue in in_use}

    def warning(self, queue: str) -> str:
        consumer = self._names.consumer_for(queue)
        command = "faas-queue-worker" + ("" if queue == "default" else f" --queue {queue}")
        return (
            f"no worker serves queue {queue!r} (consumer {consumer} on stream "
            f"{self._names.stream}): its async calls wait in the queue until one does "
            f"({command})"
        )
