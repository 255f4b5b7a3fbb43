"""Async invocation: validate, read the body within the limit, enqueue durably, answer 202."""

import logging
import time

from aiohttp import web

from faas_common.activations import (
    QUEUED,
    Activation,
    ActivationExistsError,
    ActivationStoreError,
    RecordConflictError,
    StoredActivation,
    queued_at_ns,
)
from faas_common.headers import CALL_ID, CALLBACK_URL
from faas_common.logs import call_context
from faas_common.message import QueuedCall
from faas_common.registry import Registry
from gateway.activation_api import location_of, result_response, unfinished_response
from gateway.activations import ActivationQueries
from gateway.callback_urls import CallbackUrls
from gateway.calls import CallContext
from gateway.errors import (
    ConflictError,
    GatewayError,
    MethodNotAllowedError,
    PayloadTooLargeError,
    QueueUnavailableError,
    QueueUncertainError,
)
from gateway.metrics import UNKNOWN_FUNCTION, GatewayMetrics
from gateway.prefer import PREFER, PREFERENCE_APPLIED, parse_prefer, wait_applied
from gateway.publisher import Publisher
from gateway.routing import forwarded_headers, raw_subpath, resolve_function
from gateway.settings import GatewaySettings

log = logging.getLogger("faas.gateway")

# Headers that describe the client's connection to us, not the call; the worker sets its own.
HEADERS_NOT_QUEUED = frozenset({"host", "content-length", "expect"})


class AsyncInvoker:
    def __init__(
        self,
        settings: GatewaySettings,
        registry: Registry,
        publisher: Publisher,
        queries: ActivationQueries,
        callback_urls: CallbackUrls,
        metrics: GatewayMetrics,
        strip_authorization: bool = False,
    ) -> None:
        # With basic_auth_invocations the client's Authorization is the gateway's credential:
        # it must never reach a function, the stream or a dead letter.
        self._not_queued = HEADERS_NOT_QUEUED | (
            {"authorization"} if strip_authorization else frozenset()
        )
        self._callback_urls = callback_urls
        self._settings = settings
        self._registry = registry
        self._publisher = publisher
        self._queries = queries
        self._metrics = metrics

    async def handle(self, request: web.Request, call: CallContext) -> web.StreamResponse:
        label = UNKNOWN_FUNCTION
        try:
            if request.method != "POST":
                raise MethodNotAllowedError(
                    "async invocation accepts POST only", headers={"Allow": allowed(request)}
                )
            function = resolve_function(self._registry, request.match_info["name"])
            label = function.name
            callback_url = await self._callback_urls.validate(request.headers.get(CALLBACK_URL))
            self._publisher.raise_unless_ready()
            body = await read_body_within(request, self._publisher.max_body_bytes())
            queued = QueuedCall(
                call_id=call.call_id,
                function=function.name,
                method=request.method,
                path=raw_subpath(request),
                query=request.rel_url.raw_query_string,
                headers=list(forwarded_headers(request, self._not_queued).items()),
                body=body,
                callback_url=callback_url,
                accepted_at_ns=call.start_ns,
            )
            subject = self._settings.subject_for(function.queue, function.name)
            if self._settings.record_activations:
                await self._enqueue_recorded(queued, subject)
            else:
                await self._publisher.publish(subject, queued.encode(), call.call_id)
        except GatewayError as exc:
            self._metrics.observe_async(label, exc.status)
            raise
        self._metrics.observe_async(label, 202)
        prefer = parse_prefer(request.headers.getall(PREFER, []))
        return await self.accepted(call.call_id, function.name, prefer.wait_s)

    async def _enqueue_recorded(self, queued: QueuedCall, subject: str) -> None:
        """Record the call, then queue it: the record's conditional create is what makes a
        call id one call's. Posted again, the same request is the same call (queued once);
        another request with a used id is a 409, and nothing is queued or overwritten."""
        context = call_context(queued.call_id, queued.function)
        store = self._publisher.activations()
        activation = Activation.queued(queued)
        try:
            await store.create(activation)
        except ActivationExistsError as exc:
            await self._posted_again(queued, subject, exc.stored)
            return
        except ActivationStoreError as exc:
            raise QueueUnavailableError(f"the call cannot be recorded now: {exc}") from exc
        try:
            await self._publisher.publish(subject, queued.encode(), queued.call_id)
        except QueueUncertainError:
            raise  # perhaps queued: the record stays, and a re-post completes the call
        except GatewayError:
            # Not queued: free the call id, so the client can post the same call again.
            try:
                await store.delete(activation)
            except (ActivationStoreError, RecordConflictError) as exc:
                log.warning("record of a call not queued left: %s", exc, extra=context)
            raise
        log.debug("queued", extra=context)

    async def _posted_again(
        self, queued: QueuedCall, subject: str, stored: StoredActivation | None
    ) -> None:
        call_id = queued.call_id
        if stored is None or stored.record.get("requestDigest") != queued.request_digest():
            raise ConflictError(
                f"{CALL_ID} {call_id!r} is used by another call; a call id may be posted "
                "again only with the same function, method, path, query, body and callback URL"
            )
        record = stored.record
        queued_for_s = (time.time_ns() - queued_at_ns(stored)) / 1e9
        if (
            record.get("status") == QUEUED
            and not record.get("attempts")
            and queued_for_s < self._settings.duplicate_window_s
        ):
            # Its first post may have failed after the record was written: queue it again
            # under the same message id, which JetStream drops if the first one got there.
            await self._publisher.publish(subject, queued.encode(), call_id)
        log.debug("posted again: the same call", extra=call_context(call_id, queued.function))

    async def accepted(
        self, call_id: str, function: str, wait_s: float | None
    ) -> web.StreamResponse:
        """202 with the call id, or with Prefer: wait=N the result if the call finishes within
        N seconds (capped by max_wait)."""
        if wait_s is not None:
            return await self._wait_for_result(call_id, function, min(wait_s, self._max_wait_s()))
        response = web.json_response({"callId": call_id}, status=202)
        response.headers["Location"] = location_of(call_id)
        return response

    def _max_wait_s(self) -> float:
        return self._settings.max_wait_s

    async def _wait_for_result(
        self, call_id: str, function: str, wait_s: float
    ) -> web.StreamResponse:
        """Prefer: wait=N: the result if the call finishes within N seconds, else a 202."""
        stored = await self._queries.wait_until_final(call_id, function, wait_s)
        if stored is not None and stored.is_final:
            response = await result_response(self._queries, stored)
            response.headers[PREFERENCE_APPLIED] = wait_applied(wait_s)
            return response
        if stored is None:
            response = web.json_response({"callId": call_id}, status=202)
            response.headers["Location"] = location_of(call_id)
            return response
        return unfinished_response(stored)


def allowed(request: web.Request) -> str:
    """What Allow lists: /async-function/{x} also takes DELETE, which cancels call x."""
    return "POST" if "path" in request.match_info else "DELETE, POST"


async def read_body_within(request: web.Request, limit_bytes: int) -> bytes:
    too_large = PayloadTooLargeError(
        f"the request body is larger than {limit_bytes} bytes, the most an async call can carry"
    )
    declared = request.content_length
    if declared is not None and declared > limit_bytes:
        raise too_large
    chunks = []
    received = 0
    async for chunk in request.content.iter_any():
        received += len(chunk)
        if received > limit_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)
