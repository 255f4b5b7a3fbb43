"""From an invocation URL to the function it names and the path it asks of that function."""

from urllib.parse import unquote

from aiohttp import web
from multidict import CIMultiDict

from faas_gateway.core.functions import (
    FUNCTION_NAME_PATTERN,
    FunctionSpec,
    Registry,
    is_valid_function_name,
)
from faas_gateway.core.headers import FORWARDED_FOR, FORWARDED_HOST, end_to_end
from gateway.errors import FunctionNotFoundError, InvalidRequestError


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
    """raw_subpath, refused with 400 if it could climb out of the function's base path.

    The sub-path goes on as the client sent it, after the function's URL: a '..' in it would
    let the function's server (or a proxy before it) resolve /base/../admin to /admin.
    """
    subpath = raw_subpath(request)
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
    headers = end_to_end(request.headers, also_drop)
    forwarded_for = request.remote or ""
    if FORWARDED_FOR in headers:
        forwarded_for = f"{headers[FORWARDED_FOR]}, {forwarded_for}"
    headers[FORWARDED_FOR] = forwarded_for
    headers[FORWARDED_HOST] = request.host
    return headers
