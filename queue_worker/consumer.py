"""The durable pull consumer that all workers share, so that N workers split the queue."""

import asyncio
import collections
import contextlib
import logging

import nats.errors
import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError, NotFoundError, ServiceUnavailableError

from faas_gateway.nats.jetstream import subscribe_handoff
from queue_worker.settings import WorkerSettings

log = logging.getLogger("faas.worker")


def desired_consumer_config(settings: WorkerSettings) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=settings.consumer_name,
        description=f"faas queue-workers of queue {settings.worker_queue}",
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=settings.ack_wait_s,
        max_deliver=-1,
        filter_subject=settings.queue_subjects,
        max_ack_pending=settings.max_ack_pending,
    )


async def ensure_consumer(js: JetStreamContext, settings: WorkerSettings) -> None:
    """Create the consumer, or bring its tunable settings in line with ours."""
    desired = desired_consumer_config(settings)
    try:
        info = await js.consumer_info(settings.nats_stream, settings.consumer_name)
    except NotFoundError:
        await js.add_consumer(settings.nats_stream, desired)
        log.info("created consumer %s on stream %s", settings.consumer_name, settings.nats_stream)
        return
    existing = info.config
    if (
        abs((existing.ack_wait or 0) - settings.ack_wait_s) > 1e-3
        or existing.max_ack_pending != settings.max_ack_pending
        or existing.filter_subject != desired.filter_subject
    ):
        log.info(
            "updating consumer %s: ack_wait %ss, max_ack_pending %d",
            settings.consumer_name,
            settings.ack_wait_s,
            settings.max_ack_pending,
        )
        await js.add_consumer(settings.nats_stream, desired)


class Puller:
    """Takes batches of messages from the durable consumer: what it holds now, or the first
    to come within the wait, never more than asked for.

    One pull request per fetch, ``no_wait`` with ``expires``: JetStream sends what it has
    (up to the batch) at once, or waits up to ``expires`` for the first message, and then
    ends the request (404 No Messages, or 408 Request Timeout). It does what nats-py's
    PullSubscription.fetch does for us, but the messages are handed over as the connection
    reads them (see Handoff): nats-py waited for each one with a task and a timer of its
    own, a few percent of the worker's CPU per call. A message that comes after its fetch
    gave up (the request outlived the wait here) is kept for the next fetch.
    """

    def __init__(self, client: NatsClient, stream: str, consumer: str) -> None:
        self._client = client
        self._request_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = ""
        self._subscription: Subscription | None = None
        self._ready: collections.deque[Msg] = collections.deque()
        self._requests = 0
        self._current = ""  # the reply subject of the request being waited for
        self._wanted = 0
        self._ended: asyncio.Future[None] | None = None

    async def start(self) -> None:
        self._inbox = self._client.new_inbox()
        self._subscription = await subscribe_handoff(self._client, self._inbox + ".*", self._take)

    async def close(self) -> None:
        if self._subscription is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._subscription.unsubscribe()
            self._subscription = None

    async def end(self, timeout_s: float) -> list[Msg]:
        """Stop taking deliveries; return the calls JetStream delivered that no fetch took.

        A pull request outlives the fetch that sent it (the server keeps it until its expiry;
        one buffered while disconnected goes out on reconnect, later still), and what it
        delivers then waits here for a next fetch that a stopping worker never makes. The
        server is told to drop our interest, and with it our open pull requests; a round trip
        brings in whatever it sent before (handed over as read, see Handoff); only then is the
        subscription removed here, so that nothing in flight is dropped unread.
        """
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            if self._client.is_connected:
                with contextlib.suppress(nats.errors.Error, TimeoutError):
                    await self._client._send_unsubscribe(subscription._id)
                    await self._client.flush(timeout=max(1, round(timeout_s)))
            with contextlib.suppress(nats.errors.Error):
                await subscription.unsubscribe()
        messages = list(self._ready)
        self._ready.clear()
        return messages

    async def fetch(self, batch: int, timeout_s: float) -> list[Msg]:
        """At most ``batch`` messages; nats.errors.TimeoutError when none came in
        ``timeout_s``; APIError when JetStream refused the request (503: no such consumer)."""
        if not self._ready:
            await self._pull(batch, timeout_s)
        if not self._ready:
            raise nats.errors.TimeoutError
        return [self._ready.popleft() for _ in range(min(batch, len(self._ready)))]

    async def _pull(self, batch: int, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        self._requests += 1
        self._current = f"{self._inbox}.{self._requests}"
        self._wanted = batch
        ended = self._ended = loop.create_future()
        # The request expires just before the wait here does, as in nats-py: its last
        # messages are rarely left for the next fetch.
        request = {"batch": batch, "expires": int(timeout_s * 1e9) - 100_000, "no_wait": True}
        wait = loop.call_later(timeout_s, _end, ended)
        try:
            await self._client.publish(
                self._request_subject, orjson.dumps(request), reply=self._current
            )
            await ended
        finally:
            wait.cancel()
            self._ended = None

    def _take(self, msg: Msg) -> None:
        headers = msg.headers
        status = headers.get("Status") if headers else None
        ended = self._ended
        if status is None:
            self._ready.append(msg)
            if ended is not None and len(self._ready) >= self._wanted:
                _end(ended)
            return
        if ended is None or msg.subject != self._current:
            return  # the end of a request given up on already
        if status in ("404", "408"):  # no (more) messages; expired
            _end(ended)
        elif status == "503":  # no responders: the consumer is gone
            _fail(ended, ServiceUnavailableError())
        elif status not in ("100", "409"):
            # 100 is a heartbeat; 409s (too many requests waiting, a leader change, the
            # consumer deleted) end the wait only at its timeout, as with nats-py.
            description = headers.get("Description", "") if headers else ""
            _fail(ended, APIError(code=int(status), description=description))


def _end(ended: "asyncio.Future[None]") -> None:
    if not ended.done():
        ended.set_result(None)


def _fail(ended: "asyncio.Future[None]", error: Exception) -> None:
    if not ended.done():
        ended.set_exception(error)
