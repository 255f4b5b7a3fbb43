"""Every stream, bucket and object store, created if missing and kept to its limits.

One place for all of them, run by both processes at start (whichever comes first creates them)
and again after a reconnect (a server restarted on an empty store has lost them). What each
looks like is a value, ``Plan``, derived once from the settings; ``ensure_all`` makes NATS
match it. Nothing else in the project creates or changes a stream.
"""

import logging
from dataclasses import dataclass
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
)
from nats.js.errors import APIError, BadRequestError, NotFoundError

from faas_gateway.nats.jetstream import STORAGE_RESOURCES_EXCEEDED
from faas_gateway.nats.names import Names
from faas_gateway.runtime.settings import CommonSettings

log = logging.getLogger("faas.nats")


class StreamConfigConflictError(RuntimeError):
    """The stream exists with settings we cannot use; starting anyway would lose or mix work."""


class StorageLimitError(StreamConfigConflictError):
    """NATS cannot set aside the bytes a size limit asks for; waiting cannot fix that."""


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """What a stream may hold, kept current at every start, on streams that older versions
    made without limits too. ``setting`` names the size setting, for error messages."""

    max_bytes: int
    discard: DiscardPolicy
    max_age_s: float
    setting: str

    def changes(self, config: StreamConfig) -> dict[str, Any]:
        """The fields of ``config`` that differ from these limits, for StreamConfig.evolve."""
        changes: dict[str, Any] = {}
        if config.max_bytes != self.max_bytes:
            changes["max_bytes"] = self.max_bytes
        if config.discard != self.discard:
            changes["discard"] = self.discard
        if abs((config.max_age or 0) - self.max_age_s) > 1e-3:
            changes["max_age"] = self.max_age_s
        return changes

    def apply(self, config: StreamConfig) -> StreamConfig:
        return config.evolve(max_bytes=self.max_bytes, discard=self.discard, max_age=self.max_age_s)

    def refused(self, stream: str, exc: APIError) -> Exception:
        """StorageLimitError when the server cannot reserve max_bytes; else ``exc``."""
        if exc.err_code != STORAGE_RESOURCES_EXCEEDED:
            return exc
        return StorageLimitError(
            f"NATS cannot set aside {self.max_bytes} bytes for stream {stream!r} "
            f"({self.setting}): its JetStream storage (max_file_store) is smaller than the "
            f"limits of all its streams together. Lower {self.setting} or give NATS more storage."
        )


async def keep_limits(
    js: JetStreamContext,
    stream: str,
    limits: StreamLimits,
    info: StreamInfo | None = None,
    **also: Any,
) -> None:
    """Bring an existing stream's size limit, discard policy and max_age to ``limits`` (and
    the fields in ``also`` to theirs), in one update.

    Lowering max_bytes below what a discard-new stream holds drops nothing (checked on
    nats-server 2.15): it refuses new messages until it is under the limit again.
    """
    if info is None:
        info = await js.stream_info(stream)
    changes = limits.changes(info.config)
    for key, value in also.items():
        if getattr(info.config, key) != value:
            changes[key] = value
    if not changes:
        return
    log.info(
        "stream %s: %s",
        stream,
        ", ".join(
            f"{key} {_value(getattr(info.config, key))} -> {_value(value)}"
            for key, value in changes.items()
        ),
    )
    try:
        await js.update_stream(info.config.evolve(**changes))
    except APIError as exc:
        raise limits.refused(stream, exc) from exc


async def ensure_limited_stream(
    js: JetStreamContext, config: StreamConfig, limits: StreamLimits
) -> None:
    """Create the stream with ``config`` and ``limits`` if it is missing; one that exists is
    used as it is, except that its limits are kept current."""
    assert config.name is not None
    try:
        info = await js.stream_info(config.name)
    except NotFoundError:
        try:
            await js.add_stream(limits.apply(config))
            return
        except BadRequestError:
            info = await js.stream_info(config.name)  # another process made it first
        except APIError as exc:
            raise limits.refused(config.name, exc) from exc
    await keep_limits(js, config.name, limits, info)


