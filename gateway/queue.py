"""The gateway's side of the queue: its NATS link, set up in the background, and enqueueing.

Sync calls never wait for NATS: ``start`` waits at most ``startup_wait_s`` and the link goes on
connecting after that. Async calls get QueueNotReadyError (503) until the link is connected
and every stream and bucket is in place (faas_gateway/nats/provision.py).

A call is recorded before it is queued (``enqueue``): the record's create, which succeeds only
for a new call id, is what makes a call id one call's. Posted again, the same request is the
same call (queued once); another request with a used id is CallIdTakenError (409), and nothing
is queued or overwritten.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import nats.errors

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
    queued_at_ns,
)
from faas_gateway.nats.auth import redact_url
from faas_gateway.nats.buckets import BucketWatch
from faas_gateway.nats.function_store import FunctionWatch
from faas_gateway.nats.link import NatsLink, NatsUnavailableError, retry_until_answers
from faas_gateway.nats.provision import (
    Plan,
    StreamConfigConflictError,
    StreamLimits,
    ensure_all,
)
from faas_gateway.runtime.logs import call_context

log = logging.getLogger("faas.gateway")

# Room kept for the envelope (call metadata and request headers) when the body limit is
# derived from the server's max_payload.
ENVELOPE_RESERVE_BYTES = 64 * 1024
FUNCTIONS_SYNC_WAIT_S = 2.0


class QueueError(Exception):
    """The queue did not take a call; gateway/errors.py says what the client is told."""


class QueueNotReadyError(QueueError):
    """Not connected to NATS, or the streams are not set up (yet, or any more)."""


class EnqueueUncertainError(QueueError):
    """No ack in time: the call may have reached the queue or not. Posting it again with the
    same X-Call-Id is safe (it is the same call)."""


class QueueFullError(QueueError):
    """The queue is at a limit and refuses new calls until workers make room."""

    def __init__(self, limit: str) -> None:
        super().__init__(f"the async queue is full ({limit}); try again later")


class MessageTooLargeError(QueueError):
    pass


class CallIdTakenError(QueueError):
    """The call id names another call: another function, method, path, query, body or
    callback URL."""

    def __init__(self, call_id: str) -> None:
        super().__init__(
            f"{CALL_ID} {call_id!r} is used by another call; a call id may be posted again "
            "only with the same function, method, path, query, body and callback URL"
        )


class GatewayQueue:
    def __init__(
        self,
        link: NatsLink,
        plan: Plan,
        records: ActivationStore | None,
        watch: FunctionWatch,
        *,
        publish_timeout_s: float,
        startup_wait_s: float,
        max_async_body_bytes: int | None,
        duplicate_window_s: float,
        nats_url: str,
        watches: Sequence[BucketWatch[Any]] = (),
    ) -> None:
        self._link = link
        self._plan = plan
        self._records = records  # None: record_activations off (benchmarks only)
        self._watch = watch
        # Other buckets this process keeps a copy of (the triggers, rules and feeds), started
        # and restarted with the functions' watch.
        self._watches = tuple(watches)
        self._publish_timeout_s = publish_timeout_s
        self._startup_wait_s = startup_wait_s
        self._max_async_body_bytes = max_async_body_bytes
        self._duplicate_window_s = duplicate_window_s
        self._nats_url = nats_url
        link.on_reconnected.append(self._on_reconnected)
        link.on_disconnected.append(self._on_disconnected)
        self._ready = asyncio.Event()
        self._problem: str | None = "not connected yet"
        self._connect_task: asyncio.Task[None] | None = None
        self._provisioning = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()

    # lifecycle

    async def start(self) -> None:
        """Connect and set everything up, waiting at most ``startup_wait_s``.

        A stream that exists with a conflicting config stops start-up; NATS being down does not.
        """
        self._connect_task = asyncio.create_task(self._connect(), name="nats-connect")
        ready = asyncio.create_task(self._ready.wait())
        done, _ = await asyncio.wait(
            {self._connect_task, ready},
            timeout=self._startup_wait_s,
            return_when=asyncio.FIRST_COMPLETED,
        )
        ready.cancel()
        if self._connect_task in done:
            self._connect_task.result()  # raises StreamConfigConflictError
        elif not self._ready.is_set():
            log.warning(
                "NATS at %s not reachable yet; serving sync calls, async calls get 503 until it is",
                redact_url(self._nats_url),
            )

    async def close(self) -> None:
        for task in [self._connect_task, *self._background]:
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._watch.close()
        for watch in self._watches:
            await watch.close()
        await self._link.close()

    async def _connect(self) -> None:
        await self._link.connect()
        await self._provision_until_ready()

    async def _provision_until_ready(self) -> None:
        def note(exc: Exception) -> None:
            self._problem = f"stream setup failed: {exc}"

        await retry_until_answers(
            self._provision, f"stream {self._plan.names.stream}", note, max_wait_s=5.0
        )

    async def _provision(self) -> None:
        async with self._provisioning:
            await ensure_all(self._link.js, self._plan)
            if not self._watch.synced.is_set():
                # Async calls for functions deployed through the API should not get 404
                # just after start-up; bounded, so a broken bucket cannot keep the queue shut.
                self._watch.start()
                for watch in self._watches:
                    watch.start()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._all_synced(), FUNCTIONS_SYNC_WAIT_S)
            self._problem = None
            self._ready.set()

    async def _all_synced(self) -> None:
        for watch in (self._watch, *self._watches):
            await watch.synced.wait()

    async def _on_disconnected(self) -> None:
        self._ready.clear()
        self._problem = "disconnected from NATS"

    async def _on_reconnected(self) -> None:
        # A server restarted on an empty store has no streams; make them again at once.
        self._provision_in_background()
        self._watch.restart()
        for watch in self._watches:
            watch.restart()

    def _provision_in_background(self) -> None:
        task = asyncio.create_task(self._provision_after_reconnect(), name="nats-provision")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _provision_after_reconnect(self) -> None:
        try:
            await self._provision_until_ready()
        except StreamConfigConflictError as exc:
            self._problem = str(exc)
            log.error("%s", exc)

    # state

    @property
    def is_ready(self) -> bool:
        return self._link.connected and self._ready.is_set()

    async def wait_until_ready(self) -> None:
        """Until connected, with every stream and bucket in place."""
        while not self.is_ready:
            await self._ready.wait()
            if not self._link.connected:
                await asyncio.sleep(0.1)

    def raise_unless_ready(self) -> None:
        if not self.is_ready:
            raise QueueNotReadyError(f"the queue is unavailable: {self.problem()}")

    def problem(self) -> str:
        if not self._link.connected:
            return "not connected to NATS"
        return self._problem or "stream not ready"

    def max_body_bytes(self) -> int:
        if self._max_async_body_bytes is not None:
            return self._max_async_body_bytes
        return max(0, self._link.max_payload - ENVELOPE_RESERVE_BYTES)

    async def health(self) -> tuple[bool, dict[str, Any]]:
        stream = self._plan.names.stream
        details: dict[str, Any] = {
            "nats": "connected" if self._link.connected else "disconnected",
            "stream": stream,
        }
        if not self.is_ready:
            details["problem"] = self.problem()
            return False, details
        try:
            info = await self._link.js.stream_info(stream)
        except (TimeoutError, NatsUnavailableError, nats.errors.Error) as exc:
            details["problem"] = f"stream check failed: {type(exc).__name__}"
            return False, details
        details["messages"] = info.state.messages
        return True, details

    # enqueueing

    async def enqueue(self, queued: QueuedCall, queue: str) -> None:
        """Record the call, then queue it on ``queue`` (without records: only queue it)."""
        subject = self._plan.names.subject_for(queue, queued.function)
        if self._records is None:
            await self.publish(subject, queued.encode(), queued.call_id)
            return
        self.raise_unless_ready()
        context = call_context(queued.call_id, queued.function)
        activation = Activation.queued(queued)
        try:
            await self._records.create(activation)
        except ActivationExistsError as exc:
            await self._posted_again(queued, subject, exc.stored)
            return
        try:
            await self.publish(subject, queued.encode(), queued.call_id)
        except EnqueueUncertainError:
            raise  # perhaps queued: the record stays, and a re-post completes the call
        except QueueError:
            # Not queued: free the call id, so the client can post the same call again.
            try:
                await self._records.delete(activation)
            except (ActivationStoreError, RecordConflictError) as exc:
                log.warning("record of a call not queued left: %s", exc, extra=context)
            raise
        log.debug("queued", extra=context)

    async def _posted_again(
        self, queued: QueuedCall, subject: str, stored: StoredActivation | None
    ) -> None:
        call_id = queued.call_id
        if stored is None or stored.record.get("requestDigest") != queued.request_digest():
            raise CallIdTakenError(call_id)
        record = stored.record
        queued_for_s = (time.time_ns() - queued_at_ns(stored)) / 1e9
        if (
            record.get("status") == QUEUED
            and not record.get("attempts")
            and queued_for_s < self._duplicate_window_s
        ):
            # Its first post may have failed after the record was written: queue it again
            # under the same message id, which JetStream drops if the first one got there.
            await self.publish(subject, queued.encode(), call_id)
        log.debug("posted again: the same call", extra=call_context(call_id, queued.function))

    async def publish(
        self,
        subject: str,
        payload: bytes,
        msg_id: str,
        *,
        stream: tuple[str, StreamLimits] | None = None,
    ) -> bool:
        """Publish and wait for JetStream's ack; True when JetStream took it as a duplicate
        of a message within the duplicate window. Anything short of an ack is a QueueError.
        ``stream``: the name and limits of the stream ``subject`` goes to, for the messages
        of errors, when it is not the queue (the fire stream)."""
        self.raise_unless_ready()
        try:
            ack = await self._link.acks.publish(
                subject, payload, self._publish_timeout_s, headers={NATS_MSG_ID: msg_id}
            )
        except nats.errors.MaxPayloadError as exc:
            raise MessageTooLargeError(
                f"the request is larger than one queued message can hold "
                f"({self._link.max_payload} bytes with its headers)"
            ) from exc
        except jetstream.NoStreamError as exc:
            self._ready.clear()
            self._provision_in_background()
            raise QueueNotReadyError("the queue is unavailable: stream missing") from exc
        except jetstream.PublishRejectedError as exc:
            if jetstream.is_storage_full(exc.err_code):
                raise QueueFullError(self._full_limit(exc, stream)) from exc
            raise QueueNotReadyError(f"the queue refused the request: {exc.description}") from exc
        except (TimeoutError, NatsUnavailableError, nats.errors.Error) as exc:
            raise EnqueueUncertainError(
                f"the queue did not confirm the request in time ({type(exc).__name__}); "
                f"post it again with the same {CALL_ID}"
            ) from exc
        return jetstream.ack_is_duplicate(ack)

    def _full_limit(
        self, exc: jetstream.PublishRejectedError, stream: tuple[str, StreamLimits] | None
    ) -> str:
        name, limits = stream or (self._plan.names.stream, self._plan.queue_limits)
        if exc.err_code == jetstream.INSUFFICIENT_RESOURCES:
            return f"NATS has no storage left for stream {name}"
        if "bytes" in exc.description:
            return f"max_bytes {limits.max_bytes} of stream {name}"
        return f"{exc.description} on stream {name}"  # a limit set outside our settings
