"""The durable pull consumer that all workers share, so that N workers split the queue."""

import logging

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
