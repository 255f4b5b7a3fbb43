"""One invocation as it arrives: its call id and timing, the function and sub-path it names,
the headers it forwards, its RFC 7240 preferences, and the queued call it becomes."""

import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote

from aiohttp import web
from multidict import CIMultiDict

from faas_gateway.core.call import QueuedCall
from faas_gateway.core.functions import (
    FUNCTION_NAME_PATTERN,
    FunctionSpec,
    Registry,
    is_valid_function_name,
)
from faas_gateway.core.headers import (
    CALL_ID,
    DURATION_SECONDS,
    FORWARDED_FOR,
    FORWARDED_HOST,
    START_TIME,
    end_to_end,
)
from gateway.errors import FunctionNotFoundError, InvalidRequestError

# A call id also names a JetStream message (Nats-Msg-Id) and a key-value entry (a NATS subject
# token, where dots separate tokens), so it is held to what all of those accept: no empty
# token between dots, none at the end.
CALL_ID_PATTERN = re.compile(r"(?=.{1,128}\Z)[A-Za-z0-9][A-Za-z0-9_=-]*(?:\.[A-Za-z0-9_=-]+)*")


class CallContext:
    __slots__ = ("call_id", "chosen_by_client", "start_ns", "started_monotonic")

    def __init__(self, call_id: str, chosen_by_client: bool = False) -> None:
        self.call_id = call_id
        # A client-chosen X-Call-Id is an idempotency key: posted again with the same request
        # it names the same call, with another request it is a conflict.
        self.chosen_by_client = chosen_by_client
        self.start_ns = time.time_ns()
        self.started_monotonic = time.monotonic()

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started_monotonic

    def apply_to(self, headers: CIMultiDict[str]) -> None:
        headers[CALL_ID] = self.call_id
        headers[START_TIME] = str(self.start_ns)
        headers[DURATION_SECONDS] = f"{self.elapsed_s():.6f}"


class InvalidCallIdError(ValueError):
    pass


class _RandomBytes:
    """os.urandom in blocks: one system call per 256 call ids instead of one each."""

    BLOCK_BYTES = 16 * 256

    def __init__(self) -> None:
        self._block = b""
        self._offset = 0

    def take16(self) -> bytes:
        if self._offset + 16 > len(self._block):
            self._block = os.urandom(self.BLOCK_BYTES)
            self._offset = 0
        chunk = self._block[self._offset : self._offset + 16]
        self._offset += 16
        return chunk


_random_bytes = _RandomBytes()


def new_call_id() -> str:
    """32 lower-case hex characters: a random (version 4) UUID without its dashes, as
    uuid.uuid4().hex makes it (122 random bits) at a fraction of its cost. The form of an
    OpenWhisk activation id, so every call id the gateway makes is one."""
    raw = bytearray(_random_bytes.take16())
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    return raw.hex()


def resolve_call_id(requested: str | None) -> str:
    if not requested:
        return new_call_id()
    if CALL_ID_PATTERN.fullmatch(requested) is None:
        raise InvalidCallIdError(
            f"invalid {CALL_ID}: use 1-128 characters from A-Z a-z 0-9 _ = . - "
            "starting with a letter or digit, with no dot at the end or beside another"
        )
    return requested


# the function and the path


def resolve_function(registry: Registry, name: str) -> FunctionSpec:
    function = registry.get(name)
    if function is not None:  # registered names were checked when registered
        return function
    if not is_valid_function_name(name):
        raise InvalidRequestError(
            f"invalid function name {name!r}: names match {FUNCTION_NAME_PATTERN.pattern}"
        )
    raise FunctionNotFoundError(f"function {name!r} not found")


def raw_subpath(request: web.Request) -> str:
    """The path after /function/<name>, still percent-encoded: '' for none, else '/...'."""
    parts = request.rel_url.raw_path.split("/", 3)
    return "/" + parts[3] if len(parts) > 3 else ""


def checked_subpath(request: web.Request) -> str:
    """raw_subpath, refused with 400 if it could climb out of the function's base path."""
    return check_subpath(raw_subpath(request))


