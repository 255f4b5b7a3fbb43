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
from nats.js.kv import KeyValue

from faas_gateway.nats.jetstream import key_value
from faas_gateway.nats.link import NatsLink, NatsUnavailableError
from faas_gateway.nats.names import Names

log = logging.getLogger("faas.cancellations")

# How long a worker waits, at start, for the watch to deliver the cancellations made so far.
INITIAL_SYNC_WAIT_S = 5.0


class CancellationError(RuntimeError):
    """A cancellation could not be written: NATS is away, or the bucket is full."""


class Cancellations:
    """The gateway's side: one key per cancelled call id."""

    def __init__(self, link: NatsLink, names: Names) -> None:
        self._link = link
        self._names = names

    async def cancel(self, call_id: str) -> None:
        try:
            await self._link.acks.publish(
                f"$KV.{self._names.cancellation_bucket}.{call_id}", b"", 5.0
            )
        except (TimeoutError, NatsUnavailableError, nats.errors.Error) as exc:
            raise CancellationError(f"cannot cancel now: {exc}") from exc


class CancellationWatch:
    def __init__(self, link: NatsLink, names: Names, on_cancel: Callable[[str], None]) -> None:
        self._link = link
        self._names = names
        self._on_cancel = on_cancel
        self._task: asyncio.Task[None] | None = None
        self._synced = asyncio.Event()

    async def start(self) -> None:
        bucket = key_value(self._link.js, self._names.cancellation_bucket)
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
