"""The durable pull consumer that all workers share, so that N workers split the queue."""

import contextlib
import logging

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

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


async def end_deliveries(
    subscription: JetStreamContext.PullSubscription, client: NatsClient, timeout_s: float
) -> list[Msg]:
    """End the worker's pull subscription; return the calls JetStream delivered to it that no
    fetch took.

    A pull request outlives the fetch that sent it: the server keeps it until its expiry (one
    that nats-py buffered while disconnected goes out on reconnect, later still), and what it
    delivers then waits in the subscription for the next fetch, which a stopping worker never
    makes. These are the steps of nats-py's ``Subscription.drain``, which has no form for a
    pull subscription (it waits on a queue that fetch reads without marking): the server drops
    our interest, and with it our open pull requests; a round trip brings in whatever it sent
    before; the rest is taken from the subscription's queue.
    """
    inner = subscription._sub
    if client.is_connected:
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await client._send_unsubscribe(inner._id)
            await client.flush(timeout=max(1, round(timeout_s)))
    messages = []
    while not inner._pending_queue.empty():
        msg = inner._pending_queue.get_nowait()
        inner._pending_size -= len(msg.data)
        if not JetStreamContext.is_status_msg(msg):  # the end of a pull request, not a call
            messages.append(msg)
    with contextlib.suppress(nats.errors.Error):
        await subscription.unsubscribe()
    return messages
