"""The gateway's side of the queue: one NATS connection, the stream, and publishing with ack."""

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from faas_gateway.core.call import QueuedCall
from faas_gateway.core.headers import CALL_ID, NATS_MSG_ID
from faas_gateway.nats import jetstream
from faas_gateway.nats.activations import (
    QUEUED,
    Activation,
    ActivationExistsError,
    ActivationStore,
    ActivationStoreError,
    RecordConflictError,
    StoredActivation,
    ensure_activation_storage,
    queued_at_ns,
)
from faas_gateway.nats.auth import redact_url
from faas_gateway.nats.dead_letters import ensure_dead_letter_stream
from faas_gateway.nats.function_store import FunctionWatch
from faas_gateway.nats.jetstream import PublishRejectedError
from faas_gateway.nats.results import ResultStore
from faas_gateway.runtime.logs import call_context
from gateway.errors import (
    ConflictError,
    GatewayError,
    PayloadTooLargeError,
    QueueUnavailableError,
    QueueUncertainError,
)
from gateway.settings import GatewaySettings

log = logging.getLogger("faas.gateway")

# Room kept for the envelope (call metadata and request headers) when the body limit is
# derived from the server's max_payload.
ENVELOPE_RESERVE_BYTES = 64 * 1024
FUNCTIONS_SYNC_WAIT_S = 2.0
# Retry-After of a 503 for a full queue: long enough for workers to make room, short
# enough that a client is not kept waiting much past it.
QUEUE_FULL_RETRY_AFTER_S = 5


