"""Reading activation records: by id, waiting for one to finish, and listing the newest.

Listing reads the index stream backwards in windows of sequence numbers (a batched direct get
per window), then fetches the records of those call ids in one more batched get. The index
holds one small message per accepted call in the order accepted, so the newest 30 of 100,000
cost two or three requests; filters on function (a subject filter on the index), status and
``since`` (on the records) look further back, window by window, up to MAX_SCANNED entries.
"""

import logging
import time
from dataclasses import dataclass

import nats.errors

from faas_gateway.core.timefmt import format_duration_s
from faas_gateway.nats import jetstream
from faas_gateway.nats.activations import (
    ActivationStore,
    ActivationStoreError,
    StoredActivation,
    decode_entry,
    index_subject,
    parse_rfc3339_ns,
)
from faas_gateway.runtime.logs import call_context
from gateway.errors import GatewayError, QueueUnavailableError
from gateway.queue import Publisher
from gateway.settings import GatewaySettings

log = logging.getLogger("faas.gateway")

FIRST_WINDOW = 64
LARGEST_WINDOW = 4096
# How many index entries one listing looks through at most: a filter that matches nothing
# must not read a week of records.
MAX_SCANNED = 100_000
REQUEST_TIMEOUT_S = 5.0
RECORDS_PER_REQUEST = 256


class ActivationNotFoundError(GatewayError):
    status = 404


@dataclass(frozen=True, slots=True)
class ListQuery:
    function: str | None = None
    status: str | None = None
    limit: int = 30
    since_ns: int | None = None


class ActivationQueries:
    def __init__(self, settings: GatewaySettings, publisher: Publisher) -> None:
        self._settings = settings
        self._publisher = publisher

    def _store(self) -> ActivationStore:
        return self._publisher.activations()

    def not_found(self, call_id: str) -> ActivationNotFoundError:
        retention = format_duration_s(self._settings.activation_retention_s)
        return ActivationNotFoundError(
            f"no activation {call_id!r}: no call with this id was accepted, or its record "
            f"expired (records are kept for {retention})"
        )

    async def get(self, call_id: str) -> StoredActivation:
        try:
            stored = await self._store().get(call_id)
        except ActivationStoreError as exc:
            raise QueueUnavailableError(f"activation records are unavailable: {exc}") from exc
        if stored is None:
            raise self.not_found(call_id)
        return stored

    async def result_body(self, stored: StoredActivation) -> bytes:
        try:
            return await self._store().result_body(stored)
        except ActivationStoreError as exc:
            raise QueueUnavailableError(f"activation results are unavailable: {exc}") from exc

    async def wait_until_final(
        self, call_id: str, function: str, timeout_s: float
    ) -> StoredActivation | None:
        """The record once finished, or its latest state when ``timeout_s`` runs out.

        Watches the record's subject rather than polling: subscribe first, then read the
        current value, so an update between the two is not missed.
        """
        try:
            store = self._store()
            subscription = await self._publisher.client().subscribe(store.subject(call_id))
        except (GatewayError, nats.errors.Error) as exc:
            log.info("cannot wait for %s: %s", call_id, exc, extra=call_context(call_id, function))
            return None
        try:
            latest = await store.get(call_id)
            deadline = time.monotonic() + timeout_s
            while latest is None or not latest.is_final:
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    break
                try:
                    msg = await subscription.next_msg(timeout=remaining_s)
                except TimeoutError:
                    break
                update = decode_entry(msg)
                if update is not None:
                    latest = update
            return latest
        except (ActivationStoreError, nats.errors.Error) as exc:
            log.info(
                "waiting for %s ended early: %s",
                call_id,
                exc,
                extra=call_context(call_id, function),
            )
            return None
        finally:
            try:
                await subscription.unsubscribe()
            except nats.errors.Error as exc:
                log.debug("unsubscribing: %s", exc)

    async def newest(self, query: ListQuery) -> list[bytes]:
        """Record JSON documents, newest first."""
        try:
            return await self._list(query)
        except (TimeoutError, nats.errors.Error, ActivationStoreError) as exc:
            raise QueueUnavailableError(f"activation records are unavailable: {exc}") from exc

    async def _list(self, query: ListQuery) -> list[bytes]:
        self._store()  # 503 unless NATS is ready
        subject = index_subject(self._settings, query.function) if query.function else None
        found: list[bytes] = []
        windows = jetstream.read_backwards(
            self._publisher.client(),
            self._publisher.jetstream(),
            self._settings.activation_index_stream,
            subject,
            first_window=max(FIRST_WINDOW, 2 * query.limit),
            largest_window=LARGEST_WINDOW,
            max_scanned=MAX_SCANNED,
            timeout_s=REQUEST_TIMEOUT_S,
        )
        async for entries in windows:
            newest_first = [msg.data.decode() for msg in entries if msg.data]
            for offset in range(0, len(newest_first), RECORDS_PER_REQUEST):
                chunk = newest_first[offset : offset + RECORDS_PER_REQUEST]
                records = await self._records(chunk)
                for call_id in chunk:
                    stored = records.get(call_id)
                    if stored is None:  # expired, or its record never got written
                        continue
                    if query.since_ns is not None and _queued_ns(stored) < query.since_ns:
                        return found  # the index is in the order accepted: the rest are older
                    if query.status is not None and stored.record.get("status") != query.status:
                        continue
                    found.append(stored.record_json)
                    if len(found) == query.limit:
                        return found
        return found

    async def _records(self, call_ids: list[str]) -> dict[str, StoredActivation]:
        if not call_ids:
            return {}
        store = self._store()
        messages = await jetstream.direct_get_batch(
            self._publisher.client(),
            f"KV_{self._settings.activation_bucket}",
            {"multi_last": [store.subject(call_id) for call_id in call_ids]},
            REQUEST_TIMEOUT_S,
        )
        records = {}
        for msg in messages:
            stored = decode_entry(msg)
            if stored is not None:
                records[str(stored.record.get("callId"))] = stored
        return records


def _queued_ns(stored: StoredActivation) -> int:
    queued_at = stored.record.get("queuedAt")
    try:
        return parse_rfc3339_ns(str(queued_at))
    except ValueError:
        return 0
