"""Cancelled call ids, in a NATS key-value bucket that every worker watches.

The gateway writes a key for each call cancelled through ``DELETE /async-function/{callId}``;
each worker keeps the set in memory (a watch, not a read per call) and checks it before
starting a call, and stops a call of that id that runs on it. Keys expire with the activation
records (``activation_retention``).
"""

import asyncio
import contextlib
import logging
from collections.abc import Callable

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from faas_gateway.nats.jetstream import ensure_key_value
from faas_gateway.runtime.settings import CommonSettings

log = logging.getLogger("faas.cancellations")

# How long a worker waits, at start, for the watch to deliver the cancellations made so far.
INITIAL_SYNC_WAIT_S = 5.0


async def cancellation_bucket(js: JetStreamContext, settings: CommonSettings) -> KeyValue:
    return await ensure_key_value(
        js,
        KeyValueConfig(
            bucket=settings.cancellation_bucket,
            description="Cancelled async calls (faas-gateway)",
            history=1,
            ttl=settings.activation_retention_s,
            max_bytes=settings.cancellation_max_bytes,
            storage=StorageType.FILE,
            replicas=settings.nats_stream_replicas,
        ),
        # Discard new: a cancel refused (503) is better than an older one forgotten early,
        # which would let that call run.
        DiscardPolicy.NEW,
        "cancellation_max_bytes",
    )


class CancellationWatch:
    def __init__(
        self, js: JetStreamContext, settings: CommonSettings, on_cancel: Callable[[str], None]
    ) -> None:
        self._js = js
        self._settings = settings
        self._on_cancel = on_cancel
        self._task: asyncio.Task[None] | None = None
        self._synced = asyncio.Event()

    async def start(self) -> None:
        bucket = await cancellation_bucket(self._js, self._settings)
        watcher = await bucket.watchall()
        if (await bucket.status()).values == 0:
            # Nothing to catch up on; nats-py sends no end-of-initial-values marker then.
            self._synced.set()
        self._task = asyncio.create_task(self._follow(watcher), name="cancellation-watch")
        waiting = asyncio.create_task(self._synced.wait())
        await asyncio.wait(
            {waiting, self._task}, timeout=INITIAL_SYNC_WAIT_S, return_when=asyncio.FIRST_COMPLETED
        )
        waiting.cancel()
        if not self._synced.is_set():
            log.warning("cancellations not synced within %ss; going on", INITIAL_SYNC_WAIT_S)

    async def _follow(self, watcher: KeyValue.KeyWatcher) -> None:
        try:
            async for entry in watcher:
                if entry is None:  # the cancellations made before this watch are all in
                    self._synced.set()
                    continue
                if entry.operation is None and entry.key:
                    self._on_cancel(entry.key)
        except nats.errors.Error as exc:
            log.warning("cancellation watch ended: %s", exc)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
