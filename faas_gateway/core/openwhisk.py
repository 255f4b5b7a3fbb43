"""OpenWhisk's shapes of what the gateway keeps: a function's answer as an activation's
result, a call's record as an activation, a registered function as an action, and action
names with packages. Pure: the handler (gateway/handlers/openwhisk.py) reads and writes.

The wire contract these follow is OpenWhisk's controller and its clients (the ``openwhisk`` npm
package, APISIX's openwhisk plugin); docs/openwhisk.md says where and why this differs.
"""

import base64
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from faas_gateway.core.outcome import FAILED_BY_GATEWAY, FAILED_BY_TIMEOUT
from faas_gateway.core.timefmt import parse_rfc3339_ns

# An activation's response.status, and the number OpenWhisk's listing calls statusCode.
SUCCESS = "success"
APPLICATION_ERROR = "application error"
DEVELOPER_ERROR = "action developer error"
INTERNAL_ERROR = "whisk internal error"
STATUS_CODES = {SUCCESS: 0, APPLICATION_ERROR: 1, DEVELOPER_ERROR: 2, INTERNAL_ERROR: 3}
# What a blocking invoke answers for each (OpenWhisk's Actions.scala).
HTTP_STATUS = {SUCCESS: 200, APPLICATION_ERROR: 502, DEVELOPER_ERROR: 502, INTERNAL_ERROR: 500}

# Actions have no versions here: every one is at OpenWhisk's first.
VERSION = "0.0.1"
KIND = "blackbox"
# A record's kind when it is a trigger's activation (faas_gateway/nats/activations.py).
TRIGGER_KIND = "trigger"
# actions/{package}/{name} is the function named {package}__{name}: two underscores, which
# function names (in the API and in files) and action names may both hold.
PACKAGE_SEPARATOR = "__"
URL_ANNOTATION = "url"

# Response headers that describe one HTTP message, not the answer: a client that turns a
# wrapped result back into a response (APISIX) frames it anew.
HEADERS_NOT_WRAPPED = frozenset({"content-length", "transfer-encoding", "connection", "date"})


def function_name(package: str | None, action: str) -> str:
    return action if package is None else f"{package}{PACKAGE_SEPARATOR}{action}"


def action_name(function: str) -> tuple[str | None, str]:
    """(package, action) of a function's name: ``pkg__name`` is action ``name`` of package
    ``pkg``; any other name is an action outside packages."""
    package, separator, action = function.partition(PACKAGE_SEPARATOR)
    if separator and package and action:
        return package, action
    return None, function


def action_path(namespace: str, function: str) -> str:
    """OpenWhisk's fully qualified path without its leading slash: ns/[pkg/]name."""
    package, action = action_name(function)
    return f"{namespace}/{action}" if package is None else f"{namespace}/{package}/{action}"


def action_namespace(namespace: str, function: str) -> str:
    """An action's ``namespace`` field: ns, or ns/pkg for an action of a package."""
    package, _ = action_name(function)
    return namespace if package is None else f"{namespace}/{package}"


# results


class BodyObject(dict[str, Any]):
    """A result that is the function's body, a JSON object, parsed; ``raw`` keeps the body as
    the function sent it, for answers that are the result alone (byte for byte, as APISIX
    expects the result "verbatim")."""

    __slots__ = ("raw",)

    def __init__(self, parsed: dict[str, Any], raw: bytes) -> None:
        super().__init__(parsed)
        self.raw = raw


def result_bytes(result: dict[str, Any]) -> bytes:
    """A result as the body of an answer: the function's own bytes when it is its body."""
    return result.raw if isinstance(result, BodyObject) else orjson.dumps(result)


def result_of(status_code: int, headers: Iterable[tuple[str, str]], body: bytes) -> dict[str, Any]:
    """The activation's result for a function's answer: its body when that is a JSON object;
    any other answer (not JSON, an array, a scalar, nothing) wrapped as ``{"statusCode",
    "headers", "body"}``, the shape a web action returns and APISIX turns back into a
    response. A body that is not UTF-8 text is given in base64, as web actions give it."""
    if body[:1] in (b"{", b" ", b"\t", b"\r", b"\n"):
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            return BodyObject(parsed, body)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        text = base64.b64encode(body).decode("ascii")
    return {"statusCode": status_code, "headers": wrapped_headers(headers), "body": text}


def wrapped_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str | list[str]]:
    """Response headers as one JSON object; a repeated header as a list of its values."""
    wrapped: dict[str, str | list[str]] = {}
    for key, value in headers:
        name = str(key)  # a plain str: multidict's keys are a subclass JSON encoders refuse
        if name.lower() in HEADERS_NOT_WRAPPED:
            continue
        present = wrapped.get(name)
        if present is None:
            wrapped[name] = value
        elif isinstance(present, list):
            present.append(value)
        else:
            wrapped[name] = [present, value]
    return wrapped


def too_large_result(size: int, limit: int) -> dict[str, Any]:
    return {
        "error": "The action produced a response that exceeded the allowed length: "
        f"{size} > {limit} bytes."
    }


