"""OpenWhisk's event entities, pure: triggers and rules as stored and as the API shows them,
their names and references, what a fire carries, and the ids that make each fire and each
rule's invocation one call however often it is handled.

The gateway's handlers (gateway/handlers/triggers.py) parse requests with these, the stores
(faas_gateway/nats/events.py) keep the ``to_json`` forms, and the fan-out
(gateway/events/fanout.py) turns a ``Fire`` into queued calls. docs/events.md has the whole.
"""

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from faas_gateway.core.openwhisk import action_name, action_namespace, function_name

ACTIVE = "active"
INACTIVE = "inactive"
STATUSES = (ACTIVE, INACTIVE)
FIRST_VERSION = "0.0.1"
FEED_ANNOTATION = "feed"
# Annotation values kept per entity, at most: an entity is one key-value entry, and a
# client's runaway list should be a 400, not a full bucket.
MAX_ENTITY_BYTES = 64 * 1024

# Trigger and rule names: OpenWhisk's, less spaces and @, which a key-value key cannot hold;
# a dot only between other characters (a key's tokens may not be empty).
ENTITY_NAME_PATTERN = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]|\.(?=[A-Za-z0-9_-])){0,255}")
ENTITY_NAME_RULE = (
    "1 to 256 characters from A-Z a-z 0-9 _ - ., starting with a letter, digit or _, "
    "with a dot only between two other characters"
)

# What a fire came from (Fire.source): OpenWhisk's trigger fires, then OpenFaaS's connectors.
SOURCE_API = "api"
SOURCE_ALARM = "alarm"
SOURCE_SUBJECT = "subject"
SOURCE_CRON = "cron"
SOURCE_TOPIC = "topic"

# OpenWhisk's activation status numbers, as a trigger's log lines give them per rule.
STATUS_SUCCESS = 0
STATUS_APPLICATION_ERROR = 1
STATUS_WHISK_ERROR = 3


class InvalidEntityError(ValueError):
    """A trigger or rule as sent cannot be taken; the message says why (a 400)."""


def is_valid_entity_name(name: str) -> bool:
    return ENTITY_NAME_PATTERN.fullmatch(name) is not None


def check_entity_name(name: str, kind: str) -> str:
    if not is_valid_entity_name(name):
        raise InvalidEntityError(f"invalid {kind} name {name[:300]!r}: {ENTITY_NAME_RULE}")
    return name


def next_version(version: str) -> str:
    """OpenWhisk's update: the patch number goes up by one."""
    parts = version.split(".")
    if len(parts) == 3 and all(part.isdigit() for part in parts):
        return f"{parts[0]}.{parts[1]}.{int(parts[2]) + 1}"
    return FIRST_VERSION