def check_subpath(subpath: str) -> str:
    """The sub-path (still percent-encoded), refused with 400 if it could climb out of the
    function's base path.

    The sub-path goes on as the client sent it, after the function's URL: a '..' in it would
    let the function's server (or a proxy before it) resolve /base/../admin to /admin.
    """
    # Most paths have neither a dot nor an escape, and skip the whole check.
    if ("." in subpath or "%" in subpath) and has_dot_segment(subpath):
        raise InvalidRequestError(
            "the path after the function name may not have '.' or '..' segments, in any "
            "spelling (%2e, %2f, backslashes, ;parameters): it must stay under the function"
        )
    return subpath


def has_dot_segment(raw_path: str) -> bool:
    """Whether any segment is '.' or '..' once percent-decoded, as a server would decode it.

    Decoded first, %2e%2e is '..' and ..%2f is '../'. Backslashes count as slashes (some
    servers take them so) and a ';' starts a segment's parameters ('..;x' is '..' to Tomcat).
    """
    for segment in unquote(raw_path).replace("\\", "/").split("/"):
        if segment.partition(";")[0] in (".", ".."):
            return True
    return False


def forwarded_headers(request: web.Request, also_drop: frozenset[str]) -> CIMultiDict[str]:
    """The client's end-to-end headers plus X-Forwarded-For and X-Forwarded-Host."""
    return forwarded_headers_of(request.headers, request.remote, request.host, also_drop)


def forwarded_headers_of(
    incoming: Mapping[str, str], remote: str | None, host: str, also_drop: frozenset[str]
) -> CIMultiDict[str]:
    """forwarded_headers from the parts of a request: its headers, the client's address and
    the host it asked for."""
    headers = end_to_end(incoming, also_drop)
    forwarded_for = remote or ""
    if FORWARDED_FOR in headers:
        forwarded_for = f"{headers[FORWARDED_FOR]}, {forwarded_for}"
    headers[FORWARDED_FOR] = forwarded_for
    headers[FORWARDED_HOST] = host
    return headers


# preferences (RFC 7240): respond-async and wait=N

PREFER = "Prefer"
PREFERENCE_APPLIED = "Preference-Applied"


@dataclass(frozen=True, slots=True)
class Preferences:
    respond_async: bool = False
    wait_s: float | None = None


NO_PREFERENCES = Preferences()


def parse_prefer(values: list[str]) -> Preferences:
    """Every Prefer header of a request; unknown or malformed preferences are ignored, as
    RFC 7240 asks. The first of a repeated preference wins."""
    respond_async = False
    wait_s: float | None = None
    for value in values:
        for item in value.split(","):
            token = item.split(";", 1)[0].strip()  # parameters after ';' mean nothing here
            name, _, raw = token.partition("=")
            name = name.strip().lower()
            if name == "respond-async":
                respond_async = True
            elif name == "wait" and wait_s is None:
                wait_s = _seconds(raw.strip().strip('"'))
    return Preferences(respond_async, wait_s)


def _seconds(text: str) -> float | None:
    # RFC 7240 has delta-seconds (digits); fractions are accepted as a courtesy.
    try:
        seconds = float(text)
    except ValueError:
        return None
    if not 0 <= seconds < float("inf"):
        return None
    return seconds


def wait_applied(wait_s: float) -> str:
    return f"wait={wait_s:g}"


def queued_call(
    call: "CallContext",
    request: web.Request,
    function: FunctionSpec,
    subpath: str,
    headers: CIMultiDict[str],
    body: bytes,
    callback_url: str | None,
) -> QueuedCall:
    """The call as the queue keeps it (and as a record describes it)."""
    request_line = RequestLine(
        function.name, subpath, request.method, request.rel_url.raw_query_string
    )
    return queued_call_of(call, request_line, function, subpath, headers, body, callback_url)


@dataclass(frozen=True, slots=True)
class RequestLine:
    """What an invocation's request line says, from aiohttp's request or the lean server's."""

    name: str  # the function, as in /function/<name>
    subpath: str  # the rest of the path, still percent-encoded: '' or '/...'
    method: str
    raw_query: str


def queued_call_of(
    call: "CallContext",
    request_line: RequestLine,
    function: FunctionSpec,
    subpath: str,
    headers: CIMultiDict[str],
    body: bytes,
    callback_url: str | None,
) -> QueuedCall:
    """queued_call from the parts of a request."""
    return QueuedCall(
        call_id=call.call_id,
        function=function.name,
        method=request_line.method,
        path=subpath,
        query=request_line.raw_query,
        headers=list(headers.items()),
        body=body,
        callback_url=callback_url,
        accepted_at_ns=call.start_ns,
    )
