"""How handlers become routes: the one place where errors turn into JSON responses.

No aiohttp middleware: middlewares wrap every request in extra coroutines, and the proxy route
is the gateway's hot path. Invocation handlers are wrapped here instead.

Two error shapes: the gateway's own ``{"error", "callId"}``, and under /api/v1 OpenWhisk's
``{"error", "code"}`` with the request id in X-Request-ID (``openwhisk``). Both take their
status from gateway/errors.py ``http_error``.
"""

from collections.abc import Awaitable, Callable, Mapping

import orjson
from aiohttp import web
from multidict import MultiMapping

from faas_gateway.core.headers import CALL_ID
from gateway.auth import CHALLENGE, Credentials
from gateway.errors import (
    MAPPED_ERRORS,
    GatewayError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    UnauthorizedError,
    error_response,
    http_error,
)
from gateway.request import (
    CALL_ID_PATTERN,
    CallContext,
    InvalidCallIdError,
    new_call_id,
    resolve_call_id,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
InvocationHandler = Callable[[web.Request, CallContext], Awaitable[web.StreamResponse]]


def invocation(handle: InvocationHandler) -> Handler:
    """Give the call its id, map GatewayError to JSON, stamp the call headers on the response."""

    async def route(request: web.Request) -> web.StreamResponse:
        requested = request.headers.get(CALL_ID)
        try:
            call = CallContext(resolve_call_id(requested), chosen_by_client=bool(requested))
        except InvalidCallIdError as exc:
            # Rejected, but still an invocation response: a new call id (the invalid one is
            # never echoed into headers or logs) and the timing headers.
            call = CallContext(new_call_id())
            return invocation_error(InvalidRequestError(str(exc)), call)
        try:
            response = await handle(request, call)
        except MAPPED_ERRORS as exc:
            return invocation_error(http_error(exc), call)
        if not response.prepared:
            call.apply_to(response.headers)
        return response

    return route


def invocation_error(error: GatewayError, call: CallContext) -> web.Response:
    """A refused invocation: the JSON error with the call's headers."""
    response = error_response(error.status, error.message, call.call_id, error.headers)
    call.apply_to(response.headers)
    if error.closes_connection:
        response.force_close()
    return response


def read_only(handle: Handler) -> Handler:
    """GET and HEAD; any other method gets a JSON 405."""

    async def route(request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            error = MethodNotAllowedError(
                f"{request.path} accepts GET only", {"Allow": "GET, HEAD"}
            )
            return error_response(error.status, error.message, None, error.headers)
        return await handle(request)

    return route


def system(handle: Handler) -> Handler:
    """A read-only /system route whose GatewayErrors become JSON responses."""
    return read_only(json_errors(handle))


def by_method(handlers: dict[str, Handler]) -> Handler:
    """One handler per method on one path; any other method gets a JSON 405."""
    allowed = ", ".join(handlers)

    async def route(request: web.Request) -> web.StreamResponse:
        handle = handlers.get(request.method)
        if handle is None:
            error = MethodNotAllowedError(
                f"{request.path} accepts {allowed} only", {"Allow": allowed}
            )
            return error_response(error.status, error.message, None, error.headers)
        return await handle(request)

    return json_errors(route)


def json_errors(handle: Handler) -> Handler:
    """Errors of a route that is not an invocation become JSON responses (http_error)."""

    async def route(request: web.Request) -> web.StreamResponse:
        try:
            return await handle(request)
        except MAPPED_ERRORS as exc:
            error = http_error(exc)
            response = error_response(error.status, error.message, None, error.headers)
            if error.closes_connection:
                response.force_close()
            return response

    return route


async def no_such_route(request: web.Request) -> web.Response:
    if request.path == OPENWHISK_PREFIX or request.path.startswith(OPENWHISK_PREFIX + "/"):
        return openwhisk_error(NotFoundError(f"no route {request.path}"), request_id_of(request))
    return error_response(404, f"no route {request.path}", None)


# OpenWhisk's API (gateway/handlers/openwhisk.py)

OPENWHISK_PREFIX = "/api/v1"
REQUEST_ID = "X-Request-ID"
# OpenWhisk's words (its Messages and ErrorResponse).
RESOURCE_DOES_NOT_EXIST = "The requested resource does not exist."
AUTHENTICATION_INVALID = "The supplied authentication is invalid"


def openwhisk(handlers: Mapping[str, Handler], credentials: Credentials | None) -> Handler:
    """A route under /api/v1, one handler per method: Basic auth when ``credentials`` are
    given, any error as OpenWhisk's ``{"error", "code"}`` (``code`` the request id), and the
    request id in X-Request-ID on every answer, successes too."""
    allowed = ", ".join(handlers)

    async def route(request: web.Request) -> web.StreamResponse:
        request_id = request_id_of(request)
        try:
            if credentials is not None and not credentials.accept(
                request.headers.get("Authorization")
            ):
                raise UnauthorizedError(AUTHENTICATION_INVALID, dict(CHALLENGE))
            handle = handlers.get(request.method)
            if handle is None:
                raise MethodNotAllowedError(
                    f"{request.path} accepts {allowed} only", {"Allow": allowed}
                )
            response = await handle(request)
        except MAPPED_ERRORS as exc:
            return openwhisk_error(http_error(exc), request_id)
        response.headers[REQUEST_ID] = request_id
        return response

    return route


def request_id_of(request: web.Request) -> str:
    return request_id_from(request.headers)


def request_id_from(headers: MultiMapping[str]) -> str:
    """The client's X-Request-ID when it is a plain token (OpenWhisk takes the caller's, so a
    transaction can be followed across calls), else a new one."""
    given = headers.get(REQUEST_ID)
    if given and CALL_ID_PATTERN.fullmatch(given):
        return given
    return new_call_id()


def openwhisk_error(error: GatewayError, request_id: str) -> web.Response:
    # OpenWhisk answers every 404 with the same words, whatever was not found.
    message = RESOURCE_DOES_NOT_EXIST if error.status == 404 else error.message
    response = web.Response(
        status=error.status,
        body=orjson.dumps({"error": message, "code": request_id}, option=orjson.OPT_APPEND_NEWLINE),
        content_type="application/json",
        headers=error.headers,
    )
    response.headers[REQUEST_ID] = request_id
    if error.closes_connection:
        response.force_close()
    return response