class Publisher:
    """Connects in the background so that sync calls never wait for NATS."""

    def __init__(
        self,
        settings: GatewaySettings,
        watch: FunctionWatch | None = None,
        on_reconnected: Callable[[], None] | None = None,
    ) -> None:
        self._settings = settings
        self._watch = watch
        self._reconnected_hook = on_reconnected
        self._client: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._activations: ActivationStore | None = None
        self._acks: jetstream.AckedPublisher | None = None
        self._stream_ready = asyncio.Event()
        self._stream_problem: str | None = "not connected yet"
        self._connect_task: asyncio.Task[None] | None = None
        self._ensure_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Connect and set up the stream, waiting at most ``nats_startup_wait``.

        A stream that exists with a conflicting config stops start-up; NATS being down does not.
        """
        self._connect_task = asyncio.create_task(self._connect(), name="nats-connect")
        ready = asyncio.create_task(self._stream_ready.wait())
        done, _ = await asyncio.wait(
            {self._connect_task, ready},
            timeout=self._settings.nats_startup_wait_s,
            return_when=asyncio.FIRST_COMPLETED,
        )
        ready.cancel()
        if self._connect_task in done:
            self._connect_task.result()  # raises StreamConfigConflictError
        elif not self._stream_ready.is_set():
            log.warning(
                "NATS at %s not reachable yet; serving sync calls, async calls get 503 until it is",
                redact_url(self._settings.nats_url),
            )

    async def close(self) -> None:
        for task in [self._connect_task, *self._background]:
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._client is not None:
            await jetstream.close_quietly(self._client)

    async def _connect(self) -> None:
        self._client = await jetstream.connect(
            self._settings,
            "faas-gateway",
            buffer_while_reconnecting=False,
            on_reconnected=self._on_reconnected,
            on_disconnected=self._on_disconnected,
        )
        self._js = self._client.jetstream(timeout=self._settings.publish_timeout_s)
        self._acks = jetstream.AckedPublisher(self._client)
        await self._acks.start()
        self._activations = ActivationStore(self._client, self._js, self._acks, self._settings)
        await self._ensure_stream_until_ready()

    async def _ensure_stream_until_ready(self) -> None:
        def note(exc: Exception) -> None:
            self._stream_problem = f"stream setup failed: {exc}"

        await jetstream.retry_until_jetstream_answers(
            self._ensure_stream, f"stream {self._settings.nats_stream}", note, max_wait_s=5.0
        )

    async def _ensure_stream(self) -> None:
        assert self._js is not None
        async with self._ensure_lock:
            await jetstream.ensure_stream(self._js, self._settings)
            await ensure_activation_storage(self._js, self._settings)
            await ensure_dead_letter_stream(self._js, self._settings)
            if self._watch is not None and not self._watch.synced.is_set():
                # Async calls for functions deployed through the API should not get 404
                # just after start-up; bounded, so a broken bucket cannot keep the queue shut.
                self._watch.start(self._js)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._watch.synced.wait(), FUNCTIONS_SYNC_WAIT_S)
            self._stream_problem = None
            self._stream_ready.set()

    async def _on_disconnected(self) -> None:
        self._stream_ready.clear()
        self._stream_problem = "disconnected from NATS"

    async def _on_reconnected(self) -> None:
        if self._reconnected_hook is not None:
            self._reconnected_hook()
        # A server restarted on an empty store has no stream; create it again at once.
        self._ensure_in_background()
        if self._watch is not None:
            self._watch.restart()

    def _ensure_in_background(self) -> None:
        task = asyncio.create_task(self._ensure_after_reconnect(), name="nats-ensure-stream")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _ensure_after_reconnect(self) -> None:
        try:
            await self._ensure_stream_until_ready()
        except jetstream.StreamConfigConflictError as exc:
            self._stream_problem = str(exc)
            log.error("%s", exc)

    @property
    def is_ready(self) -> bool:
        return (
            self._client is not None and self._client.is_connected and self._stream_ready.is_set()
        )

    def raise_unless_ready(self) -> None:
        if not self.is_ready:
            raise QueueUnavailableError(f"the queue is unavailable: {self.problem()}")

    def activations(self) -> ActivationStore:
        """The activation records, or QueueUnavailableError (503) while NATS is not ready."""
        self.raise_unless_ready()
        assert self._activations is not None
        return self._activations

    def results(self) -> ResultStore:
        """Where bodies too large to hold go; usable while NATS is away (writes fail then)."""
        assert self._activations is not None, "not connected yet"
        return self._activations.results

    def client(self) -> NatsClient:
        self.raise_unless_ready()
        assert self._client is not None
        return self._client

    def jetstream(self) -> JetStreamContext:
        self.raise_unless_ready()
        assert self._js is not None
        return self._js

    async def enqueue(self, queued: QueuedCall, subject: str) -> None:
        """Record the call and queue it (see _enqueue_recorded); without records, queue it."""
        if self._settings.record_activations:
            await self._enqueue_recorded(queued, subject)
        else:
            await self.publish(subject, queued.encode(), queued.call_id)

    async def _enqueue_recorded(self, queued: QueuedCall, subject: str) -> None:
        """Record the call, then queue it: the record's conditional create is what makes a
        call id one call's. Posted again, the same request is the same call (queued once);
        another request with a used id is a 409, and nothing is queued or overwritten."""
        context = call_context(queued.call_id, queued.function)
        store = self.activations()
        activation = Activation.queued(queued)
        try:
            await store.create(activation)
        except ActivationExistsError as exc:
            await self._posted_again(queued, subject, exc.stored)
            return
        except ActivationStoreError as exc:
            raise QueueUnavailableError(f"the call cannot be recorded now: {exc}") from exc
        try:
            await self.publish(subject, queued.encode(), queued.call_id)
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
            await self.publish(subject, queued.encode(), call_id)
        log.debug("posted again: the same call", extra=call_context(call_id, queued.function))

    def max_body_bytes(self) -> int:
        if self._settings.max_async_body_bytes is not None:
            return self._settings.max_async_body_bytes
        max_payload = self._client.max_payload if self._client is not None else 1024 * 1024
        return max(0, max_payload - ENVELOPE_RESERVE_BYTES)

    async def publish(self, subject: str, payload: bytes, msg_id: str) -> bool:
        """Publish and wait for JetStream's ack; anything short of an ack is QueueUnavailable.

        True when JetStream took it as a duplicate of a message within the duplicate window.
        """
        self.raise_unless_ready()
        assert self._acks is not None
        try:
            ack = await self._acks.publish(
                subject,
                payload,
                self._settings.publish_timeout_s,
                headers={NATS_MSG_ID: msg_id},
            )
        except nats.errors.MaxPayloadError as exc:
            raise PayloadTooLargeError(
                f"the request is larger than one queued message can hold "
                f"({self._client.max_payload if self._client else '?'} bytes with its headers)"
            ) from exc
        except jetstream.NoStreamError as exc:
            self._stream_ready.clear()
            self._ensure_in_background()
            raise QueueUnavailableError("the queue is unavailable: stream missing") from exc
        except jetstream.PublishRejectedError as exc:
            if jetstream.is_storage_full(exc.err_code):
                raise self._queue_full(exc) from exc
            raise QueueUnavailableError(
                f"the queue refused the request: {exc.description}"
            ) from exc
        except (TimeoutError, nats.errors.Error) as exc:
            raise QueueUncertainError(
                f"the queue did not confirm the request in time ({type(exc).__name__}); "
                f"post it again with the same {CALL_ID}"
            ) from exc
        return jetstream.ack_is_duplicate(ack)

    def _queue_full(self, exc: PublishRejectedError) -> QueueUnavailableError:
        """503 with Retry-After: the queue takes calls again as workers finish them."""
        stream = self._settings.nats_stream
        if exc.err_code == jetstream.INSUFFICIENT_RESOURCES:
            limit = f"NATS has no storage left for stream {stream}"
        elif "bytes" in exc.description:
            limit = f"max_bytes {self._settings.async_queue_max_bytes} of stream {stream}"
        else:  # a limit set on the stream outside our settings (max_msgs, ...)
            limit = f"{exc.description} on stream {stream}"
        return QueueUnavailableError(
            f"the async queue is full ({limit}); try again later",
            headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)},
        )

    def problem(self) -> str:
        if self._client is None or not self._client.is_connected:
            return "not connected to NATS"
        return self._stream_problem or "stream not ready"

    async def health(self) -> tuple[bool, dict[str, Any]]:
        details: dict[str, Any] = {
            "nats": "connected" if self._client and self._client.is_connected else "disconnected",
            "stream": self._settings.nats_stream,
        }
        if not self.is_ready or self._js is None:
            details["problem"] = self.problem()
            return False, details
        try:
            info = await self._js.stream_info(self._settings.nats_stream)
        except (TimeoutError, nats.errors.Error) as exc:
            details["problem"] = f"stream check failed: {type(exc).__name__}"
            return False, details
        details["messages"] = info.state.messages
        return True, details
