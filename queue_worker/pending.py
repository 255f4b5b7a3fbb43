"""Calls waiting on a worker's queue, per function, read from the stream.

The stream has work-queue retention: a message stays in it until a worker acks it, after the
call ended. So a subject's count is every call of that function not finished yet: waiting,
fetched ahead, running, deferred or waiting for a retry. It is the same number at every worker
of the queue (it counts for the queue, not for one worker).
"""

import asyncio

import nats.errors
from nats.js import JetStreamContext

from queue_worker.settings import WorkerSettings


def by_function(subjects: dict[str, int] | None, queue_prefix: str) -> dict[str, int]:
    """``{"<prefix>.<queue>.<function>": n}`` to ``{"<function>": n}``."""
    counts: dict[str, int] = {}
    for subject, count in (subjects or {}).items():
        if subject.startswith(queue_prefix):
            function = subject[len(queue_prefix) :]
            counts[function] = counts.get(function, 0) + count
    return counts


async def read_pending(
    js: JetStreamContext, settings: WorkerSettings, timeout_s: float
) -> dict[str, int] | None:
    """Per-function counts of the worker's queue; None when JetStream does not answer in time."""
    try:
        info = await asyncio.wait_for(
            js.stream_info(settings.nats_stream, subjects_filter=settings.queue_subjects),
            timeout_s,
        )
    except (nats.errors.Error, TimeoutError):
        return None
    return by_function(info.state.subjects, settings.queue_subjects.removesuffix(">"))
