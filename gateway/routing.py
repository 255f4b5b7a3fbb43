"""From an invocation URL to the function it names and the path it asks of that function."""

from aiohttp import web
from multidict import CIMultiDict

from faas_common.headers import FORWARDED_FOR, FORWARDED_HOST, end_to_end
from faas_common.registry import (
    FUNCTION_NAME_PATTERN,
    FunctionSpec,
    Registry,
    is_valid_function_name,
)
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


def forwarded_headers(request: web.Request, also_drop: frozenset[str]) -> CIMultiDict[str]:
    """The client's end-to-end headers plus X-Forwarded-For and X-Forwarded-Host."""
    headers = end_to_end(request.headers, also_drop)
    forwarded_for = request.remote or ""
    if FORWARDED_FOR in headers:
        forwarded_for = f"{headers[FORWARDED_FOR]}, {forwarded_for}"
    headers[FORWARDED_FOR] = forwarded_for
    headers[FORWARDED_HOST] = request.host
    return headers