def activation_status(
    finished: str, failed_by: str | None, body_size: int, cut: bool, max_result_bytes: int
) -> str:
    """An ended call's ``response.status``.

    ``finished``: "succeeded", "failed" or "cancelled" (a record's status). A 2xx is a
    success; a function's own failure status an application error; its timeout an action
    developer error; a function that could not be reached, a cancelled call and a fault of
    the gateway a whisk internal error. An answer larger than ``max_result_bytes``, or only
    partly kept (``cut``), is an application error, as OpenWhisk's result size limit makes
    it. Records from before ``failedBy`` was kept count as the function's answer.
    """
    if finished == "cancelled":
        return INTERNAL_ERROR
    if finished == "failed" and failed_by == FAILED_BY_TIMEOUT:
        return DEVELOPER_ERROR
    if finished == "failed" and failed_by == FAILED_BY_GATEWAY:
        return INTERNAL_ERROR
    if body_size > max_result_bytes or cut:
        return APPLICATION_ERROR
    return SUCCESS if finished == "succeeded" else APPLICATION_ERROR


def activation_response(
    *,
    finished: str,
    failed_by: str | None,
    error: str | None,
    status_code: int,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    body_size: int,
    cut: bool,
    max_result_bytes: int,
) -> dict[str, Any]:
    """An ended call's ``response``: ``{status, success, result}`` (activation_status). The
    result is the function's answer (result_of) when it answered, else ``{"error"}``."""
    status = activation_status(finished, failed_by, body_size, cut, max_result_bytes)
    if status in (DEVELOPER_ERROR, INTERNAL_ERROR):
        result: dict[str, Any] = {"error": error or f"the call {finished} ({status_code})"}
    elif body_size > max_result_bytes:
        result = too_large_result(body_size, max_result_bytes)
    elif cut:
        result = {"error": f"The action's response of {body_size} bytes was not kept whole."}
    else:
        result = result_of(status_code, headers, body)
    return _response(status, result)


def _response(status: str, result: dict[str, Any]) -> dict[str, Any]:
    return {"status": status, "success": status == SUCCESS, "result": result}


# activations


def epoch_ms(rfc3339: object) -> int | None:
    if not isinstance(rfc3339, str):
        return None
    try:
        return parse_rfc3339_ns(rfc3339) // 1_000_000
    except ValueError:
        return None


def activation_summary(
    record: Mapping[str, Any], status: str | None, *, namespace: str, timeout_ms: int | None
) -> dict[str, Any]:
    """The listing's entry for a finished record (OpenWhisk's view without ``docs``):
    no response and no logs, its status as the number ``statusCode``. A trigger's activation
    (``kind`` "trigger") is named after the trigger and has no end or duration, as
    OpenWhisk's have none."""
    function = str(record.get("function"))
    queued_ms = epoch_ms(record.get("queuedAt")) or 0
    start_ms = epoch_ms(record.get("startedAt")) or queued_ms
    of_trigger = record.get("kind") == TRIGGER_KIND
    annotations: list[dict[str, Any]] = []
    if not of_trigger:
        annotations = [
            {"key": "path", "value": action_path(namespace, function)},
            {"key": "kind", "value": KIND},
            {"key": "waitTime", "value": max(0, start_ms - queued_ms)},
        ]
        if timeout_ms is not None:
            annotations.append({"key": "limits", "value": {"timeout": timeout_ms}})
    summary: dict[str, Any] = {
        "namespace": namespace,
        "name": function if of_trigger else action_name(function)[1],
        "version": VERSION,
        "publish": False,
        "annotations": annotations,
        "activationId": str(record.get("callId")),
        "start": start_ms,
    }
    end_ms = None if of_trigger else epoch_ms(record.get("finishedAt"))
    if end_ms is not None:
        summary["end"] = end_ms
        duration_ms = record.get("durationMs")
        summary["duration"] = (
            round(duration_ms) if isinstance(duration_ms, int | float) else end_ms - start_ms
        )
    if status is not None:
        summary["statusCode"] = STATUS_CODES[status]
    return summary


def activation_document(
    record: Mapping[str, Any],
    response: dict[str, Any],
    *,
    namespace: str,
    subject: str,
    timeout_ms: int | None,
) -> dict[str, Any]:
    """A finished record as OpenWhisk's activation (its API form: ``end`` and ``duration``
    in epoch milliseconds, ``response`` without the numeric statusCode)."""
    document = activation_summary(record, None, namespace=namespace, timeout_ms=timeout_ms)
    document["subject"] = subject
    document["response"] = response
    document["logs"] = list(record.get("logs") or ())
    return document


# actions


def action_document(
    *,
    namespace: str,
    function: str,
    url: str,
    image: str,
    annotations: Mapping[str, str],
    timeout_ms: int | None,
    updated_ms: int | None,
) -> dict[str, Any]:
    """A registered function as an OpenWhisk action: a blackbox whose ``url`` annotation
    says where it listens, with the function's annotations beside it."""
    document: dict[str, Any] = {
        "namespace": action_namespace(namespace, function),
        "name": action_name(function)[1],
        "version": VERSION,
        "publish": False,
        "exec": {"kind": KIND, "image": image, "binary": False},
        "annotations": [
            {"key": URL_ANNOTATION, "value": url},
            {"key": "exec", "value": KIND},
            *({"key": key, "value": value} for key, value in annotations.items()),
        ],
        "parameters": [],
        "limits": {} if timeout_ms is None else {"timeout": timeout_ms},
    }
    if updated_ms is not None:
        document["updated"] = updated_ms
    return document