def key_values(value: Any, field: str) -> list[dict[str, Any]]:
    """OpenWhisk's ``[{"key": ..., "value": ...}]``, checked: keys are strings, each once."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidEntityError(f"{field} must be a list of {{key, value}}")
    pairs: list[dict[str, Any]] = []
    seen: set[str] = set()
    for entry in value:
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
            raise InvalidEntityError(f"{field} must be a list of {{key, value}}")
        key = entry["key"]
        if key in seen:
            raise InvalidEntityError(f"{field} names {key!r} twice")
        seen.add(key)
        pairs.append({"key": key, "value": entry.get("value")})
    return pairs


def as_dict(pairs: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    return {str(pair["key"]): pair.get("value") for pair in pairs}


def _publish(value: Any) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidEntityError("publish must be true or false")
    return value


def _limits(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidEntityError("limits must be a JSON object")
    return value


def _fits(document: dict[str, Any], kind: str) -> dict[str, Any]:
    size = len(orjson.dumps(document))
    if size > MAX_ENTITY_BYTES:
        raise InvalidEntityError(f"the {kind} is {size} bytes; at most {MAX_ENTITY_BYTES}")
    return document


# triggers


@dataclass(frozen=True, slots=True)
class Trigger:
    name: str
    parameters: tuple[dict[str, Any], ...]
    annotations: tuple[dict[str, Any], ...]
    limits: dict[str, Any]
    publish: bool
    version: str
    updated_ms: int

    @property
    def feed(self) -> str | None:
        """The feed action named by the annotation ``feed`` (as wsk --feed sets it)."""
        value = as_dict(self.annotations).get(FEED_ANNOTATION)
        return value if isinstance(value, str) and value else None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "parameters": list(self.parameters),
            "annotations": list(self.annotations),
            "limits": self.limits,
            "publish": self.publish,
            "version": self.version,
            "updated": self.updated_ms,
        }

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> "Trigger":
        return cls(
            name=str(document["name"]),
            parameters=tuple(key_values(document.get("parameters"), "parameters")),
            annotations=tuple(key_values(document.get("annotations"), "annotations")),
            limits=_limits(document.get("limits")),
            publish=bool(document.get("publish")),
            version=str(document.get("version") or FIRST_VERSION),
            updated_ms=int(document.get("updated") or 0),
        )


@dataclass(frozen=True, slots=True)
class TriggerPut:
    """What a trigger PUT may hold; None for what it left out (an update keeps that)."""

    parameters: tuple[dict[str, Any], ...] | None
    annotations: tuple[dict[str, Any], ...] | None
    limits: dict[str, Any] | None
    publish: bool | None

    @classmethod
    def parse(cls, document: Any) -> "TriggerPut":
        if not isinstance(document, dict):
            raise InvalidEntityError("the trigger must be a JSON object")
        parameters = document.get("parameters")
        annotations = document.get("annotations")
        put = cls(
            parameters=None if parameters is None else tuple(key_values(parameters, "parameters")),
            annotations=None
            if annotations is None
            else tuple(key_values(annotations, "annotations")),
            limits=None if document.get("limits") is None else _limits(document["limits"]),
            publish=None if document.get("publish") is None else _publish(document["publish"]),
        )
        feed = as_dict(put.annotations or ()).get(FEED_ANNOTATION)
        if feed is not None and (not isinstance(feed, str) or not feed):
            raise InvalidEntityError("the annotation feed must name a feed action")
        return put

    def made(self, name: str, now_ms: int, before: Trigger | None) -> Trigger:
        """The trigger this PUT makes: a new one at version 0.0.1, or ``before`` updated."""
        trigger = Trigger(
            name=name,
            parameters=self.parameters
            if self.parameters is not None
            else (before.parameters if before else ()),
            annotations=self.annotations
            if self.annotations is not None
            else (before.annotations if before else ()),
            limits=self.limits if self.limits is not None else (before.limits if before else {}),
            publish=self.publish
            if self.publish is not None
            else (before.publish if before else False),
            version=next_version(before.version) if before else FIRST_VERSION,
            updated_ms=now_ms,
        )
        _fits(trigger.to_json(), "trigger")
        return trigger


def trigger_document(
    trigger: Trigger, namespace: str, rules: Iterable["Rule"] = ()
) -> dict[str, Any]:
    """OpenWhisk's trigger: its ``rules`` map (``ns/rule`` to action and status) when any
    rule names it."""
    document: dict[str, Any] = {
        "namespace": namespace,
        "name": trigger.name,
        "version": trigger.version,
        "publish": trigger.publish,
        "annotations": list(trigger.annotations),
        "parameters": list(trigger.parameters),
        "limits": trigger.limits,
        "updated": trigger.updated_ms,
    }
    linked = {
        f"{namespace}/{rule.name}": {
            "action": action_reference(namespace, rule.action),
            "status": rule.status,
        }
        for rule in rules
    }
    if linked:
        document["rules"] = linked
    return document


# rules


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    trigger: str  # the trigger's name
    action: str  # the action's function name (pkg__name for an action of a package)
    status: str
    annotations: tuple[dict[str, Any], ...]
    publish: bool
    version: str
    updated_ms: int

    @property
    def active(self) -> bool:
        return self.status == ACTIVE

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "trigger": self.trigger,
            "action": self.action,
            "status": self.status,
            "annotations": list(self.annotations),
            "publish": self.publish,
            "version": self.version,
            "updated": self.updated_ms,
        }

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> "Rule":
        status = str(document.get("status") or ACTIVE)
        return cls(
            name=str(document["name"]),
            trigger=str(document["trigger"]),
            action=str(document["action"]),
            status=status if status in STATUSES else INACTIVE,
            annotations=tuple(key_values(document.get("annotations"), "annotations")),
            publish=bool(document.get("publish")),
            version=str(document.get("version") or FIRST_VERSION),
            updated_ms=int(document.get("updated") or 0),
        )

    def with_status(self, status: str, now_ms: int) -> "Rule":
        return Rule(
            self.name,
            self.trigger,
            self.action,
            status,
            self.annotations,
            self.publish,
            self.version,
            now_ms,
        )


@dataclass(frozen=True, slots=True)
class RulePut:
    """A rule PUT: the trigger (its name) and the action (its function name), as the body
    names them (``/ns/t``, ``/_/t``, ``t``; ``/ns/pkg/a``, ``pkg/a``, ``a``)."""

    trigger: str
    action: str
    annotations: tuple[dict[str, Any], ...] | None
    publish: bool | None

    @classmethod
    def parse(cls, document: Any, namespace: str) -> "RulePut":
        if not isinstance(document, dict):
            raise InvalidEntityError("the rule must be a JSON object")
        trigger_package, trigger = entity_reference(document.get("trigger"), namespace, "trigger")
        if trigger_package is not None:
            raise InvalidEntityError(f"a trigger has no package: {document.get('trigger')!r}")
        package, action = entity_reference(document.get("action"), namespace, "action")
        annotations = document.get("annotations")
        return cls(
            trigger=trigger,
            action=function_name(package, action),
            annotations=None
            if annotations is None
            else tuple(key_values(annotations, "annotations")),
            publish=None if document.get("publish") is None else _publish(document["publish"]),
        )

    def made(self, name: str, now_ms: int, before: Rule | None) -> Rule:
        """A new rule is active (as OpenWhisk's); an update keeps the status it had."""
        rule = Rule(
            name=name,
            trigger=self.trigger,
            action=self.action,
            status=before.status if before else ACTIVE,
            annotations=self.annotations
            if self.annotations is not None
            else (before.annotations if before else ()),
            publish=self.publish
            if self.publish is not None
            else (before.publish if before else False),
            version=next_version(before.version) if before else FIRST_VERSION,
            updated_ms=now_ms,
        )
        _fits(rule.to_json(), "rule")
        return rule


def entity_reference(value: Any, namespace: str, kind: str) -> tuple[str | None, str]:
    """(package, name) of a reference to an entity of this namespace: ``/ns/[pkg/]name``
    with ns ``_`` or the namespace's name, or ``[pkg/]name``."""
    if not isinstance(value, str) or not value:
        raise InvalidEntityError(f"the rule's {kind} must be a name, like /_/{kind}-name")
    parts = value.split("/")
    if value.startswith("/"):
        if len(parts) not in (3, 4) or parts[1] not in ("_", namespace):
            raise InvalidEntityError(f"{kind} {value[:300]} does not exist")
        parts = parts[2:]
    if len(parts) not in (1, 2):
        raise InvalidEntityError(f"invalid {kind} name {value[:300]!r}")
    for part in parts:
        check_entity_name(part, kind)
    return (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])