@dataclass(frozen=True, slots=True)
class Plan:
    """What every stream, bucket and object store should look like, and the limits kept."""

    names: Names
    queue: StreamConfig
    queue_limits: StreamLimits
    records: KeyValueConfig
    records_limits: StreamLimits
    results: ObjectStoreConfig
    results_limits: StreamLimits
    index: StreamConfig
    index_limits: StreamLimits
    dead_letters: StreamConfig
    dead_letters_limits: StreamLimits
    cancellations: KeyValueConfig
    cancellations_limits: StreamLimits
    functions: KeyValueConfig
    functions_limits: StreamLimits
    events: tuple[KeyValueConfig, ...]  # triggers, rules, built-in feeds
    events_limits: StreamLimits
    fires: StreamConfig
    fires_limits: StreamLimits

    @classmethod
    def of(cls, settings: CommonSettings) -> "Plan":
        names = Names.of(settings)
        replicas = settings.nats_stream_replicas
        retention_s = settings.activation_retention_s
        letters_s = settings.dead_letter_retention_s
        # JetStream refuses a duplicate window longer than max_age.
        window_s = settings.duplicate_window_s
        if settings.async_retention_s > 0:
            window_s = min(window_s, settings.async_retention_s)
        return cls(
            names=names,
            queue=StreamConfig(
                name=names.stream,
                description="Async function calls (faas-gateway)",
                subjects=[names.subjects],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
                num_replicas=replicas,
                duplicate_window=window_s,
            ),
            # Discard new: a full queue refuses the next call (503) rather than drop an
            # accepted one.
            queue_limits=StreamLimits(
                settings.async_queue_max_bytes,
                DiscardPolicy.NEW,
                settings.async_retention_s,
                "async_queue_max_bytes",
            ),
            records=KeyValueConfig(
                bucket=names.activation_bucket,
                description="Activation records (faas-gateway)",
                history=1,
                ttl=retention_s,
                max_bytes=settings.activation_max_bytes,
                storage=StorageType.FILE,
                replicas=replicas,
                direct=True,
            ),
            # Discard old: a full store never stops a worker from writing an outcome.
            records_limits=StreamLimits(
                settings.activation_max_bytes,
                DiscardPolicy.OLD,
                retention_s,
                "activation_max_bytes",
            ),
            results=ObjectStoreConfig(
                description="Large results of activations (faas-gateway)",
                ttl=retention_s,
                max_bytes=settings.activation_results_max_bytes,
                storage=StorageType.FILE,
                replicas=replicas,
            ),
            # Discard new: evicting the oldest chunks would corrupt the objects they belong to.
            results_limits=StreamLimits(
                settings.activation_results_max_bytes,
                DiscardPolicy.NEW,
                retention_s,
                "activation_results_max_bytes",
            ),
            index=StreamConfig(
                name=names.index_stream,
                description="Activation index: one message per call, in the order accepted",
                subjects=[names.index_subjects],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                num_replicas=replicas,
                duplicate_window=min(120.0, retention_s),
                allow_direct=True,
            ),
            index_limits=StreamLimits(
                settings.activation_index_max_bytes,
                DiscardPolicy.OLD,
                retention_s,
                "activation_index_max_bytes",
            ),
            dead_letters=StreamConfig(
                name=names.dead_letter_stream,
                description="Requests of async calls that failed for good (faas-gateway)",
                subjects=[names.dead_letter_subjects],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                num_replicas=replicas,
                duplicate_window=min(120.0, letters_s),
                allow_direct=True,
            ),
            # Discard old: when full the oldest letters go, so a failing call can always be
            # finished; refusing its letter would keep it in the queue, retried without end.
            dead_letters_limits=StreamLimits(
                settings.dead_letter_max_bytes,
                DiscardPolicy.OLD,
                letters_s,
                "dead_letter_max_bytes",
            ),
            cancellations=KeyValueConfig(
                bucket=names.cancellation_bucket,
                description="Cancelled async calls (faas-gateway)",
                history=1,
                ttl=retention_s,
                max_bytes=settings.cancellation_max_bytes,
                storage=StorageType.FILE,
                replicas=replicas,
            ),
            # Discard new: a cancel refused (503) is better than an older one forgotten
            # early, which would let that call run.
            cancellations_limits=StreamLimits(
                settings.cancellation_max_bytes,
                DiscardPolicy.NEW,
                retention_s,
                "cancellation_max_bytes",
            ),
            functions=KeyValueConfig(
                bucket=names.functions_bucket,
                description="Functions deployed through /system/functions (faas-gateway)",
                history=1,
                max_bytes=settings.functions_max_bytes,
                storage=StorageType.FILE,
                replicas=replicas,
            ),
            # A deploy refused, never a deployed function dropped.
            functions_limits=StreamLimits(
                settings.functions_max_bytes, DiscardPolicy.NEW, 0.0, "functions_max_bytes"
            ),
            events=tuple(
                KeyValueConfig(
                    bucket=bucket,
                    description=description,
                    history=1,
                    max_bytes=settings.events_max_bytes,
                    storage=StorageType.FILE,
                    replicas=replicas,
                )
                for bucket, description in (
                    (names.triggers_bucket, "OpenWhisk triggers (faas-gateway)"),
                    (names.rules_bucket, "OpenWhisk rules (faas-gateway)"),
                    (names.feeds_bucket, "Built-in feeds: alarms, NATS subjects (faas-gateway)"),
                )
            ),
            # As the functions: a change refused, never an entity dropped.
            events_limits=StreamLimits(
                settings.events_max_bytes, DiscardPolicy.NEW, 0.0, "events_max_bytes"
            ),
            # The duplicate window is what keeps one fire per alarm tick when several gateways
            # publish it (Nats-Msg-Id alarm-<trigger>-<tick>): the queue's, far longer than a
            # scheduler is ever late.
            fires=StreamConfig(
                name=names.fire_stream,
                description="Accepted trigger fires and connector events (faas-gateway)",
                subjects=[names.fire_subjects],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
                num_replicas=replicas,
                duplicate_window=window_s,
            ),
            # Discard new, as the queue: a fire refused (503), never an accepted one dropped.
            fires_limits=StreamLimits(
                settings.fire_max_bytes,
                DiscardPolicy.NEW,
                settings.async_retention_s,
                "fire_max_bytes",
            ),
        )


