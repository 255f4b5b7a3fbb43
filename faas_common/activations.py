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

import functools
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import nats.errors
import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, BadRequestError

from faas_common.jetstream import (
    AckedPublisher,
    PublishRejectedError,
    StreamLimits,
    ensure_key_value,
    ensure_limited_stream,
    is_storage_full,
    keep_limits,
)
from faas_common.logs import call_context
from faas_common.message import QueuedCall
from faas_common.outcome import Outcome
from faas_common.settings import CommonSettings

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
WRONG_LAST_SEQUENCE = 10071  # JetStream's error code when that expectation fails


class ActivationStoreError(RuntimeError):
    """A record could not be read or written: NATS is away or did not answer in time."""


def rfc3339_ms(unix_ns: int | None) -> str | None:
    if unix_ns is None:
        return None
    seconds, fraction_ns = divmod(unix_ns, 1_000_000_000)
    return f"{_utc_second(seconds)}.{fraction_ns // 1_000_000:03d}Z"


@functools.lru_cache(maxsize=8)
def _utc_second(unix_s: int) -> str:
    # Every record is encoded up to three times with three times in it; most share a second.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(unix_s))


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_rfc3339_ns(text: str) -> int:
    """RFC 3339 (``Z`` or an offset) to Unix nanoseconds; ValueError if it is not one."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone")
    # Integer arithmetic: a float timestamp loses the last digits of nanoseconds.
    return (moment - _EPOCH) // timedelta(microseconds=1) * 1000


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    lowered = name.lower()
    for key, value in headers:
        if key.lower() == lowered:
            return value
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
                "contentType": _header(call.headers, "content-type"),
                "bodySize": len(call.body),
            },
            callback=None
            if call.callback_url is None
            else {"url": call.callback_url, "state": "pending", "attempts": 0, "lastStatus": None},
            retry_of=call.retry_of,
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
            "bodySize": len(outcome.body),
            "truncated": False,
            **(stored or {}),
        }
        self.next_attempt_at_ns = None
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
        return {
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
        }

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

    @classmethod
    def decode(cls, value: bytes) -> "StoredActivation":
        line, _, body = value.partition(b"\n")
        record = orjson.loads(line)
        if not isinstance(record, dict):
            raise ValueError("activation record is not a JSON object")
        return cls(line, record, body)

    @property
    def is_final(self) -> bool:
        return self.record.get("status") in FINAL_STATUSES


def index_subject(settings: CommonSettings, function: str) -> str:
    return f"{settings.activation_index_stream}.{function}"


def results_bucket(settings: CommonSettings) -> str:
    return f"{settings.activation_bucket}-results"


async def ensure_activation_storage(js: JetStreamContext, settings: CommonSettings) -> None:
    """Bucket, object store and index stream, each created if missing, limits kept current.

    Records and index entries go oldest first when full (discard old), so a full store never
    stops a worker from writing an outcome. The object store refuses instead (discard new):
    evicting the oldest chunks would corrupt the objects they belong to.
    """
    retention_s = settings.activation_retention_s
    replicas = settings.nats_stream_replicas
    await ensure_key_value(
        js,
        KeyValueConfig(
            bucket=settings.activation_bucket,
            description="Activation records (faas-gateway)",
            history=1,
            ttl=retention_s,
            max_bytes=settings.activation_max_bytes,
            storage=StorageType.FILE,
            replicas=replicas,
            direct=True,
        ),
        DiscardPolicy.OLD,
        "activation_max_bytes",
    )
    results = StreamLimits(
        settings.activation_results_max_bytes,
        DiscardPolicy.NEW,
        retention_s,
        "activation_results_max_bytes",
    )
    try:
        await js.create_object_store(
            results_bucket(settings),
            ObjectStoreConfig(
                description="Large results of activations (faas-gateway)",
                ttl=retention_s,
                max_bytes=results.max_bytes,
                storage=StorageType.FILE,
                replicas=replicas,
            ),
        )
    except BadRequestError:
        await keep_limits(js, f"OBJ_{results_bucket(settings)}", results)
    except APIError as exc:
        raise results.refused(f"OBJ_{results_bucket(settings)}", exc) from exc
    await ensure_limited_stream(
        js,
        StreamConfig(
            name=settings.activation_index_stream,
            description="Activation index: one message per call, in the order accepted",
            subjects=[f"{settings.activation_index_stream}.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=replicas,
            # JetStream refuses a duplicate window longer than max_age.
            duplicate_window=min(120.0, retention_s),
            allow_direct=True,
        ),
        StreamLimits(
            settings.activation_index_max_bytes,
            DiscardPolicy.OLD,
            retention_s,
            "activation_index_max_bytes",
        ),
    )


class ActivationStore:
    """Reads and writes records; one per process, over that process's NATS connection."""

    def __init__(
        self,
        nc: NatsClient,
        js: JetStreamContext,
        acks: AckedPublisher,
        settings: CommonSettings,
    ) -> None:
        self._nc = nc
        self._js = js
        self._acks = acks
        self._settings = settings
        self._subject_prefix = f"$KV.{settings.activation_bucket}."
        self._direct_get = f"$JS.API.DIRECT.GET.KV_{settings.activation_bucket}"
        self._timeout_s = 5.0

    def subject(self, call_id: str) -> str:
        return self._subject_prefix + call_id

    async def create(self, activation: Activation) -> None:
        """Index an accepted call and record it, unless a worker has written its record already.

        The record is written only if the key is new: on a NATS cluster the worker's
        ``running`` may overtake this write, and must not be turned back into ``queued``.
        The index entry is not acked, to spare every async call a round trip; it goes out
        first on the same connection, so the record's ack follows the server taking it. Lost
        with a connection cut between the two, it costs only that call's listing entry.
        """
        try:
            await self._nc.publish(
                index_subject(self._settings, activation.function), activation.call_id.encode()
            )
            await self._acks.publish(
                self.subject(activation.call_id),
                activation.encode(),
                self._timeout_s,
                headers={EXPECTED_LAST_SUBJECT_SEQUENCE: "0"},
            )
        except PublishRejectedError as exc:
            if exc.err_code != WRONG_LAST_SEQUENCE:
                raise ActivationStoreError(f"recording the call failed: {exc!r}") from exc
            # The worker was first, which is fine.
        except (TimeoutError, nats.errors.Error) as exc:
            raise ActivationStoreError(f"recording the call failed: {exc!r}") from exc

    async def put_nowait(self, activation: Activation, body: bytes = b"") -> None:
        """Write without waiting for JetStream's ack, for writes whose loss costs little: a
        state a later write supersedes, or a detail added to a final record."""
        try:
            await self._nc.publish(self.subject(activation.call_id), activation.encode(body))
        except nats.errors.Error as exc:
            log.debug(
                "record %s not written: %s",
                activation.call_id,
                exc,
                extra=call_context(activation.call_id, activation.function),
            )

    async def put(self, activation: Activation, body: bytes | None = None) -> None:
        """Write and wait for the ack; a finished call's body goes with it."""
        payload = activation.encode(body or b"")
        try:
            await self._acks.publish(self.subject(activation.call_id), payload, self._timeout_s)
        except (TimeoutError, nats.errors.Error) as exc:
            raise ActivationStoreError(f"writing the record failed: {exc!r}") from exc

    async def put_record(self, call_id: str, record: dict[str, Any], body: bytes = b"") -> None:
        """Write a record read back and changed (a cancellation, a callback's state)."""
        payload = orjson.dumps(record) + b"\n" + body
        try:
            await self._acks.publish(self.subject(call_id), payload, self._timeout_s)
        except (TimeoutError, nats.errors.Error) as exc:
            raise ActivationStoreError(f"writing the record failed: {exc!r}") from exc

    async def store_result(self, call_id: str, body: bytes) -> tuple[bytes, dict[str, Any]]:
        """Where a response body goes: (bytes kept inline, what the record says about it)."""
        limit = self._settings.activation_max_result_bytes
        kept = body[:limit]
        stored: dict[str, Any] = {"truncated": len(kept) < len(body)}
        if len(kept) <= INLINE_RESULT_BYTES:
            return kept, stored
        try:
            store = await self._js.object_store(results_bucket(self._settings))
            await store.put(call_id, kept)
        except APIError as exc:
            if not is_storage_full(exc.err_code):
                raise ActivationStoreError(f"storing the result failed: {exc!r}") from exc
            # Waiting for room could take until results expire; the call is finished, so
            # keep what fits beside the record (nats-py removed the chunks it had sent).
            log.warning(
                "results store full: result of %s cut to %d bytes", call_id, INLINE_RESULT_BYTES
            )
            return kept[:INLINE_RESULT_BYTES], {"truncated": True, "storageFull": True}
        except (TimeoutError, nats.errors.Error) as exc:
            raise ActivationStoreError(f"storing the result failed: {exc!r}") from exc
        return b"", {**stored, "storedIn": "objectStore"}

    async def get(self, call_id: str) -> StoredActivation | None:
        try:
            msg = await self._nc.request(
                f"{self._direct_get}.{self.subject(call_id)}", b"", timeout=self._timeout_s
            )
        except (TimeoutError, nats.errors.Error) as exc:
            raise ActivationStoreError(f"reading the record failed: {exc!r}") from exc
        return decode_entry(msg)

    async def result_body(self, stored: StoredActivation) -> bytes:
        response = stored.record.get("response") or {}
        if response.get("storedIn") != "objectStore":
            return stored.inline_body
        try:
            store = await self._js.object_store(results_bucket(self._settings))
            result = await store.get(str(stored.record["callId"]))
        except (TimeoutError, nats.errors.Error) as exc:
            raise ActivationStoreError(f"reading the result failed: {exc!r}") from exc
        return result.data or b""


def decode_entry(msg: Msg) -> StoredActivation | None:
    """A direct-get answer: None for no entry (or a deleted one), else the record."""
    headers = msg.headers or {}
    if not msg.data:
        status = headers.get("Status")
        if status in (None, "404"):
            return None
        raise ActivationStoreError(f"reading the record failed: status {status}")
    if headers.get("KV-Operation") in ("DEL", "PURGE"):
        return None
    try:
        return StoredActivation.decode(msg.data)
    except ValueError as exc:
        log.warning("unreadable activation record on %s: %s", msg.subject, exc)
        return None
