"""Key-value buckets every process keeps a copy of: a watch that follows one, and conditional
writes of JSON documents to one.

``BucketWatch`` is what the function registry's watch was (faas_gateway/nats/function_store.py
``FunctionWatch`` is one now), made general: the OpenWhisk triggers, rules and built-in feeds
(faas_gateway/nats/events.py) are followed the same way. ``Documents`` writes JSON entries
that way too: created once, then changed or deleted only over the revision the writer read.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import nats.errors
import orjson
from nats.js.api import Header
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE, KeyValue

from faas_gateway.core.retry import Backoff
from faas_gateway.nats.jetstream import WRONG_LAST_SEQUENCE_CODES, key_value
from faas_gateway.nats.link import NatsLink, NatsUnavailableError
from faas_gateway.runtime.loops import stop_task

log = logging.getLogger("faas.nats")

# How often a watch starts over from a fresh read of the whole bucket, reconnects or not.
RESYNC_EVERY_S = 300.0
# How often a watch that has nothing to deliver looks whether it was asked to start over.
RESTART_CHECK_S = 1.0

T = TypeVar("T")


class BucketWatch(Generic[T]):
    """Keeps ``entries`` equal to a bucket: a snapshot, then each change.

    ``decode`` turns an entry's value into what is kept, or None for one that cannot be used
    (it is then absent). Started again after each reconnect (a restarted server has lost the
    watch's ephemeral consumer, and changes made meanwhile must not be missed), and read whole
    again every RESYNC_EVERY_S. Changes this process made itself are applied at once
    (``apply``) so that its own next request sees them; revisions keep a late delivery from
    undoing a newer change. ``listeners`` are called after every change that was applied.
    """

    def __init__(
        self,
        link: NatsLink,
        bucket: str,
        decode: Callable[[str, bytes], T | None],
        what: str,
    ) -> None:
        self._link = link
        self._bucket = bucket
        self._decode = decode
        self._what = what
        self.entries: dict[str, T] = {}
        self._revisions: dict[str, int] = {}
        self.synced = asyncio.Event()
        self.listeners: list[Callable[[], None]] = []
        self._restart = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"{self._what}-watch")

    def restart(self) -> None:
        self._restart.set()

    async def close(self) -> None:
        if self._task is not None:
            await stop_task(self._task)

    def get(self, key: str) -> T | None:
        return self.entries.get(key)

    def apply(self, key: str, revision: int, value: T | None) -> None:
        """One change to one key: written (``value``) or deleted (None)."""
        if revision <= self._revisions.get(key, 0):
            return
        self._revisions[key] = revision
        if value is None:
            self.entries.pop(key, None)
        else:
            self.entries[key] = value
        self._changed(key, value)
        self._notify()

    def drop(self, key: str) -> None:
        """Forget a key found gone from the bucket; its revision stays, for the order."""
        if self.entries.pop(key, None) is not None:
            self._changed(key, None)
            self._notify()

    def _changed(self, key: str, value: T | None) -> None:
        """What a subclass does on one change, after ``entries`` has it."""

    def _replaced(self) -> None:
        """What a subclass does once ``entries`` holds a fresh snapshot of the bucket."""

    def _notify(self) -> None:
        for listener in self.listeners:
            listener()

    async def _run(self) -> None:
        backoff = Backoff(max_s=5.0)
        while True:
            self._restart.clear()
            try:
                watcher = await key_value(self._link.js, self._bucket).watchall()
            except (nats.errors.Error, NatsUnavailableError, TimeoutError) as exc:
                log.warning("cannot watch the %s bucket yet: %s", self._what, exc)
                await asyncio.sleep(backoff.next_s())
                continue
            backoff.reset()
            try:
                await self._follow(watcher)
            except (nats.errors.Error, TimeoutError) as exc:
                log.warning("%s watch interrupted, starting it again: %s", self._what, exc)
            finally:
                with contextlib.suppress(Exception):
                    await watcher.stop()  # type: ignore[no-untyped-call]  # untyped upstream

    async def _follow(self, watcher: KeyValue.KeyWatcher) -> None:
        snapshot: dict[str, tuple[int, T | None]] | None = {}
        # A safety net for a watch that went quiet without a disconnect (nats-py does not
        # notice a lost ordered consumer): read the whole bucket again now and then.
        resync_at = time.monotonic() + RESYNC_EVERY_S
        while not self._restart.is_set() and time.monotonic() < resync_at:
            try:
                entry = await watcher.updates(timeout=RESTART_CHECK_S)  # type: ignore[no-untyped-call]
            except nats.errors.TimeoutError:
                continue
            if entry is None:  # the bucket's state when the watch started is all in
                if snapshot is not None:
                    self._replace(snapshot)
                    snapshot = None
                    self.synced.set()
                continue
            if not isinstance(entry, KeyValue.Entry) or not entry.key:
                continue
            value = None
            if entry.operation not in (KV_DEL, KV_PURGE):
                value = self._decode(entry.key, entry.value or b"")
            revision = entry.revision or 0
            if snapshot is not None:
                snapshot[entry.key] = (revision, value)
            else:
                self.apply(entry.key, revision, value)

    def _replace(self, snapshot: dict[str, tuple[int, T | None]]) -> None:
        self._revisions = {key: revision for key, (revision, _) in snapshot.items()}
        self.entries = {key: value for key, (_, value) in snapshot.items() if value is not None}
        self._replaced()
        self._notify()


class DocumentStoreError(Exception):
    """A change to a bucket of documents that cannot be made; the message says why."""


class DocumentExistsError(DocumentStoreError):
    pass


class DocumentNotFoundError(DocumentStoreError):
    pass


class DocumentChangedError(DocumentStoreError):
    """Another writer changed the entry since it was read: the write was not made."""


class DocumentStoreUnavailableError(DocumentStoreError):
    """NATS is away, did not answer, or the bucket is full."""


_UNAVAILABLE = (TimeoutError, NatsUnavailableError, nats.errors.Error)


class Documents:
    """JSON documents in one bucket, one per key: created only if new, then changed or
    deleted only over the revision the writer read, so two gateways changing one entry at once
    cannot lose either change silently. ``what`` names the entries in error messages."""

    def __init__(self, link: NatsLink, bucket: str, what: str) -> None:
        self._link = link
        self._bucket_name = bucket
        self._what = what

    def _bucket(self) -> KeyValue:
        return key_value(self._link.js, self._bucket_name)

    async def create(self, key: str, document: dict[str, Any]) -> int:
        try:
            return int(await self._bucket().create(key, orjson.dumps(document)))
        except KeyWrongLastSequenceError as exc:
            raise DocumentExistsError(f"{self._what} {key!r} exists already") from exc
        except _UNAVAILABLE as exc:
            raise DocumentStoreUnavailableError(f"{self._what}s: {exc!r}") from exc

    async def update(self, key: str, document: dict[str, Any], revision: int) -> int:
        try:
            return int(await self._bucket().update(key, orjson.dumps(document), revision))
        except KeyWrongLastSequenceError as exc:
            raise DocumentChangedError(
                f"{self._what} {key!r} was changed at the same time; try again"
            ) from exc
        except _UNAVAILABLE as exc:
            raise DocumentStoreUnavailableError(f"{self._what}s: {exc!r}") from exc

    async def delete(self, key: str, revision: int) -> int:
        """A delete marker over ``revision``; its own revision, for the watch's order."""
        try:
            ack = await self._link.js.publish(
                f"$KV.{self._bucket_name}.{key}",
                b"",
                headers={KV_OP: KV_DEL, Header.EXPECTED_LAST_SUBJECT_SEQUENCE: str(revision)},
            )
        except APIError as exc:
            if exc.err_code in WRONG_LAST_SEQUENCE_CODES:
                raise DocumentChangedError(
                    f"{self._what} {key!r} was changed at the same time; try again"
                ) from exc
            raise DocumentStoreUnavailableError(f"{self._what}s: {exc!r}") from exc
        except _UNAVAILABLE as exc:
            raise DocumentStoreUnavailableError(f"{self._what}s: {exc!r}") from exc
        return int(ack.seq)

    async def get(self, key: str) -> tuple[dict[str, Any], int] | None:
        """The document and its revision; None when there is none (or it was deleted)."""
        try:
            entry = await self._bucket().get(key)
        except KeyNotFoundError:
            return None
        except _UNAVAILABLE as exc:
            raise DocumentStoreUnavailableError(f"{self._what}s: {exc!r}") from exc
        if entry.revision is None or not entry.value:
            return None
        try:
            document = orjson.loads(entry.value)
        except orjson.JSONDecodeError:
            return None
        return (document, entry.revision) if isinstance(document, dict) else None
