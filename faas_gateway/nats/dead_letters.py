"""Dead letters: the requests of calls that failed for good, kept so they can be queued again.

One JetStream stream (``dead_letter_stream``, limits retention, ``dead_letter_retention``), one
message per failed call on ``<stream>.<call id>``: the queued call exactly as it was queued,
with what became of it in headers. Written by the worker before it acks the call; the gateway
lists them and re-queues one on request.
"""

import logging
from typing import Any

import nats.errors
from nats.aio.msg import Msg

from faas_gateway.core.call import MalformedMessageError, QueuedCall
from faas_gateway.core.headers import NATS_MSG_ID, header
from faas_gateway.core.outcome import Outcome
from faas_gateway.core.timefmt import rfc3339_ms
from faas_gateway.nats.jetstream import read_backwards
from faas_gateway.nats.link import NatsLink, NatsUnavailableError
from faas_gateway.nats.names import Names

log = logging.getLogger("faas.dead_letters")

CALL_ID = "Faas-Call-Id"
FUNCTION = "Faas-Function"
STATUS = "Faas-Status"
ATTEMPTS = "Faas-Attempts"
ERROR = "Faas-Error"
FAILED_AT = "Faas-Failed-At"


class DeadLetterError(RuntimeError):
    """A dead letter could not be written or read: NATS is away or did not answer."""


def _one_line(text: str) -> str:
    return " ".join(text.split())[:1000]


class DeadLetters:
    """The dead-letter stream: written by the worker, listed and read back by the gateway."""

    def __init__(self, link: NatsLink, names: Names) -> None:
        self._link = link
        self._names = names
        self._timeout_s = 5.0

    async def keep(
        self, call: QueuedCall, outcome: Outcome, attempts: int, failed_at_ns: int
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
            await self._link.acks.publish(
                self._names.dead_letter_subject(call.call_id),
                call.encode(),
                self._timeout_s,
                headers=headers,
            )
        except (TimeoutError, NatsUnavailableError, nats.errors.Error) as exc:
            raise DeadLetterError(f"keeping the dead letter failed: {exc!r}") from exc

    async def get(self, call_id: str) -> QueuedCall | None:
        subject = self._names.dead_letter_subject(call_id)
        try:
            msg = await self._link.nc.request(
                f"$JS.API.DIRECT.GET.{self._names.dead_letter_stream}.{subject}",
                b"",
                timeout=self._timeout_s,
            )
        except (TimeoutError, NatsUnavailableError, nats.errors.Error) as exc:
            raise DeadLetterError(f"reading the dead letter failed: {exc!r}") from exc
        if not msg.data:
            return None
        try:
            return QueuedCall.decode(msg.data)
        except MalformedMessageError:
            # The function's name is inside the letter that cannot be read.
            log.warning("unreadable dead letter for %s", call_id, extra={"callId": call_id})
            return None

    async def newest(self, function: str | None, limit: int) -> list[dict[str, Any]]:
        """Summaries, newest first, of ``function``'s letters (all with None)."""
        found: list[dict[str, Any]] = []
        try:
            windows = read_backwards(self._link.nc, self._link.js, self._names.dead_letter_stream)
            async for messages in windows:
                for msg in messages:
                    letter = summary(msg)
                    if letter is None or (function and letter["function"] != function):
                        continue
                    found.append(letter)
                    if len(found) == limit:
                        return found
        except (TimeoutError, NatsUnavailableError, nats.errors.Error) as exc:
            raise DeadLetterError(f"dead letters are unavailable: {exc}") from exc
        return found


def summary(msg: Msg) -> dict[str, Any] | None:
    """The listing's view of a dead letter: what failed and the request, without its body."""
    headers = msg.headers or {}
    try:
        call = QueuedCall.decode(msg.data)
    except MalformedMessageError:
        return None
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
            "contentType": header(call.headers, "content-type"),
            "bodySize": len(call.body),
        },
        "callbackUrl": call.callback_url,
    }
