"""/system/activations: a record by id, its result, and the newest records."""

import re
from collections.abc import Mapping

from aiohttp import web

from faas_gateway.core.functions import is_valid_function_name
from faas_gateway.core.timefmt import parse_rfc3339_ns
from faas_gateway.nats.activations import STATUSES, ActivationStore, ListQuery
from gateway.errors import InvalidRequestError
from gateway.request import CALL_ID_PATTERN
from gateway.responses import record_response, result_response, unfinished_response

DEFAULT_LIMIT = 30
MAX_LIMIT = 200
UNIX_MS = re.compile(r"[0-9]{1,16}")


class Activations:
    def __init__(self, records: ActivationStore) -> None:
        self._records = records

    async def record(self, request: web.Request) -> web.StreamResponse:
        stored = await self._records.find(valid_call_id(request.match_info["call_id"]))
        return record_response(stored)

    async def result(self, request: web.Request) -> web.StreamResponse:
        stored = await self._records.find(valid_call_id(request.match_info["call_id"]))
        if not stored.is_final:
            return unfinished_response(stored)
        return await result_response(self._records, stored)

    async def newest(self, request: web.Request) -> web.StreamResponse:
        records = await self._records.newest(parse_list_query(request.rel_url.query))
        body = b"[" + b",".join(records) + b"]\n"
        return web.Response(body=body, content_type="application/json")


def valid_call_id(call_id: str) -> str:
    if CALL_ID_PATTERN.fullmatch(call_id) is None:
        raise InvalidRequestError(f"{call_id!r} is not a valid call id")
    return call_id


def parse_list_query(params: Mapping[str, str]) -> ListQuery:
    """function, status, limit (1-200, default 30) and since (RFC 3339, or Unix time in
    milliseconds as OpenWhisk takes it); anything else is a 400 naming the parameter."""
    function = parse_function_param(params)
    status = params.get("status") or None
    if status is not None and status not in STATUSES:
        raise InvalidRequestError(f"status must be one of {', '.join(STATUSES)}")
    limit = parse_limit_param(params)
    since_ns = None
    if params.get("since"):
        since_ns = parse_since_ns(params["since"])
    return ListQuery(function=function, status=status, limit=limit, since_ns=since_ns)


def parse_function_param(params: Mapping[str, str]) -> str | None:
    function = params.get("function") or None
    if function is not None and not is_valid_function_name(function):
        raise InvalidRequestError(f"invalid function name {function!r}")
    return function


def parse_limit_param(params: Mapping[str, str]) -> int:
    """``limit``: 1-200, default 30, as OpenWhisk's activation listing takes it."""
    if not params.get("limit"):
        return DEFAULT_LIMIT
    try:
        limit = int(params["limit"])
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidRequestError(f"limit must be a whole number from 1 to {MAX_LIMIT}")
    return limit


def parse_since_ns(text: str) -> int:
    if UNIX_MS.fullmatch(text):
        return int(text) * 1_000_000
    try:
        return parse_rfc3339_ns(text)
    except ValueError as exc:
        raise InvalidRequestError(
            "since must be an RFC 3339 time (2026-11-23T08:00:00Z) or Unix milliseconds"
        ) from exc
