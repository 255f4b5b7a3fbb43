"""JetStream helpers both processes use: acked publishing, batched direct gets, reading a stream
backwards, what a delivery's reply subject says, key-value handles, and the error codes."""

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

log = logging.getLogger("faas.nats")

CONNECT_TIMEOUT_S = 2


class Handoff:
    """Given to nats-py's ``subscribe`` as its ``future``: nats-py then hands each message of
    that subscription to ``set_result`` from its read loop, as it parses it.

    A subscription with a callback puts every message on a queue that a task of its own
    empties, and ``next_msg`` starts a task and a timer per message; on paths taken for every
    call (publish acks, batched reads, fetched calls) those were a tenth of the queue-worker's
    CPU. ``deliver`` runs inside the read loop: it must be quick and must not raise.
    """

    __slots__ = ("_deliver",)

    def __init__(self, deliver: Callable[[Msg], None]) -> None:
        self._deliver = deliver

    def cancelled(self) -> bool:
        return False  # nats-py's check before handing over

    def set_result(self, msg: Msg) -> None:
        try:
            self._deliver(msg)
        except Exception:  # an error here would end nats-py's read loop
            log.exception("handling a message on %s failed", msg.subject)


async def subscribe_handoff(
    client: NatsClient, subject: str, deliver: Callable[[Msg], None]
) -> Subscription:
    """Subscribe with ``deliver`` called for each message as it is read (see Handoff)."""
    handoff: Any = Handoff(deliver)
    return await client.subscribe(subject, future=handoff)


async def direct_get_batch(
    client: NatsClient, stream: str, request: dict[str, Any], timeout_s: float
) -> list[Msg]:
    """A batched direct get (NATS 2.11+): the messages the server sends until end of batch.

    ``request`` is JetStream's: ``{"seq": N, "batch": K, "next_by_subj": ...}`` for K messages
    from sequence N, or ``{"multi_last": [subjects]}`` for the last message of each subject.
    """
    loop = asyncio.get_running_loop()
    messages: list[Msg] = []
    done: asyncio.Future[None] = loop.create_future()

    def take(msg: Msg) -> None:
        if done.done():
            return
        status = (msg.headers or {}).get("Status")
        if status is None:
            messages.append(msg)
        elif status in ("204", "404"):  # end of batch; nothing matched
            done.set_result(None)
        else:
            description = (msg.headers or {}).get("Description", "")
            done.set_exception(nats.errors.Error(f"direct get on {stream}: {status} {description}"))

    subscription = await subscribe_handoff(client, client.new_inbox(), take)
    expiry = loop.call_later(timeout_s, _expire_batch, done)
    try:
        await client.publish(
            f"$JS.API.DIRECT.GET.{stream}", json.dumps(request).encode(), reply=subscription.subject
        )
        await done
        return messages
    finally:
        expiry.cancel()
        with contextlib.suppress(nats.errors.Error):
            await subscription.unsubscribe()


# JetStream's err_code values (checked against nats-server 2.15):
# a publish to a stream at its max_bytes or max_msgs with discard new (503, "maximum bytes
# exceeded" / "maximum messages exceeded"),
STREAM_STORE_FAILED = 10077
# a publish when the server's own JetStream storage (max_file_store) is used up (503),
INSUFFICIENT_RESOURCES = 10023
# and a stream whose max_bytes the server cannot reserve, at create or update (500).
STORAGE_RESOURCES_EXCEEDED = 10047


def is_storage_full(err_code: int | None) -> bool:
    """Whether a refused write means "no room now" (a limit reached), which passes as the
    stream is consumed or expires, rather than a fault."""
    return err_code in (STREAM_STORE_FAILED, INSUFFICIENT_RESOURCES)


# JetStream's answers to a write whose Nats-Expected-Last-Subject-Sequence does not hold: the
# stream's "wrong last sequence" (10071) and the key-value form of it (10164).
WRONG_LAST_SEQUENCE_CODES = frozenset({10071, 10164})


class PublishRejectedError(nats.errors.Error):
    """JetStream answered a publish with an error (code and JetStream err_code)."""

    def __init__(self, code: int, err_code: int, description: str) -> None:
        super().__init__(f"{code} ({err_code}): {description}")
        self.code = code
        self.err_code = err_code
        self.description = description


class NoStreamError(nats.errors.Error):
    """Nothing answered a publish: no stream takes that subject (or it is being created)."""