async def ensure_all(js: JetStreamContext, plan: Plan) -> None:
    """Create what is missing and keep the limits of what exists; StreamConfigConflictError
    (waiting cannot fix it) when the queue exists with another kind of config."""
    await ensure_queue(js, plan.queue, plan.queue_limits)
    await ensure_key_value(js, plan.records, plan.records_limits)
    await ensure_object_store(js, plan.names.results_bucket, plan.results, plan.results_limits)
    await ensure_limited_stream(js, plan.index, plan.index_limits)
    await ensure_limited_stream(js, plan.dead_letters, plan.dead_letters_limits)
    await ensure_key_value(js, plan.cancellations, plan.cancellations_limits)
    await ensure_key_value(js, plan.functions, plan.functions_limits)
    for bucket in plan.events:
        await ensure_key_value(js, bucket, plan.events_limits)
    await ensure_queue(js, plan.fires, plan.fires_limits, "fire_stream")


async def ensure_key_value(
    js: JetStreamContext, config: KeyValueConfig, limits: StreamLimits
) -> None:
    """The bucket, created with ``config`` if missing; one that exists is used as it is
    (perhaps with another description: nothing of ours depends on that), except that its
    size limit, discard policy and TTL are kept current. nats-py creates buckets with
    discard new; another policy is set after."""
    stream = f"KV_{config.bucket}"
    try:
        await js.create_key_value(config)
        created = True
    except BadRequestError:
        created = False
    except APIError as exc:
        raise limits.refused(stream, exc) from exc
    if not created or limits.discard != DiscardPolicy.NEW:
        await keep_limits(js, stream, limits)


async def ensure_object_store(
    js: JetStreamContext, bucket: str, config: ObjectStoreConfig, limits: StreamLimits
) -> None:
    stream = f"OBJ_{bucket}"
    try:
        await js.create_object_store(bucket, config)
    except BadRequestError:
        await keep_limits(js, stream, limits)
    except APIError as exc:
        raise limits.refused(stream, exc) from exc


async def ensure_queue(
    js: JetStreamContext,
    desired: StreamConfig,
    limits: StreamLimits,
    name_setting: str = "nats_stream",
) -> None:
    """Create the queue (or another work-queue stream, named by ``name_setting``) if it is
    missing; refuse to run against one that differs in kind; keep its limits and duplicate
    window current."""
    name = desired.name
    assert name is not None
    desired = limits.apply(desired)
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        try:
            await js.add_stream(desired)
            log.info("created stream %s on %s", desired.name, desired.subjects)
            return
        except BadRequestError:
            # Another process created it between our two requests; check what it made.
            info = await js.stream_info(name)
        except APIError as exc:
            raise limits.refused(name, exc) from exc

    existing = info.config
    conflicts = []
    if existing.retention != desired.retention:
        conflicts.append(f"retention is {_value(existing.retention)}, expected workqueue")
    if existing.storage != desired.storage:
        conflicts.append(f"storage is {_value(existing.storage)}, expected file")
    if sorted(existing.subjects or []) != sorted(desired.subjects or []):
        conflicts.append(f"subjects are {existing.subjects}, expected {desired.subjects}")
    if conflicts:
        raise StreamConfigConflictError(
            f"NATS stream {name!r} exists with a conflicting config: "
            + "; ".join(conflicts)
            + f". Delete it (nats stream rm) or set {name_setting} to another name."
        )
    # One update with the limits: a window longer than max_age is refused in between.
    window_s = desired.duplicate_window or 0
    if abs((existing.duplicate_window or 0) - window_s) > 1e-3:
        await keep_limits(js, name, limits, info, duplicate_window=window_s)
    else:
        await keep_limits(js, name, limits, info)


def _value(enum_or_none: Any) -> str:
    return str(getattr(enum_or_none, "value", enum_or_none))
