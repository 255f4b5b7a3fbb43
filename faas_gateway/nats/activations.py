"""Activation records: where every async call stands, kept in NATS so any gateway can answer.

Three JetStream parts, created idempotently by whichever process starts first:

- a key-value bucket (``activation_bucket``), one entry per call id, holding the record and,
  for a finished call, the function's response body. The value is one line of JSON (the
  record exactly as the API returns it), a newline, then the body as raw bytes, like a queued
  call. Entries expire after ``activation_retention``.
- an object store (``<activation_bucket>-results``) for response bodies too large to sit in
  one key-value entry (over INLINE_RESULT_BYTES), up to ``activation_max_result_bytes``.
- an index stream (``activation_index_stream``): one small message per call, in the order
  calls were accepted, on the subject ``<index stream>.<function>``. Listing reads it backwards
  (see gateway/activations.py); the bucket alone cannot say which calls are newest.
"""

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import orjson
from nats.aio.msg import Msg

from faas_gateway.core.call import QueuedCall
from faas_gateway.core.headers import header
from faas_gateway.core.outcome import Outcome
from faas_gateway.core.timefmt import format_duration_s, parse_rfc3339_ns, rfc3339_ms
from faas_gateway.nats.jetstream import (
    WRONG_LAST_SEQUENCE_CODES,
    PublishRejectedError,
    direct_get_batch,
    message_sequence,
    read_backwards,
)
from faas_gateway.nats.link import NatsLink, NatsUnavailableError
from faas_gateway.nats.names import Names
from faas_gateway.nats.results import ResultStore, ResultStoreError
from faas_gateway.runtime.logs import call_context

log = logging.getLogger("faas.activations")

QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
FINAL_STATUSES = frozenset({SUCCEEDED, FAILED, CANCELLED})

# Bodies up to this size sit in the key-value entry beside the record; larger ones go to the
# object store. Well under NATS's default max_payload of 1 MiB, which the record shares.
INLINE_RESULT_BYTES = 512 * 1024

EXPECTED_LAST_SUBJECT_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"
KV_OPERATION = "KV-Operation"


class ActivationStoreError(RuntimeError):
    """A record could not be read or written: NATS is away or did not answer in time."""


class RecordConflictError(Exception):
    """A conditional write lost: the record is not what this process last read or wrote."""


class ActivationExistsError(RecordConflictError):
    """The call id has a record already; ``stored`` is that record, if it could be read."""

    def __init__(self, call_id: str, stored: "StoredActivation | None") -> None:
        super().__init__(f"call id {call_id!r} has a record already")
        self.stored = stored


class ActivationChangedError(RecordConflictError):
    """Another writer (a cancellation, another worker) changed the record since it was read."""


class ActivationNotFoundError(LookupError):
    """No record of that call id: never accepted, or expired."""

    def __init__(self, call_id: str, retention_s: float) -> None:
        super().__init__(
            f"no activation {call_id!r}: no call with this id was accepted, or its record "
            f"expired (records are kept for {format_duration_s(retention_s)})"
        )


@dataclass(frozen=True, slots=True)
class ListQuery:
    function: str | None = None
    status: str | None = None
    limit: int = 30
    since_ns: int | None = None
    # Accepted at or before this time (OpenWhisk's upto); the newest matches skipped first.
    upto_ns: int | None = None
    skip: int = 0
    # Finished calls only (OpenWhisk lists an activation once it has ended).
    finished_only: bool = False


# Listing: index windows grow from the first to the largest; a filter that matches nothing
# must not read a week of records, so at most MAX_SCANNED index entries are looked at.
FIRST_WINDOW = 64
LARGEST_WINDOW = 4096
MAX_SCANNED = 100_000
RECORDS_PER_REQUEST = 256


def _ns_or_none(text: object) -> int | None:
    if not isinstance(text, str):
        return None
    try:
        return parse_rfc3339_ns(text)
    except ValueError:
        return None


