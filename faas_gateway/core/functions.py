"""The function registry: which functions exist, where they listen and their timeouts.

Two sources, merged: a YAML functions file read at start (local to each process, read-only
through the API) and the functions deployed through the management API, which live in a NATS
key-value bucket that every gateway and worker watches (faas_gateway/function_store.py)::

    functions:
      echo:
        url: http://127.0.0.1:9001
        exec_timeout: 30s
        annotations:
          team: demo
"""

import re
from collections.abc import Callable, Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from yarl import URL

from faas_gateway.core.feeds import FeedError, parse_cron
from faas_gateway.core.retry import InvalidRetryPolicyError, RetryPolicy
from faas_gateway.core.timefmt import parse_duration_s
from faas_gateway.core.validation import one_line

# Only to check a function's retry annotations when it is registered; the worker applies them
# over its own settings.
_ANY_RETRY_POLICY = RetryPolicy(1, frozenset(), 1.0, 1.0)

FUNCTION_NAME_PATTERN = re.compile(r"[a-zA-Z0-9][-a-zA-Z0-9_.]{0,62}")

OptionalSeconds = Annotated[
    float | None, BeforeValidator(lambda v: v if v is None else parse_duration_s(v))
]


def is_valid_function_name(name: str) -> bool:
    return FUNCTION_NAME_PATTERN.fullmatch(name) is not None


class FunctionsFileError(Exception):
    """The functions file cannot be used; the message names the file, the entry and the problem."""


QUEUE_ANNOTATION = "com.openfaas.queue"
# OpenFaaS's connectors: topic names the NATS subjects a function is invoked for, or
# cron-function, which runs it on its schedule (gateway/events/).
TOPIC_ANNOTATION = "topic"
SCHEDULE_ANNOTATION = "schedule"
CRON_TOPIC = "cron-function"
MAX_INFLIGHT_ANNOTATION = "max_inflight"
DEFAULT_QUEUE = "default"
QUEUE_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
# As the OpenFaaS watchdog's env vars of the same names; an annotation sets them per function.
TIMEOUT_ANNOTATIONS = ("read_timeout", "write_timeout", "exec_timeout")
DEFAULT_NAMESPACE = "openfaas-fn"