def action_reference(namespace: str, function: str) -> dict[str, str]:
    """A rule's ``action``: ``{"path", "name"}``, the path with the package when it has one."""
    return {"path": action_namespace(namespace, function), "name": action_name(function)[1]}


def rule_document(rule: Rule, namespace: str, status: str | None = None) -> dict[str, Any]:
    return {
        "namespace": namespace,
        "name": rule.name,
        "version": rule.version,
        "publish": rule.publish,
        "annotations": list(rule.annotations),
        "status": status or rule.status,
        "trigger": {"path": namespace, "name": rule.trigger},
        "action": action_reference(namespace, rule.action),
        "updated": rule.updated_ms,
    }


# fires


def fire_arguments(
    parameters: Iterable[Mapping[str, Any]],
    payload: Mapping[str, Any],
    headers: Mapping[str, str] | None,
) -> dict[str, Any]:
    """The parameters a fire's actions get, as OpenWhisk merges them: the trigger's
    parameters, overridden by ``__ow_headers`` (the fire request's headers, when it came
    over HTTP) and the payload."""
    arguments = as_dict(parameters)
    if headers is not None:
        arguments["__ow_headers"] = dict(headers)
    arguments.update(payload)
    return arguments


def derived_id(*parts: str) -> str:
    """32 lower-case hex characters (an OpenWhisk activation id) that only ``parts`` decide:
    whoever derives it from the same parts gets the same call id."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def rule_call_id(fire_id: str, rule: str) -> str:
    """The call id of ``rule``'s invocation for one fire: the same however often the fire is
    fanned out, so a redelivered fire finds the call and never starts it twice."""
    return derived_id("rule", fire_id, rule)


def tick_message_id(source: str, target: str, tick_ms: int) -> str:
    """The Nats-Msg-Id every gateway publishes one tick under: JetStream keeps the first."""
    prefix = "alarm" if source == SOURCE_ALARM else source
    return f"{prefix}-{target}-{tick_ms}"


def tick_fire_id(source: str, target: str, tick_ms: int) -> str:
    """A tick's fire id, from its message id: a duplicate published after the duplicate
    window is still the same fire, the same activation and the same calls."""
    return derived_id("tick", tick_message_id(source, target, tick_ms))


def rule_log_line(
    namespace: str,
    rule: str,
    action: str,
    *,
    activation_id: str | None = None,
    error: str | None = None,
    status_code: int = STATUS_SUCCESS,
) -> str:
    """One line of a trigger activation's logs, as OpenWhisk writes it per rule."""
    line: dict[str, Any] = {
        "statusCode": status_code,
        "success": error is None,
        "rule": f"{namespace}/{rule}",
        "action": f"{action_namespace(namespace, action)}/{action_name(action)[1]}",
    }
    if error is None:
        line["activationId"] = activation_id
    else:
        line["error"] = error
    return orjson.dumps(line).decode()


