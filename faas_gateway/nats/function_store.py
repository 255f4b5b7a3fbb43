"""Functions deployed through the management API, in a NATS key-value bucket.

One key per function (its name), one value: the OpenFaaS FunctionDeployment as deployed plus
when it was first deployed. Every gateway and worker process watches the bucket and keeps its
Registry's API functions equal to it, so a function deployed through one gateway is invokable
through all of them as soon as the change reaches them (milliseconds on one NATS server).
"""

import logging
import re
from typing import Any

import nats.errors
from nats.js.api import Header
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KV_DEL, KV_OP, KeyValue
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic.alias_generators import to_camel

from faas_gateway.core.functions import (
    MAX_INFLIGHT_ANNOTATION,
    TIMEOUT_ANNOTATIONS,
    FunctionSpec,
    Registry,
)
from faas_gateway.core.timefmt import now_rfc3339
from faas_gateway.nats.buckets import BucketWatch
from faas_gateway.nats.jetstream import WRONG_LAST_SEQUENCE_CODES, key_value
from faas_gateway.nats.link import NatsLink, NatsUnavailableError
from faas_gateway.nats.names import Names

log = logging.getLogger("faas.functions")

# Stricter than names in the functions file: no dots, because "name.namespace" selects a
# namespace in OpenFaaS URLs, and a key-value key may not have empty dot-separated tokens.
API_FUNCTION_NAME_PATTERN = re.compile(r"[a-zA-Z0-9][-a-zA-Z0-9_]{0,62}")


class FunctionStoreError(Exception):
    """A change to the deployed functions that cannot be made; the message says why."""


class FunctionExistsError(FunctionStoreError):
    pass


class FunctionNotDeployedError(FunctionStoreError):
    pass


class ConcurrentChangeError(FunctionStoreError):
    pass


class FunctionStoreUnavailableError(FunctionStoreError):
    """NATS is away, did not answer, or the bucket is full."""


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    memory: str | None = None
    cpu: str | None = None
    # faas-provider's GPU requests: kept and shown, as the other resources are.
    nvidia_gpu: str | None = Field(default=None, alias="nvidia.com/gpu")
    amd_gpu: str | None = Field(default=None, alias="amd.com/gpu")
    intel_gpu: str | None = Field(default=None, alias="intel.com/gpu")