class FunctionSpec(BaseModel):
    """One function: an HTTP service and the limits that apply when calling it."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    name: str
    url: str
    read_timeout_s: OptionalSeconds = Field(default=None, alias="read_timeout")
    write_timeout_s: OptionalSeconds = Field(default=None, alias="write_timeout")
    exec_timeout_s: OptionalSeconds = Field(default=None, alias="exec_timeout")
    annotations: dict[str, str] = Field(default_factory=dict)

    @cached_property
    def queue(self) -> str:
        """The queue its async calls go to: annotation com.openfaas.queue, else "default"."""
        return self.annotations.get(QUEUE_ANNOTATION, DEFAULT_QUEUE)

    @cached_property  # read on every call; the spec is frozen
    def max_inflight(self) -> int | None:
        """Most calls of this function one worker runs at once (annotation max_inflight)."""
        value = self.annotations.get(MAX_INFLIGHT_ANNOTATION)
        return int(value) if value is not None else None

    @model_validator(mode="before")
    @classmethod
    def _timeouts_from_annotations(cls, data: Any) -> Any:
        """A timeout given as an annotation applies unless the entry sets it itself."""
        if not isinstance(data, Mapping) or not isinstance(data.get("annotations"), Mapping):
            return data
        annotations = data["annotations"]
        merged = dict(data)
        for key in TIMEOUT_ANNOTATIONS:
            if key in annotations and key not in data and f"{key}_s" not in data:
                merged[key] = annotations[key]
        return merged

    def url_for(self, raw_path: str, raw_query: str) -> URL:
        """Where a call for ``raw_path`` ('' or '/...', percent-encoded) goes upstream."""
        target = self.url + raw_path
        if raw_query:
            target += "?" + raw_query
        return URL(target, encoded=True)

    @field_validator("name")
    @classmethod
    def _name_is_valid(cls, name: str) -> str:
        if not is_valid_function_name(name):
            raise ValueError(f"must match {FUNCTION_NAME_PATTERN.pattern}")
        return name

    @field_validator("url")
    @classmethod
    def _url_is_absolute_http(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an absolute http:// or https:// URL")
        return url.rstrip("/")

    @field_validator("annotations", mode="before")
    @classmethod
    def _annotations_as_text(cls, annotations: object) -> object:
        if isinstance(annotations, Mapping):
            return {str(key): str(value) for key, value in annotations.items()}
        return annotations

    @field_validator("annotations")
    @classmethod
    def _queue_and_limit_are_valid(cls, annotations: dict[str, str]) -> dict[str, str]:
        queue = annotations.get(QUEUE_ANNOTATION)
        if queue is not None and not QUEUE_NAME_PATTERN.fullmatch(queue):
            raise ValueError(f"{QUEUE_ANNOTATION} must match {QUEUE_NAME_PATTERN.pattern}")
        limit = annotations.get(MAX_INFLIGHT_ANNOTATION)
        if limit is not None and (not limit.isdigit() or int(limit) < 1):
            raise ValueError(f"{MAX_INFLIGHT_ANNOTATION} must be a whole number of at least 1")
        try:
            _ANY_RETRY_POLICY.overridden_by(annotations)
        except InvalidRetryPolicyError as exc:
            raise ValueError(f"retry annotations: {exc}") from exc
        topics = (topic.strip() for topic in annotations.get(TOPIC_ANNOTATION, "").split(","))
        if CRON_TOPIC in topics:
            # OpenFaaS's cron-connector convention: refused at deploy, not found at the tick.
            try:
                parse_cron(annotations.get(SCHEDULE_ANNOTATION))
            except FeedError as exc:
                raise ValueError(f"{SCHEDULE_ANNOTATION} (topic {CRON_TOPIC}): {exc}") from exc
        return annotations


class Registry:
    """Functions by name, from the functions file and from the API. Looked up on every call.

    A function in the file wins over an API entry of the same name: the file is this process's
    own configuration, and the API refuses to change or delete file functions.
    """

    def __init__(
        self,
        functions: Mapping[str, FunctionSpec] | None = None,
        namespace: str = DEFAULT_NAMESPACE,
    ) -> None:
        self._file: dict[str, FunctionSpec] = dict(functions or {})
        self._api: dict[str, FunctionSpec] = {}
        self._functions: dict[str, FunctionSpec] = dict(self._file)
        self.namespace = namespace
        self._namespace_suffix = "." + namespace
        self._listeners: list[Callable[[], None]] = []

    def get(self, name: str) -> FunctionSpec | None:
        function = self._functions.get(name)
        if function is None and name.endswith(self._namespace_suffix):
            # OpenFaaS's name.namespace form; there is one namespace.
            function = self._functions.get(name[: -len(self._namespace_suffix)])
        return function

    def in_file(self, name: str) -> bool:
        return name in self._file

    def __contains__(self, name: object) -> bool:
        return name in self._functions

    def __iter__(self) -> Iterator[FunctionSpec]:
        return iter(list(self._functions.values()))

    def __len__(self) -> int:
        return len(self._functions)

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def replace_api_functions(self, functions: Mapping[str, FunctionSpec]) -> None:
        """All API functions at once: the state of the bucket when a watch (re)starts."""
        self._api = dict(functions)
        self._merge()

    def put_api_function(self, function: FunctionSpec) -> None:
        self._api[function.name] = function
        self._merge()

    def remove_api_function(self, name: str) -> None:
        if self._api.pop(name, None) is not None:
            self._merge()

    def _merge(self) -> None:
        # A new dict swapped in whole: lookups never see a half-applied change.
        self._functions = {**self._api, **self._file}
        for listener in self._listeners:
            listener()


def load_functions_file(path: Path, namespace: str = DEFAULT_NAMESPACE) -> Registry:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise FunctionsFileError(f"{path}: cannot read the functions file: {exc.strerror}") from exc
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise FunctionsFileError(f"{path}: not valid YAML: {exc}") from exc
    return parse_functions_document(document, source=str(path), namespace=namespace)


def parse_functions_document(
    document: Any, source: str, namespace: str = DEFAULT_NAMESPACE
) -> Registry:
    if document is None:
        document = {"functions": {}}
    if not isinstance(document, Mapping) or "functions" not in document:
        raise FunctionsFileError(f"{source}: expected a top-level 'functions:' mapping")
    unknown_keys = sorted(str(key) for key in document if key != "functions")
    if unknown_keys:
        raise FunctionsFileError(
            f"{source}: unknown top-level keys {unknown_keys}; only 'functions' is allowed"
        )
    entries = document["functions"] or {}
    if not isinstance(entries, Mapping):
        raise FunctionsFileError(f"{source}: 'functions' must be a mapping of name to settings")
    functions: dict[str, FunctionSpec] = {}
    for raw_name, entry in entries.items():
        name = str(raw_name)
        if not isinstance(entry, Mapping):
            raise FunctionsFileError(
                f"{source}: function {name!r}: expected a mapping with at least 'url'"
            )
        try:
            functions[name] = FunctionSpec.model_validate({**entry, "name": name})
        except ValidationError as exc:
            raise FunctionsFileError(f"{source}: function {name!r}: {_describe(exc)}") from exc
    return Registry(functions, namespace)


def _describe(error: ValidationError) -> str:
    return one_line(
        error,
        unknown_key=(
            "unknown key (allowed: url, read_timeout, write_timeout, exec_timeout, annotations)"
        ),
        whole="entry",
    )