class MalformedFireError(ValueError):
    """A message on the fire stream this version cannot read; it can never be fanned out."""


FIRE_SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class Fire:
    """One accepted event, as the fire stream holds it until it is fanned out.

    For a trigger: the rules active when it was fired (name and action), ``arguments`` (the
    JSON the actions get) and ``payload`` (the fire's own, its activation's result). For a
    function (OpenFaaS's connectors): ``arguments`` is the body the function gets, with
    ``headers``. Wire form: a JSON line, a newline, the arguments and the payload as raw
    bytes (the line says where one ends).
    """

    fire_id: str
    source: str
    fired_at_ns: int
    trigger: str | None = None
    rules: tuple[tuple[str, str], ...] = ()
    function: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    arguments: bytes = b""
    payload: bytes = b""
    scheduled_at_ms: int | None = None

    def encode(self) -> bytes:
        envelope: dict[str, Any] = {
            "v": FIRE_SCHEMA_VERSION,
            "fireId": self.fire_id,
            "source": self.source,
            "firedAtNs": self.fired_at_ns,
            "argumentsSize": len(self.arguments),
        }
        if self.trigger is not None:
            envelope["trigger"] = self.trigger
            envelope["rules"] = [list(rule) for rule in self.rules]
        if self.function is not None:
            envelope["function"] = self.function
            envelope["headers"] = [list(header) for header in self.headers]
        if self.scheduled_at_ms is not None:
            envelope["scheduledAtMs"] = self.scheduled_at_ms
        return orjson.dumps(envelope) + b"\n" + self.arguments + self.payload

    @classmethod
    def decode(cls, data: bytes) -> "Fire":
        line, newline, rest = data.partition(b"\n")
        if not newline:
            raise MalformedFireError("no envelope line")
        try:
            envelope = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise MalformedFireError(f"envelope is not JSON: {exc}") from exc
        if not isinstance(envelope, dict) or envelope.get("v") != FIRE_SCHEMA_VERSION:
            raise MalformedFireError("not a fire of this version")
        try:
            size = int(envelope["argumentsSize"])
            trigger = envelope.get("trigger")
            function = envelope.get("function")
            if (trigger is None) == (function is None) or size > len(rest):
                raise MalformedFireError("a fire names a trigger or a function, not both")
            scheduled = envelope.get("scheduledAtMs")
            return cls(
                fire_id=str(envelope["fireId"]),
                source=str(envelope["source"]),
                fired_at_ns=int(envelope["firedAtNs"]),
                trigger=None if trigger is None else str(trigger),
                rules=tuple((str(name), str(action)) for name, action in envelope.get("rules", ())),
                function=None if function is None else str(function),
                headers=tuple(
                    (str(name), str(value)) for name, value in envelope.get("headers", ())
                ),
                arguments=rest[:size],
                payload=rest[size:],
                scheduled_at_ms=None if scheduled is None else int(scheduled),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, MalformedFireError):
                raise
            raise MalformedFireError(f"bad envelope field: {exc!r}") from exc


# NATS subjects (the nats/subject feed, functions' topic annotations)


def is_valid_subject(subject: str) -> bool:
    """A subject or wildcard NATS accepts to subscribe to: non-empty tokens without
    whitespace, ``*`` as a whole token, ``>`` as the whole last token."""
    if not subject or len(subject) > 256 or any(char.isspace() for char in subject):
        return False
    tokens = subject.split(".")
    for index, token in enumerate(tokens):
        if not token:
            return False
        if ("*" in token and token != "*") or (">" in token and token != ">"):
            return False
        if token == ">" and index != len(tokens) - 1:
            return False
    return True


def subject_within(subject: str, space: str) -> bool:
    """Whether every subject ``subject`` matches (wildcards too) is matched by ``space``."""
    tokens, allowed = subject.split("."), space.split(".")
    for index, token in enumerate(tokens):
        if index >= len(allowed):
            return False
        if allowed[index] == ">":
            return True
        if token == ">":
            return False
        if allowed[index] != "*" and allowed[index] != token:
            return False
    return len(tokens) == len(allowed)


def subject_spaces(setting: str) -> list[str]:
    return [space.strip() for space in setting.split(",") if space.strip()]