class FunctionDeployment(BaseModel):
    """OpenFaaS's deploy/update body, with ``url`` (where the function listens) in place of
    a container to run. Fields we cannot act on (image, limits, ...) are kept and shown."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True
    )

    service: str
    url: str
    image: str = ""
    namespace: str = ""
    env_process: str = ""
    env_vars: dict[str, str] = Field(default_factory=dict)
    constraints: list[str] = Field(default_factory=list)
    secrets: list[str] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    limits: Resources | None = None
    requests: Resources | None = None
    read_only_root_filesystem: bool = False
    # Sent by older OpenFaaS clients and in examples of its docs; taken so that those requests
    # work, and dropped: registryAuth is a credential, nothing here uses either.
    network: str = Field(default="", exclude=True)
    registry_auth: str = Field(default="", exclude=True)

    @field_validator("env_vars", "constraints", "secrets", "labels", "annotations", mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any, info: ValidationInfo) -> Any:
        # Go clients encode a nil map or slice behind a pointer as null: the same as none.
        if value is None:
            return [] if info.field_name in ("constraints", "secrets") else {}
        return value

    @field_validator("service")
    @classmethod
    def _service_is_a_name(cls, service: str) -> str:
        if not API_FUNCTION_NAME_PATTERN.fullmatch(service):
            raise ValueError(f"must match {API_FUNCTION_NAME_PATTERN.pattern}")
        return service

    def to_spec(self) -> FunctionSpec:
        """What the gateway and worker act on; raises ValidationError for unusable values.

        Timeouts and max_inflight may be set as env vars, as for the OpenFaaS watchdog, or as
        annotations; an annotation wins.
        """
        from_env = {
            key: value
            for key, value in self.env_vars.items()
            if key in (*TIMEOUT_ANNOTATIONS, MAX_INFLIGHT_ANNOTATION)
        }
        return FunctionSpec(
            name=self.service, url=self.url, annotations={**from_env, **self.annotations}
        )


class StoredFunction(BaseModel):
    """The bucket's value for one function."""

    model_config = ConfigDict(
        extra="ignore", frozen=True, alias_generator=to_camel, populate_by_name=True
    )

    deployment: FunctionDeployment
    created_at: str

    def encode(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> "StoredFunction":
        return cls.model_validate_json(data)


_UNAVAILABLE = (TimeoutError, NatsUnavailableError, nats.errors.Error)


class FunctionStore:
    """Writes to the bucket. Each write is conditional on the revision it read, so two
    gateways changing one function at once cannot lose either change silently."""

    def __init__(self, link: NatsLink, names: Names) -> None:
        self._link = link
        self._names = names

    def _bucket(self) -> KeyValue:
        return key_value(self._link.js, self._names.functions_bucket)

    async def create(self, deployment: FunctionDeployment) -> tuple[int, StoredFunction]:
        try:
            return await self._create(deployment)
        except _UNAVAILABLE as exc:
            raise FunctionStoreUnavailableError(repr(exc)) from exc

    async def update(self, deployment: FunctionDeployment) -> tuple[int, StoredFunction]:
        try:
            return await self._update(deployment)
        except _UNAVAILABLE as exc:
            raise FunctionStoreUnavailableError(repr(exc)) from exc

    async def delete(self, name: str) -> int:
        try:
            return await self._delete(name)
        except _UNAVAILABLE as exc:
            raise FunctionStoreUnavailableError(repr(exc)) from exc

    async def _create(self, deployment: FunctionDeployment) -> tuple[int, StoredFunction]:
        stored = StoredFunction(deployment=deployment, created_at=now_rfc3339())
        bucket = self._bucket()
        try:
            revision = await bucket.create(deployment.service, stored.encode())
        except KeyWrongLastSequenceError as exc:
            raise FunctionExistsError(
                f"function {deployment.service!r} already exists; update it with "
                "PUT /system/functions"
            ) from exc
        return revision, stored

    async def _update(self, deployment: FunctionDeployment) -> tuple[int, StoredFunction]:
        bucket = self._bucket()
        current = await self._current(bucket, deployment.service)
        created_at = StoredFunction.decode(current.value or b"{}").created_at
        stored = StoredFunction(deployment=deployment, created_at=created_at)
        try:
            revision = await bucket.update(deployment.service, stored.encode(), current.revision)
        except KeyWrongLastSequenceError as exc:
            raise ConcurrentChangeError(
                f"function {deployment.service!r} was changed at the same time; try again"
            ) from exc
        return revision, stored

    async def _delete(self, name: str) -> int:
        """Put a delete marker, as KeyValue.delete does, but keep its revision (nats-py's
        returns True), so the watch can tell older deliveries from newer ones."""
        current = await self._current(self._bucket(), name)
        try:
            ack = await self._link.js.publish(
                self._names.function_subject(name),
                b"",
                headers={
                    KV_OP: KV_DEL,
                    Header.EXPECTED_LAST_SUBJECT_SEQUENCE: str(current.revision),
                },
            )
        except APIError as exc:
            if exc.err_code in WRONG_LAST_SEQUENCE_CODES:
                raise ConcurrentChangeError(
                    f"function {name!r} was changed at the same time; try again"
                ) from exc
            raise
        return ack.seq

    async def _current(self, bucket: KeyValue, name: str) -> KeyValue.Entry:
        try:
            entry = await bucket.get(name)
        except KeyNotFoundError as exc:  # never deployed, or deleted
            raise FunctionNotDeployedError(f"function {name!r} not found") from exc
        if entry.revision is None:
            raise FunctionNotDeployedError(f"function {name!r} not found")
        return entry


class FunctionWatch(BucketWatch[StoredFunction]):
    """Keeps a Registry's API functions equal to the bucket: a snapshot, then each change
    (faas_gateway/nats/buckets.py ``BucketWatch``). ``deployed`` holds the entries a process
    can use; one that cannot be used is logged and left out of the registry."""

    def __init__(self, registry: Registry, link: NatsLink, names: Names) -> None:
        super().__init__(link, names.functions_bucket, _decode_usable, "functions")
        self._registry = registry

    @property
    def deployed(self) -> dict[str, StoredFunction]:
        return self.entries

    def apply(self, name: str, revision: int, stored: StoredFunction | None) -> None:
        """One change to one function: deployed or updated (``stored``), or deleted (None)."""
        usable = stored if _usable_spec(name, stored) is not None else None
        super().apply(name, revision, usable)

    def _changed(self, name: str, stored: StoredFunction | None) -> None:
        if stored is None:
            self._registry.remove_api_function(name)
        else:
            self._registry.put_api_function(stored.deployment.to_spec())

    def _replaced(self) -> None:
        specs: dict[str, FunctionSpec] = {}
        for name, stored in self.entries.items():
            spec = _usable_spec(name, stored)
            if spec is not None:
                specs[name] = spec
        self._registry.replace_api_functions(specs)
        log.info("%d functions deployed through the API", len(specs))


def _decode_usable(name: str, value: bytes) -> StoredFunction | None:
    stored = _decode(name, value)
    return stored if _usable_spec(name, stored) is not None else None


def _decode(name: str, value: bytes | None) -> StoredFunction | None:
    try:
        return StoredFunction.decode(value or b"")
    except ValidationError as exc:
        log.warning("function %s: unreadable entry in the functions bucket ignored: %s", name, exc)
        return None


def _usable_spec(name: str, stored: StoredFunction | None) -> FunctionSpec | None:
    if stored is None:
        return None
    try:
        return stored.deployment.to_spec()
    except ValidationError as exc:
        log.warning("function %s: deployed entry cannot be used: %s", name, exc)
        return None