@dataclass(slots=True)
class Activation:
    """One call's record. ``to_json`` gives the API's camelCase document."""

    call_id: str
    function: str
    status: str
    queued_at_ns: int
    request: dict[str, Any]
    status_code: int | None = None
    attempts: int = 0
    started_at_ns: int | None = None
    finished_at_ns: int | None = None
    duration_s: float | None = None
    response: dict[str, Any] | None = None
    error: str | None = None
    callback: dict[str, Any] | None = None
    next_attempt_at_ns: int | None = None
    retry_of: str | None = None
    # What the call was asked to do (QueuedCall.request_digest): a re-post of the same call id
    # is the same call only if it asks the same.
    request_digest: str | None = None
    # Who ended a failed call (Outcome.failed_by): the function's own failure status, its
    # timeout, or the gateway (unreachable, stopped). None for records written before it was
    # kept, and for calls that did not fail.
    failed_by: str | None = None
    # Lines about the call, oldest first (OpenWhisk's activation logs); most records have none.
    logs: list[str] = field(default_factory=list)
    # What the record is of when it is not a function's call: "trigger", a trigger's fire
    # (its ``function`` is then the trigger's name, its logs one line per rule).
    kind: str | None = None
    # Not part of the record: the revision of the entry this process last read or wrote, on
    # which its next write is conditional. 0: no entry yet.
    revision: int = 0

    @classmethod
    def queued(cls, call: QueuedCall) -> "Activation":
        return cls(
            call_id=call.call_id,
            function=call.function,
            status=QUEUED,
            queued_at_ns=call.accepted_at_ns,
            request={
                "method": call.method,
                "path": call.path,
                "query": call.query,
                "contentType": header(call.headers, "content-type"),
                "bodySize": len(call.body),
            },
            callback=None
            if call.callback_url is None
            else {"url": call.callback_url, "state": "pending", "attempts": 0, "lastStatus": None},
            retry_of=call.retry_of,
            request_digest=call.request_digest(),
        )

    @classmethod
    def from_stored(cls, stored: "StoredActivation") -> "Activation":
        """The record read back, to change it with the transitions below and write it again."""
        record = stored.record
        duration_ms = record.get("durationMs")
        return cls(
            call_id=str(record["callId"]),
            function=str(record["function"]),
            status=str(record["status"]),
            queued_at_ns=_ns_or_none(record.get("queuedAt")) or 0,
            request=dict(record.get("request") or {}),
            status_code=record.get("statusCode"),
            attempts=int(record.get("attempts") or 0),
            started_at_ns=_ns_or_none(record.get("startedAt")),
            finished_at_ns=_ns_or_none(record.get("finishedAt")),
            duration_s=None if duration_ms is None else float(duration_ms) / 1000,
            response=record.get("response"),
            error=record.get("error"),
            callback=record.get("callback"),
            next_attempt_at_ns=_ns_or_none(record.get("nextAttemptAt")),
            retry_of=record.get("retryOf"),
            request_digest=record.get("requestDigest"),
            failed_by=record.get("failedBy"),
            logs=[str(line) for line in record.get("logs") or ()],
            kind=record.get("kind"),
            revision=stored.revision,
        )

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES

    @property
    def callback_owed(self) -> bool:
        """Finished, with a callback that was neither delivered nor given up yet."""
        return (
            self.status in (SUCCEEDED, FAILED)
            and self.callback is not None
            and self.callback.get("state") == "pending"
        )

    def outcome(self, body: bytes) -> Outcome:
        """A finished call's outcome as its record keeps it, with its stored body."""
        content_type = (self.response or {}).get("contentType")
        return Outcome(
            status_code=int(self.status_code or 502),
            headers=[("Content-Type", str(content_type))] if content_type else [],
            body=body,
            duration_s=self.duration_s or 0.0,
            error=self.error,
        )

    def start(self, attempts: int, started_at_ns: int | None = None) -> None:
        self.status = RUNNING
        self.attempts = attempts
        self.started_at_ns = started_at_ns or time.time_ns()
        self.next_attempt_at_ns = None

    def wait_for_retry(self, outcome: Outcome, wait_s: float) -> None:
        """Back in the queue after a retryable failure: what happened, and when it goes on."""
        self.status = QUEUED
        self.status_code = outcome.status_code
        self.duration_s = outcome.duration_s
        self.error = outcome.error or f"the function answered {outcome.status_code}"
        self.next_attempt_at_ns = time.time_ns() + int(wait_s * 1e9)

    def cancel(self) -> None:
        self.status = CANCELLED
        self.finished_at_ns = time.time_ns()
        self.next_attempt_at_ns = None
        self.error = "cancelled"
        if self.callback is not None:
            self.callback = {**self.callback, "state": "not sent"}

    def finish(self, outcome: Outcome, stored: dict[str, Any] | None = None) -> None:
        """The function's outcome; ``stored`` says where its body went (see ActivationStore)."""
        self.status = SUCCEEDED if outcome.succeeded else FAILED
        self.status_code = outcome.status_code
        self.finished_at_ns = time.time_ns()
        self.duration_s = outcome.duration_s
        self.response = {
            "contentType": outcome.content_type(),
            "bodySize": outcome.body_size,
            "truncated": False,
            **(stored or {}),
        }
        self.next_attempt_at_ns = None
        self.failed_by = outcome.failed_by
        self.error = outcome.error if outcome.error else None
        if self.error is None and not outcome.succeeded:
            self.error = f"the function answered {outcome.status_code}"

    def note_stored(self, stored: dict[str, Any]) -> None:
        if self.response is not None:
            self.response = {**self.response, **stored}

    def note_callback(self, delivered: bool, attempts: int, last_status: int | None) -> None:
        if self.callback is not None:
            self.callback = {
                **self.callback,
                "state": "delivered" if delivered else "failed",
                "attempts": attempts,
                "lastStatus": last_status,
            }

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "callId": self.call_id,
            "function": self.function,
            "status": self.status,
            "statusCode": self.status_code,
            "attempts": self.attempts,
            "queuedAt": rfc3339_ms(self.queued_at_ns),
            "startedAt": rfc3339_ms(self.started_at_ns),
            "finishedAt": rfc3339_ms(self.finished_at_ns),
            "durationMs": None if self.duration_s is None else round(self.duration_s * 1000, 3),
            "request": self.request,
            "response": self.response,
            "error": self.error,
            "callback": self.callback,
            "nextAttemptAt": rfc3339_ms(self.next_attempt_at_ns),
            "retryOf": self.retry_of,
            "requestDigest": self.request_digest,
        }
        # Only when there is something to say: records without them read as before.
        if self.failed_by is not None:
            document["failedBy"] = self.failed_by
        if self.logs:
            document["logs"] = self.logs
        if self.kind is not None:
            document["kind"] = self.kind
        return document

    def encode(self, body: bytes = b"") -> bytes:
        # orjson: a record is encoded once or twice per call, and the standard library's
        # encoder was a tenth of the worker's time per call (bench scenario 8).
        return orjson.dumps(self.to_json()) + b"\n" + body


