"""The gateway's one error type and its kinds; routes.py turns them into responses."""

import json

from aiohttp import web

from faas_gateway.core.headers import CALL_ID


class GatewayError(Exception):
    status = 500
    # The client's connection is closed after the answer: what else it sends is not read.
    closes_connection = False

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class InvalidRequestError(GatewayError):
    status = 400


class UnauthorizedError(GatewayError):
    status = 401


class FunctionNotFoundError(GatewayError):
    status = 404


class MethodNotAllowedError(GatewayError):
    status = 405


class RequestTimeoutError(GatewayError):
    """The request body stopped arriving (request_body_timeout); the rest is not waited for."""

    status = 408
    closes_connection = True  # RFC 9110 15.5.9


class ClientGoneError(GatewayError):
    """The client left before the call ended: there is no one to answer.

    Logged at debug and counted (gateway_client_disconnects_total), never as a failure of the
    function or the gateway. The status is nginx's 'client closed request'; no one sees it.
    """

    status = 499


class ConflictError(GatewayError):
    status = 409


class PayloadTooLargeError(GatewayError):
    status = 413


class TooManyRequestsError(GatewayError):
    status = 429


class UpstreamUnavailableError(GatewayError):
    status = 502


class QueueUnavailableError(GatewayError):
    status = 503


class QueueUncertainError(QueueUnavailableError):
    """No confirmation in time: the call may have reached the queue or not. Posting it again
    with the same X-Call-Id is safe (it is the same call)."""


class UpstreamTimeoutError(GatewayError):
    status = 504


class LoopDetectedError(GatewayError):
    """The request came back through this gateway (gateway/loops.py)."""

    status = 508


def error_response(
    status: int, message: str, call_id: str | None, headers: dict[str, str] | None = None
) -> web.Response:
    response = web.Response(
        status=status,
        body=json.dumps({"error": message, "callId": call_id}).encode(),
        content_type="application/json",
        headers=headers,
    )
    if call_id is not None:
        response.headers[CALL_ID] = call_id
    return response
