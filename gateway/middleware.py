"""Request middleware: call identity for invocations, and errors as JSON for every route."""

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from faas_common.headers import CALL_ID
from gateway.calls import (
    CALL,
    INVOCATION_PREFIXES,
    CallContext,
    InvalidCallIdError,
    resolve_call_id,
)
from gateway.errors import GatewayError, InvalidRequestError, error_response

log = logging.getLogger("faas.gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as exc:
        status, message, headers = exc.status, exc.message, exc.headers
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        status, message = exc.status, exc.reason
        headers = {name: value for name, value in exc.headers.items() if name.lower() == "allow"}
    call = request.get(CALL)
    response = error_response(status, message, call.call_id if call else None, headers)
    if call is not None:
        call.apply_to(response.headers)
    return response


@web.middleware
async def call_identity(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give every invocation a call id and stamp the timing headers on its response."""
    if not request.path.startswith(INVOCATION_PREFIXES):
        return await handler(request)
    try:
        call = CallContext(resolve_call_id(request.headers.get(CALL_ID)))
    except InvalidCallIdError as exc:
        # The rejection is an invocation response too, so it carries a call id like every other
        # (a new one: the invalid one cannot be echoed into headers and logs) and the timings.
        request[CALL] = CallContext(resolve_call_id(None))
        raise InvalidRequestError(str(exc)) from exc
    request[CALL] = call
    response = await handler(request)
    if not response.prepared:
        call.apply_to(response.headers)
    return response