class AckedPublisher:
    """Publishes to JetStream and awaits the ack, for paths taken once or more per call.

    nats-py's ``js.publish`` costs a random token (a system call), ``asyncio.wait_for`` and a
    parsed PubAck dataclass per message; this keeps one reply subscription and a counter,
    and reads of the ack only what the callers use. Same wire protocol, same guarantees.
    """

    def __init__(self, client: NatsClient) -> None:
        self._client = client
        self._prefix = ""
        self._subscription: Any = None
        self._waiting: dict[str, asyncio.Future[bytes]] = {}
        self._next_token = 0

    async def start(self) -> None:
        self._prefix = self._client.new_inbox() + "."
        self._subscription = await subscribe_handoff(
            self._client, self._prefix + "*", self._on_reply
        )

    async def publish(
        self,
        subject: str,
        payload: bytes,
        timeout_s: float,
        headers: dict[str, str] | None = None,
    ) -> bytes:
        """The ack's JSON; PublishRejectedError, NoStreamError, TimeoutError or nats errors."""
        if self._subscription is None:
            await self.start()
        self._next_token += 1
        token = str(self._next_token)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        self._waiting[token] = future
        expiry = loop.call_later(timeout_s, _expire, future)
        try:
            await self._client.publish(
                subject, payload, reply=self._prefix + token, headers=headers
            )
            ack = await future
        finally:
            expiry.cancel()
            self._waiting.pop(token, None)
        if b'"error"' in ack:  # rare; parsed only then
            error = json.loads(ack).get("error")
            if isinstance(error, dict):
                raise PublishRejectedError(
                    int(error.get("code", 0)),
                    int(error.get("err_code", 0)),
                    str(error.get("description", "")),
                )
        return ack

    def _on_reply(self, msg: Msg) -> None:
        future = self._waiting.get(msg.subject[len(self._prefix) :])
        if future is None or future.done():
            return
        if not msg.data and msg.headers and msg.headers.get("Status") == "503":
            future.set_exception(NoStreamError(f"no stream answered on {msg.subject}"))
        else:
            future.set_result(msg.data)


def _expire(future: "asyncio.Future[bytes]") -> None:
    if not future.done():
        future.set_exception(TimeoutError("no ack from JetStream in time"))


def _expire_batch(future: "asyncio.Future[None]") -> None:
    if not future.done():
        future.set_exception(nats.errors.TimeoutError())  # what next_msg raised before


def key_value(js: JetStreamContext, bucket: str) -> KeyValue:
    """A handle on an existing bucket (provision.py makes them), without nats-py's lookup
    request that ``js.key_value`` makes every time."""
    handle: KeyValue = KeyValue(
        name=bucket, stream=f"KV_{bucket}", pre=f"$KV.{bucket}.", js=js, direct=False
    )
    return handle


def ack_is_duplicate(ack: bytes) -> bool:
    """Whether JetStream took a publish as a duplicate of one within its duplicate window.
    nats-server writes it ``"duplicate": true``, with a space; parsed only when present."""
    if b'"duplicate"' not in ack:
        return False
    try:
        return json.loads(ack).get("duplicate") is True
    except (ValueError, AttributeError):
        return False


async def read_backwards(
    client: NatsClient,
    js: JetStreamContext,
    stream: str,
    subject: str | None = None,
    first_window: int = 64,
    largest_window: int = 4096,
    max_scanned: int = 100_000,
    timeout_s: float = 5.0,
) -> AsyncIterator[list[Msg]]:
    """A stream's messages newest first, in batches: one batched direct get per window of
    sequence numbers, each window twice the last (up to ``largest_window``), until the
    stream's start or ``max_scanned`` sequence numbers. ``subject`` filters (a subject or
    wildcard). The caller stops iterating once it has what it wants."""
    state = (await js.stream_info(stream)).state
    if not state.messages:
        return
    first_seq, end_seq = state.first_seq, state.last_seq
    window, scanned = first_window, 0
    while end_seq >= first_seq and scanned < max_scanned:
        start_seq = max(first_seq, end_seq - window + 1)
        request: dict[str, Any] = {"seq": start_seq, "batch": end_seq - start_seq + 1}
        if subject is not None:
            request["next_by_subj"] = subject
        messages = await direct_get_batch(client, stream, request, timeout_s)
        in_window = [msg for msg in messages if message_sequence(msg) <= end_seq]
        yield in_window[::-1]
        scanned += end_seq - start_seq + 1
        end_seq = start_seq - 1
        window = min(2 * window, largest_window)


def message_sequence(msg: Msg) -> int:
    return int((msg.headers or {}).get("Nats-Sequence", 0))


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message as a pull consumer handed it over, with what its reply subject says.

    The reply subject is ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer
    seq>.<published ns>.<pending>``, or with ``<domain>.<account hash>`` after ACK and a token
    at the end. Read once here: nats-py's ``msg.metadata`` parses all of it into objects.
    """

    msg: Msg
    count: int  # how many times JetStream has delivered it, this time included
    sequence: int  # its sequence in the stream: the same for every redelivery
    published_ns: int | None  # when JetStream stored it (the server's clock)

    @classmethod
    def from_msg(cls, msg: Msg) -> "Delivery":
        tokens = msg.reply.split(".") if msg.reply else []
        try:
            if len(tokens) == 9:
                return cls(msg, int(tokens[4]), int(tokens[5]), int(tokens[7]))
            if len(tokens) >= 11:
                return cls(msg, int(tokens[6]), int(tokens[7]), int(tokens[9]))
        except ValueError:
            pass
        return cls(msg, 1, 0, None)
