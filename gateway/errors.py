"""The gateway's one error type, its kinds, and the one mapping of the layers' errors to them.

Handlers raise GatewayError for what they decide (a bad request, a function not found) and let
the errors of the layers below through: the stores', the queue's, NATS's. ``http_error`` is the
only place those become an HTTP status and a message; gateway/routes.py calls it for every
route and turns the result into a JSON response.
"""

import json

from aiohttp import web

from faas_gateway.core.events import InvalidEntityError
from faas_gateway.core.headers import CALL_ID
from faas_gateway.nats.activations import ActivationNotFoundError, ActivationStoreError
from faas_gateway.nats.buckets import (
    DocumentChangedError,
    DocumentExistsError,
    DocumentNotFoundError,
    DocumentStoreError,
)
from faas_gateway.nats.cancellations import CancellationError
from faas_gateway.nats.dead_letters import DeadLetterError
from faas_gateway.nats.function_store import (
    ConcurrentChangeError,
    FunctionExistsError,
    FunctionNotDeployedError,
    FunctionStoreError,
)
from faas_gateway.nats.link import NatsUnavailableError
from faas_gateway.nats.results import ResultStoreError
from gateway.queue import (
    CallIdTakenError,
    EnqueueUncertainError,
    MessageTooLargeError,
    QueueError,
    QueueFullError,
)

# Retry-After of a 503 for a full queue: long enough for workers to make room, short enough
# that a client is not kept waiting much past it.
QUEUE_FULL_RETRY_AFTER_S = 5


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


class NotFoundError(GatewayError):
    status = 404


class FunctionNotFoundError(NotFoundError):
    pass


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


class NotOfferedError(GatewayError):
    """A route of OpenFaaS's API for what this gateway does not do: it runs no containers,
    so it has no logs, secrets or replicas to hand out (docs/api.md)."""

    status = 501


class LoopDetectedError(GatewayError):
    """The request came back through this gateway (gateway/loops.py)."""

    status = 508


def error_response(
    status: int, message: str, call_id: str | None, headers: dict[str, str] | None = None
) -> web.Response:
    response = web.Response(
        status=status,
        body=(json.dumps({"error": message, "callId": call_id}) + "\n").encode(),
        content_type="application/json",
        headers=headers,
    )
    if call_id is not None:
        response.headers[CALL_ID] = call_id
    return response


# What a handler lets through from the layers below; http_error says what each becomes.
LAYER_ERRORS = (
    QueueError,
    ActivationNotFoundError,
    ActivationStoreError,
    ResultStoreError,
    DeadLetterError,
    CancellationError,
    FunctionStoreError,
    NatsUnavailableError,
    DocumentStoreError,
    InvalidEntityError,
)
MAPPED_ERRORS = (GatewayError, *LAYER_ERRORS)


def http_error(exc: Exception) -> GatewayError:
    """The answer to a client for an error of a handler or of a layer below it."""
    if isinstance(exc, GatewayError):
        return exc
    message = str(exc)
    match exc:
        case CallIdTakenError() | FunctionExistsError() | ConcurrentChangeError():
            return ConflictError(message)
        case DocumentExistsError():
            return ConflictError("resource already exists")
        case DocumentChangedError():
            return ConflictError(message)
        case DocumentNotFoundError():
            return NotFoundError(message)
        case InvalidEntityError():
            return InvalidRequestError(message)
        case ActivationNotFoundError() | FunctionNotDeployedError():
            return NotFoundError(message)
        case MessageTooLargeError():
            return PayloadTooLargeError(message)
        case QueueFullError():
            return QueueUnavailableError(
                message, headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)}
            )
        case EnqueueUncertainError():
            return QueueUncertainError(message)
        case QueueError():
            return QueueUnavailableError(message)
        case ActivationStoreError() | ResultStoreError():
            return QueueUnavailableError(f"activation records are unavailable: {message}")
        case DeadLetterError():
            return QueueUnavailableError(f"dead letters are unavailable: {message}")
        case CancellationError():
            return QueueUnavailableError(message)
        case FunctionStoreError():
            return QueueUnavailableError(f"the function registry is unavailable: {message}")
        case NatsUnavailableError():
            return QueueUnavailableError(f"NATS is unavailable: {message}")
        case DocumentStoreError():
            return QueueUnavailableError(f"the events store is unavailable: {message}")
    raise TypeError(f"no HTTP answer for {type(exc).__name__}") from exc
