"""Cancelling async calls, listing dead letters, and queueing a failed call again."""

import time
from collections.abc import Mapping

import orjson
from aiohttp import web

from faas_gateway.core.call import QueuedCall
from faas_gateway.core.functions import Registry
from faas_gateway.core.headers import CALL_ID
from faas_gateway.nats.activations import (
    CANCELLED,
    FAILED,
    Activation,
    ActivationStore,
    RecordConflictError,
)
from faas_gateway.nats.cancellations import Cancellations
from faas_gateway.nats.dead_letters import DeadLetters
from gateway.errors import ConflictError, QueueUnavailableError
from gateway.handlers.activations import parse_function_param, parse_limit_param, valid_call_id
from gateway.queue import GatewayQueue
from gateway.request import new_call_id, resolve_function
from gateway.responses import location_of


class Reliability:
    def __init__(
        self,
        registry: Registry,
        queue: GatewayQueue,
        records: ActivationStore,
        dead_letters: DeadLetters,
        cancellations: Cancellations,
    ) -> None:
        self._registry = registry
        self._queue = queue
        self._records = records
        self._dead_letters = dead_letters
        self._cancellations = cancellations

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        """DELETE /async-function/{callId}: a queued call never runs, a running one is
        stopped; 202 and ``{"callId", "status"}``. 404 for an unknown id, 409 once it has
        finished; a call cancelled before is cancelled again (202), as DELETE is idempotent."""
        call_id = valid_call_id(request.match_info["call_id"])
        await self._record_cancelled(call_id)
        await self._cancellations.cancel(call_id)  # stops it where it runs
        response = web.Response(
            status=202,
            body=orjson.dumps(
                {"callId": call_id, "status": CANCELLED}, option=orjson.OPT_APPEND_NEWLINE
            ),
            content_type="application/json",
        )
        response.headers[CALL_ID] = call_id
        response.headers["Location"] = location_of(call_id)
        return response

    async def _record_cancelled(self, call_id: str) -> None:
        """The record says cancelled, written over the revision read (a worker that writes
        the call's state meanwhile makes this read it again, and its own write lose)."""
        for _ in range(5):
            stored = await self._records.find(call_id)
            activation = Activation.from_stored(stored)
            if activation.status == CANCELLED:
                return
            if activation.is_final:
                raise ConflictError(f"call {call_id!r} has finished already ({activation.status})")
            activation.cancel()
            try:
                await self._records.put(activation, stored.inline_body)
                return
            except RecordConflictError:
                continue
        raise QueueUnavailableError(f"call {call_id!r} changed too often to cancel; try again")

    async def dead_letters(self, request: web.Request) -> web.StreamResponse:
        """GET /system/dead-letters?function=&limit=: newest first."""
        function, limit = parse_dead_letter_query(request.rel_url.query)
        found = await self._dead_letters.newest(function, limit)
        return web.Response(
            body=orjson.dumps(found, option=orjson.OPT_APPEND_NEWLINE),
            content_type="application/json",
        )

    async def retry(self, request: web.Request) -> web.StreamResponse:
        """POST /system/activations/{callId}/retry: a failed call queued again under a new id."""
        call_id = valid_call_id(request.match_info["call_id"])
        stored = await self._records.find(call_id)
        status = stored.record.get("status")
        if status != FAILED:
            raise ConflictError(f"only a failed call can be retried; {call_id!r} is {status}")
        original = await self._dead_letters.get(call_id)
        if original is None:
            raise ConflictError(
                f"no dead letter is kept for {call_id!r} (they expire after dead_letter_retention)"
            )
        function = resolve_function(self._registry, original.function)
        again = QueuedCall(
            call_id=new_call_id(),
            function=function.name,
            method=original.method,
            path=original.path,
            query=original.query,
            headers=original.headers,
            body=original.body,
            callback_url=original.callback_url,
            accepted_at_ns=time.time_ns(),
            retry_of=call_id,
        )
        await self._queue.enqueue(again, function.queue)
        response = web.Response(
            status=202,
            body=orjson.dumps(
                {"callId": again.call_id, "retryOf": call_id}, option=orjson.OPT_APPEND_NEWLINE
            ),
            content_type="application/json",
        )
        response.headers[CALL_ID] = again.call_id
        response.headers["Location"] = location_of(again.call_id)
        return response


def parse_dead_letter_query(params: Mapping[str, str]) -> tuple[str | None, int]:
    return parse_function_param(params), parse_limit_param(params)
