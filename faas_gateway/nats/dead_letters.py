"""Dead letters: the requests of calls that failed for good, kept so they can be queued again.

One JetStream stream (``dead_letter_stream``, limits retention, ``dead_letter_retention``), one
message per failed call on ``<stream>.<call id>``: the queued call exactly as it was queued,
with what became of it in headers. Written by the worker before it acks the call; the gateway
lists them and re-queues one on request.
"""

import logging
from typing import Any

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from faas_gateway.core.call import MalformedMessageError, QueuedCall
from faas_gateway.core.headers import NATS_MSG_ID
from faas_gateway.core.outcome import Outcome
from faas_gateway.nats.activations import rfc3339_ms
from faas_gateway.nats.jetstream import AckedPublisher, StreamLimits, ensure_limited_stream
from faas_gateway.runtime.settings import CommonSettings

log = logging.getLogger("faas.dead_letters")

CALL_ID = "Faas-Call-Id"
FUNCTION = "Faas-Function"
STATUS = "Faas-Status"
ATTEMPTS = "Faas-Attempts"
ERROR = "Faas-Error"
FAILED_AT = "Faas-Failed-At"


class DeadLetterError(RuntimeError):
    """A dead letter could not be written or read: NATS is away or did not answer."""


def dead_letter_subject(settings: CommonSettings, call_id: str) -> str:
    return f"{settings.dead_letter_stream}.{call_id}"


async def ensure_dead_letter_stream(js: JetStreamContext, settings: CommonSettings) -> None:
    retention_s = settings.dead_letter_retention_s
    await ensure_limited_stream(
        js,
        StreamConfig(
            name=settings.dead_letter_stream,
            description="Requests of async calls that failed for good (faas-gateway)",
            subjects=[f"{settings.dead_letter_stream}.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=settings.nats_stream_replicas,
            duplicate_window=min(120.0, retention_s),
            allow_direct=True,
        ),
        # Discard old: when full the oldest letters go, so a failing call can always be
        # finished; refusing its letter would keep it in the queue, retried without end.
        StreamLimits(
            settings.dead_letter_max_bytes,
            DiscardPolicy.OLD,
            retention_s,
            "dead_letter_max_bytes",
        ),
    )


def _one_line(text: str) -> str:
    return " ".join(text.split())[:1000]


async def keep_dead_letter(
    acks: AckedPublisher,
    settings: CommonSettings,
    call: QueuedCall,
    outcome: Outcome,
    attempts: int,
    failed_at_ns: int,
) -> None:
    headers = {
        NATS_MSG_ID: f"dead-{call.call_id}",  # a worker that dies after this writes it once
        CALL_ID: call.call_id,
        FUNCTION: call.function,
        STATUS: str(outcome.status_code),
        ATTEMPTS: str(attempts),
        ERROR: _one_line(outcome.error or f"the function answered {outcome.status_code}"),
        FAILED_AT: rfc3339_ms(failed_at_ns) or "",
    }
    try:
        await acks.publish(
            dead_letter_subject(settings, call.call_id), call.encode(), 5.0, headers=headers
        )
    except (TimeoutError, nats.errors.Error) as exc:
        raise DeadLetterError(f"keeping the dead letter failed: {exc!r}") from exc


def summary(msg: Msg) -> dict[str, Any] | None:
    """The listing's view of a dead letter: what failed and the request, without its body."""
    headers = msg.headers or {}
    try:
        call = QueuedCall.decode(msg.data)
    except MalformedMessageError:
        return None
    content_type = next(
        (value for name, value in call.headers if name.lower() == "content-type"), None
    )
    return {
        "callId": call.call_id,
        "function": call.function,
        "statusCode": int(headers.get(STATUS, "0") or 0),
        "attempts": int(headers.get(ATTEMPTS, "0") or 0),
        "error": headers.get(ERROR),
        "failedAt": headers.get(FAILED_AT),
        "queuedAt": rfc3339_ms(call.accepted_at_ns),
        "request": {
            "method": call.method,
            "path": call.path,
            "query": call.query,
            "contentType": content_type,
            "bodySize": len(call.body),
        },
        "callbackUrl": call.callback_url,
    }


async def get_dead_letter(
    client: NatsClient, settings: CommonSettings, call_id: str
) -> QueuedCall | None:
    subject = dead_letter_subject(settings, call_id)
    try:
        msg = await client.request(
            f"$JS.API.DIRECT.GET.{settings.dead_letter_stream}.{subject}", b"", timeout=5.0
        )
    except (TimeoutError, nats.errors.Error) as exc:
        raise DeadLetterError(f"reading the dead letter failed: {exc!r}") from exc
    if not msg.data:
        return None
    try:
        return QueuedCall.decode(msg.data)
    except MalformedMessageError:
        # The function's name is inside the letter that cannot be read.
        log.warning("unreadable dead letter for %s", call_id, extra={"callId": call_id})
        return None