@dataclass(frozen=True, slots=True)
class StoredActivation:
    """A record as read back: its JSON line (served as is), parsed, and an inline body."""

    record_json: bytes
    record: dict[str, Any]
    inline_body: bytes
    revision: int = 0  # the entry's sequence in the bucket's stream

    @classmethod
    def decode(cls, value: bytes, revision: int = 0) -> "StoredActivation":
        line, _, body = value.partition(b"\n")
        record = orjson.loads(line)
        if not isinstance(record, dict):
            raise ValueError("activation record is not a JSON object")
        return cls(line, record, body, revision)

    @property
    def is_final(self) -> bool:
        return self.record.get("status") in FINAL_STATUSES


def queued_at_ns(stored: StoredActivation) -> int:
    return _ns_or_none(stored.record.get("queuedAt")) or 0


class ActivationStore:
    """Reads and writes records; one per process, over that process's NATS connection.

    A record is created once, by whoever accepts the call (``create``: only if the key is
    new), and every later write is conditional on the revision the writer last read or wrote
    (``Activation.revision``): a writer that lost track of the record (a cancellation came in
    between, or another worker ran the same call) is told so (ActivationChangedError) instead
    of overwriting what it did not see.
    """

    def __init__(
        self, link: NatsLink, names: Names, max_result_bytes: int, retention_s: float
    ) -> None:
        self._link = link
        self._names = names
        self._max_result_bytes = max_result_bytes
        self._retention_s = retention_s  # only to say, in a 404, how long records are kept
        self._stream = names.activation_stream
        self._direct_get = f"$JS.API.DIRECT.GET.{self._stream}"
        self._timeout_s = 5.0
        self.results = ResultStore(link, names)

    def subject(self, call_id: str) -> str:
        return self._names.record_subject(call_id)

    async def create(self, activation: Activation, body: bytes = b"") -> None:
        """Index an accepted call and record it, only if its call id has no record yet.

        ActivationExistsError (with the record there, to compare) if it has one. The index
        entry is not acked, to spare every async call a round trip; it goes out first on the
        same connection, so the record's ack follows the server taking it. Lost with a
        connection cut between the two, it costs only that call's listing entry.
        """
        try:
            await self._link.nc.publish(
                self._names.index_subject(activation.function), activation.call_id.encode()
            )
        except (NatsUnavailableError, nats.errors.Error) as exc:
            raise ActivationStoreError(f"recording the call failed: {exc!r}") from exc
        expected = 0
        for _ in range(3):
            try:
                await self._write(activation, activation.encode(body), expected)
                return
            except ActivationChangedError:
                pass
            # Taken, or a tombstone of a record deleted after a failed enqueue, which a new
            # call may take over (conditional on the tombstone's revision).
            stored, revision = await self._entry(activation.call_id)
            if stored is not None:
                raise ActivationExistsError(activation.call_id, stored) from None
            expected = revision or 0
        raise ActivationExistsError(activation.call_id, None)

    async def put(self, activation: Activation, body: bytes = b"") -> None:
        """Write and wait for the ack, conditional on ``activation.revision``; a finished
        call's body goes with it. ActivationChangedError if the record changed meanwhile."""
        await self._write(activation, activation.encode(body), activation.revision)

    async def put_nowait(self, activation: Activation, body: bytes = b"") -> None:
        """Write without waiting for the ack, for the last write of a call only (a detail added
        to a final record): conditional like ``put``, but its new revision stays unknown."""
        try:
            await self._link.nc.publish(
                self.subject(activation.call_id),
                activation.encode(body),
                headers={EXPECTED_LAST_SUBJECT_SEQUENCE: str(activation.revision)},
            )
        except (NatsUnavailableError, nats.errors.Error) as exc:
            log.debug(
                "record %s not written: %s",
                activation.call_id,
                exc,
                extra=call_context(activation.call_id, activation.function),
            )

    async def create_nowait(self, activation: Activation, body: bytes = b"") -> None:
        """Index and record a call that is new for certain (its id was just generated, so the
        create cannot meet a record) without waiting for the acks: for a finished call whose
        caller has its answer already. NATS away: the record is lost, logged at debug."""
        try:
            await self._link.nc.publish(
                self._names.index_subject(activation.function), activation.call_id.encode()
            )
            await self._link.nc.publish(
                self.subject(activation.call_id),
                activation.encode(body),
                headers={EXPECTED_LAST_SUBJECT_SEQUENCE: "0"},
            )
        except (NatsUnavailableError, nats.errors.Error) as exc:
            log.debug(
                "record %s not written: %s",
                activation.call_id,
                exc,
                extra=call_context(activation.call_id, activation.function),
            )

    async def delete(self, activation: Activation) -> None:
        """Remove a record this process created for a call that was then not queued (the
        publish was refused), so that the client can post the same call id again."""
        try:
            await self._link.acks.publish(
                self.subject(activation.call_id),
                b"",
                self._timeout_s,
                headers={
                    KV_OPERATION: "DEL",
                    EXPECTED_LAST_SUBJECT_SEQUENCE: str(activation.revision),
                },
            )
        except PublishRejectedError as exc:
            if exc.err_code not in WRONG_LAST_SEQUENCE_CODES:
                raise ActivationStoreError(f"deleting the record failed: {exc!r}") from exc
            raise ActivationChangedError(str(exc)) from exc
        except (TimeoutError, NatsUnavailableError, nats.errors.Error) as exc:
            raise ActivationStoreError(f"deleting the record failed: {exc!r}") from exc

    async def _write(self, activation: Activation, payload: bytes, expected: int) -> None:
        try:
            ack = await self._link.acks.publish(
                self.subject(activation.call_id),
                payload,
                self._timeout_s,
                headers={EXPECTED_LAST_SUBJECT_SEQUENCE: str(expected)},
            )
        except PublishRejectedError as exc:
            if exc.err_code not in WRONG_LAST_SEQUENCE_CODES:
                raise ActivationStoreError(f"writing the record failed: {exc!r}") from exc
            raise ActivationChangedError(
                f"the record of {activation.call_id!r} changed since revision {expected}"
            ) from exc
        except (TimeoutError, NatsUnavailableError, nats.errors.Error) as exc:
            raise ActivationStoreError(f"writing the record failed: {exc!r}") from exc
        activation.revision = ack_sequence(ack)

    async def store_result(self, call_id: str, outcome: Outcome) -> tuple[bytes, dict[str, Any]]:
        """Where a response body goes: (bytes kept inline, what the record says about it).

        Up to INLINE_RESULT_BYTES beside the record; larger, in the results store (a body too
        large to hold is there already, whole: the result route serves its first
        activation_max_result_bytes, callbacks all of it).
        """
        limit = self._max_result_bytes
        if outcome.spooled_size is not None:
            return b"", {"truncated": outcome.spooled_size > limit, "storedIn": "objectStore"}
        body = outcome.body
        kept = body[:limit]
        stored: dict[str, Any] = {"truncated": len(kept) < len(body)}
        if len(kept) <= INLINE_RESULT_BYTES:
            return kept, stored
        try:
            await self.results.put(call_id, kept)
        except ResultStoreError as exc:
            if not exc.storage_full:
                raise ActivationStoreError(str(exc)) from exc
            # Waiting for room could take until results expire; the call is finished, so
            # keep what fits beside the record.
            log.warning(
                "results store full: result of %s cut to %d bytes", call_id, INLINE_RESULT_BYTES
            )
            return kept[:INLINE_RESULT_BYTES], {"truncated": True, "storageFull": True}
        return b"", {**stored, "storedIn": "objectStore"}

    async def get(self, call_id: str) -> StoredActivation | None:
        stored, _ = await self._entry(call_id)
        return stored

    async def _entry(self, call_id: str) -> tuple[StoredActivation | None, int | None]:
        """The record, and the revision of the key's last entry (a tombstone's too)."""
        try:
            msg = await self._link.nc.request(
                f"{self._direct_get}.{self.subject(call_id)}", b"", timeout=self._timeout_s
            )
        except (TimeoutError, NatsUnavailableError, nats.errors.Error) as exc:
            raise ActivationStoreError(f"reading the record failed: {exc!r}") from exc
        revision = message_sequence(msg) or None
        return decode_entry(msg), revision

    async def get_many(self, call_ids: list[str]) -> dict[str, StoredActivation]:
        """Records by call id, in one batched request (those without one are left out)."""
        if not call_ids:
            return {}
        try:
            messages = await direct_get_batch(
                self._link.nc,
                self._stream,
                {"multi_last": [self.subject(call_id) for call_id in call_ids]},
                self._timeout_s,
            )
        except (TimeoutError, NatsUnavailableError, nats.errors.Error) as exc:
            raise ActivationStoreError(f"reading records failed: {exc!r}") from exc
        records = {}
        for msg in messages:
            stored = decode_entry(msg)
            if stored is not None:
                records[str(stored.record.get("callId"))] = stored
        return records

    async def result_body(self, stored: StoredActivation) -> bytes:
        """The body the result route serves: at most activation_max_result_bytes."""
        response = stored.record.get("response") or {}
        if response.get("storedIn") != "objectStore":
            return stored.inline_body
        try:
            return await self.results.read(str(stored.record["callId"]), self._max_result_bytes)
        except ResultStoreError as exc:
            raise ActivationStoreError(f"reading the result failed: {exc}") from exc

    async def find(self, call_id: str) -> StoredActivation:
        """The record, or ActivationNotFoundError."""
        stored = await self.get(call_id)
        if stored is None:
            raise ActivationNotFoundError(call_id, self._retention_s)
        return stored

    async def wait_until_final(self, call_id: str, timeout_s: float) -> StoredActivation | None:
        """The record once finished, or its latest state when ``timeout_s`` runs out; None
        when it cannot be read.

        Watches the record's subject rather than polling: subscribe first, then read the
        current value, so an update between the two is not missed.
        """
        try:
            subscription = await self._link.nc.subscribe(self.subject(call_id))
        except (NatsUnavailableError, nats.errors.Error) as exc:
            log.info("cannot wait for %s: %s", call_id, exc, extra={"callId": call_id})
            return None
        try:
            latest = await self.get(call_id)
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
            log.info("waiting for %s ended early: %s", call_id, exc, extra={"callId": call_id})
            return None
        finally:
            try:
                await subscription.unsubscribe()
            except nats.errors.Error as exc:
                log.debug("unsubscribing: %s", exc)

    async def newest(self, query: ListQuery) -> list[bytes]:
        """Record JSON documents, newest first (see ``newest_stored``)."""
        return [stored.record_json for stored in await self.newest_stored(query)]

    async def count(self, query: ListQuery) -> int:
        """How many records match ``query`` (its limit aside), looking as far back as a
        listing does (MAX_SCANNED index entries)."""
        unbounded = ListQuery(
            function=query.function,
            status=query.status,
            limit=0,
            since_ns=query.since_ns,
            upto_ns=query.upto_ns,
            skip=query.skip,
            finished_only=query.finished_only,
        )
        return len(await self.newest_stored(unbounded))

    async def newest_stored(self, query: ListQuery) -> list[StoredActivation]:
        """Records, newest first; ``query.limit`` 0: all that match.

        Reads the index stream backwards in windows of sequence numbers (a batched direct get
        per window), then fetches the records of those call ids in one more batched get. The
        index holds one small message per accepted call in the order accepted, so the newest
        30 of 100,000 cost two or three requests; filters on function (a subject filter on the
        index), status and ``since`` (on the records) look further back, window by window.
        """
        try:
            return await self._newest(query)
        except (TimeoutError, NatsUnavailableError, nats.errors.Error) as exc:
            raise ActivationStoreError(f"listing records failed: {exc}") from exc

    async def _newest(self, query: ListQuery) -> list[StoredActivation]:
        found: list[StoredActivation] = []
        to_skip = query.skip
        windows = read_backwards(
            self._link.nc,
            self._link.js,
            self._names.index_stream,
            self._names.index_subject(query.function) if query.function else None,
            first_window=max(FIRST_WINDOW, 2 * (query.limit + query.skip)),
            largest_window=LARGEST_WINDOW,
            max_scanned=MAX_SCANNED,
            timeout_s=self._timeout_s,
        )
        async for entries in windows:
            newest_first = [msg.data.decode() for msg in entries if msg.data]
            for offset in range(0, len(newest_first), RECORDS_PER_REQUEST):
                chunk = newest_first[offset : offset + RECORDS_PER_REQUEST]
                records = await self.get_many(chunk)
                for call_id in chunk:
                    stored = records.get(call_id)
                    if stored is None:  # expired, or its record never got written
                        continue
                    accepted_ns = queued_at_ns(stored)
                    if query.since_ns is not None and accepted_ns < query.since_ns:
                        return found  # the index is in the order accepted: the rest are older
                    if query.upto_ns is not None and accepted_ns > query.upto_ns:
                        continue
                    if query.status is not None and stored.record.get("status") != query.status:
                        continue
                    if query.finished_only and not stored.is_final:
                        continue
                    if to_skip:
                        to_skip -= 1
                        continue
                    found.append(stored)
                    if len(found) == query.limit:
                        return found
        return found


def ack_sequence(ack: bytes) -> int:
    """The stream sequence a JetStream publish ack gives: the entry's new revision."""
    # A search rather than a JSON parse: two acks per call, and the ack is nothing else.
    match = _ACK_SEQUENCE.search(ack)
    return int(match.group(1)) if match else 0


_ACK_SEQUENCE = re.compile(rb'"seq":\s*(\d+)')


def decode_entry(msg: Msg) -> StoredActivation | None:
    """A direct-get answer: None for no entry (or a deleted one), else the record."""
    headers = msg.headers or {}
    if not msg.data:
        status = headers.get("Status")
        if status in (None, "404"):
            return None
        if headers.get(KV_OPERATION) in ("DEL", "PURGE"):
            return None
        raise ActivationStoreError(f"reading the record failed: status {status}")
    if headers.get(KV_OPERATION) in ("DEL", "PURGE"):
        return None
    try:
        return StoredActivation.decode(msg.data, message_sequence(msg))
    except ValueError as exc:
        log.warning("unreadable activation record on %s: %s", msg.subject, exc)
        return None
