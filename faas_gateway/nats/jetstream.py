"""NATS connection and the async-call stream, set up the same way by whichever process is first."""

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
)
from nats.js.errors import APIError, BadRequestError, NotFoundError
from nats.js.kv import KeyValue

from faas_gateway.nats.auth import (
    NatsCredentialsError,
    connect_options,
    redact_url,
    server_urls,
    tls_configured,
)
from faas_gateway.runtime.settings import CommonSettings

log = logging.getLogger("faas.nats")

CONNECT_TIMEOUT_S = 2


class StreamConfigConflictError(RuntimeError):
    """The stream exists with settings we cannot use; starting anyway would lose or mix work."""


class StorageLimitError(StreamConfigConflictError):
    """NATS cannot set aside the bytes a size limit asks for; waiting cannot fix that."""


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


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """What a stream may hold, kept current at every start, on streams that older versions
    made without limits too. ``setting`` names the size setting, for error messages."""

    max_bytes: int
    discard: DiscardPolicy
    max_age_s: float
    setting: str

    def changes(self, config: StreamConfig) -> dict[str, Any]:
        """The fields of ``config`` that differ from these limits, for StreamConfig.evolve."""
        changes: dict[str, Any] = {}
        if config.max_bytes != self.max_bytes:
            changes["max_bytes"] = self.max_bytes
        if config.discard != self.discard:
            changes["discard"] = self.discard
        if abs((config.max_age or 0) - self.max_age_s) > 1e-3:
            changes["max_age"] = self.max_age_s
        return changes

    def apply(self, config: StreamConfig) -> StreamConfig:
        return config.evolve(max_bytes=self.max_bytes, discard=self.discard, max_age=self.max_age_s)

    def refused(self, stream: str, exc: APIError) -> Exception:
        """StorageLimitError when the server cannot reserve max_bytes; else ``exc``."""
        if exc.err_code != STORAGE_RESOURCES_EXCEEDED:
            return exc
        return StorageLimitError(
            f"NATS cannot set aside {self.max_bytes} bytes for stream {stream!r} "
            f"({self.setting}): its JetStream storage (max_file_store) is smaller than the "
            f"limits of all its streams together. Lower {self.setting} or give NATS more storage."
        )


async def keep_limits(
    js: JetStreamContext,
    stream: str,
    limits: StreamLimits,
    info: StreamInfo | None = None,
    **also: Any,
) -> None:
    """Bring an existing stream's size limit, discard policy and max_age to ``limits`` (and
    the fields in ``also`` to theirs), in one update.

    Lowering max_bytes below what a discard-new stream holds drops nothing (checked on
    nats-server 2.15): it refuses new messages until it is under the limit again.
    """
    if info is None:
        info = await js.stream_info(stream)
    changes = limits.changes(info.config)
    for key, value in also.items():
        if getattr(info.config, key) != value:
            changes[key] = value
    if not changes:
        return
    log.info(
        "stream %s: %s",
        stream,
        ", ".join(
            f"{key} {_value(getattr(info.config, key))} -> {_value(value)}"
            for key, value in changes.items()
        ),
    )
    try:
        await js.update_stream(info.config.evolve(**changes))
    except APIError as exc:
        raise limits.refused(stream, exc) from exc


async def ensure_limited_stream(
    js: JetStreamContext, config: StreamConfig, limits: StreamLimits
) -> None:
    """Create the stream with ``config`` and ``limits`` if it is missing; one that exists is
    used as it is, except that its limits are kept current."""
    assert config.name is not None
    try:
        info = await js.stream_info(config.name)
    except NotFoundError:
        try:
            await js.add_stream(limits.apply(config))
            return
        except BadRequestError:
            info = await js.stream_info(config.name)  # another process made it first
        except APIError as exc:
            raise limits.refused(config.name, exc) from exc
    await keep_limits(js, config.name, limits, info)


async def connect(
    settings: CommonSettings,
    client_name: str,
    *,
    buffer_while_reconnecting: bool = True,
    on_reconnected: Callable[[], Awaitable[None]] | None = None,
    on_disconnected: Callable[[], Awaitable[None]] | None = None,
) -> NatsClient:
    """Connect, retrying forever, and keep reconnecting for the life of the process.

    Credentials and TLS come from the settings (faas_gateway.nats.auth.connect_options);
    NatsCredentialsError when a file they name cannot be read, or when TLS is configured and
    the server does not require it.

    ``buffer_while_reconnecting=False`` makes publishes fail at once while disconnected instead
    of being held and sent after a reconnect; the gateway needs that so a request it answered
    with 503 is never enqueued later.
    """

    refusal_reported = False

    async def error_cb(exc: Exception) -> None:
        nonlocal refusal_reported
        text = str(exc).lower()
        if "authorization violation" in text or "authentication" in text:
            # Retried like any other failure to connect, but said once where it shows.
            if not refusal_reported:
                log.error(
                    "NATS refused the credentials of this process (%s); check nats_user, "
                    "nats_password, nats_token, nats_nkey_seed_file or nats_creds_file",
                    exc,
                )
            refusal_reported = True
        elif "permissions violation" in text:
            log.error("NATS denied a subject this process uses: %s", exc)
        else:
            log.debug("nats: %s", exc)

    async def disconnected_cb() -> None:
        if client.is_closed or client.is_draining:
            return  # our own close, not an outage
        log.warning("disconnected from NATS; reconnecting")
        if on_disconnected is not None:
            await on_disconnected()

    async def reconnected_cb() -> None:
        nonlocal refusal_reported
        refusal_reported = False
        log.info(
            "reconnected to NATS at %s",
            redact_url(client.connected_url.geturl()) if client.connected_url else "?",
        )
        if on_reconnected is not None:
            await on_reconnected()

    options = connect_options(settings)
    if not buffer_while_reconnecting:
        options["pending_size"] = 0
    client = NatsClient()
    attempt = asyncio.ensure_future(
        client.connect(
            servers=server_urls(settings),
            name=client_name,
            max_reconnect_attempts=-1,
            # Typed int in nats-py, used as float seconds by it; fractions matter in tests.
            reconnect_time_wait=settings.nats_reconnect_wait_s,  # type: ignore[arg-type]
            connect_timeout=CONNECT_TIMEOUT_S,
            error_cb=error_cb,
            disconnected_cb=disconnected_cb,
            reconnected_cb=reconnected_cb,
            **options,
        )
    )
    try:
        await asyncio.shield(attempt)
    except asyncio.CancelledError:
        await _abandon(client, attempt, settings.nats_reconnect_wait_s)
        raise
    if tls_configured(settings) and not client._server_info.get("tls_required"):
        # nats-py does TLS only when the server asks for it; TLS settings mean it must.
        await close_quietly(client)
        raise NatsCredentialsError(
            f"nats_tls_* is set but the NATS server at {redact_url(settings.nats_url)} does "
            "not require TLS; refusing a plain connection (configure TLS on the server)"
        )
    return client


async def _abandon(client: NatsClient, attempt: "asyncio.Future[None]", wait_s: float) -> None:
    """Stop a connect that is still retrying, for a caller that gave up on it.

    nats-py's connect loop does not always survive a cancel: one that lands while it closes
    a connection the server refused (wrong credentials) leaves that socket open, and its
    wait_for may swallow one (Python 3.11), leaving it retrying for ever. So it is told not
    to retry, cancelled, and given one attempt's time to end; its socket is closed whatever
    happened.
    """
    client.options["allow_reconnect"] = False  # the loop gives up at its next failure
    attempt.add_done_callback(_retrieve)  # however late that is
    attempt.cancel()
    await asyncio.wait({attempt}, timeout=CONNECT_TIMEOUT_S + wait_s + 1.0)
    if attempt.done() and not attempt.cancelled() and attempt.exception() is None:
        await close_quietly(client)  # it connected after all
    transport = getattr(client, "_transport", None)
    if transport is not None:
        transport.close()


def _retrieve(attempt: "asyncio.Future[None]") -> None:
    if not attempt.cancelled():
        attempt.exception()


async def retry_until_jetstream_answers(
    setup: Callable[[], Awaitable[None]],
    what: str,
    on_failure: Callable[[Exception], None] | None = None,
    max_wait_s: float = 2.0,
) -> None:
    """Run ``setup`` until it succeeds, backing off between attempts.

    JetStream can answer later than the server (a cluster still electing its leaders, a server
    restarted with JetStream enabled), so NATS errors and timeouts are waited out. A stream
    conflict is raised at once: waiting cannot fix it.
    """
    wait_s = 0.1
    while True:
        try:
            await setup()
            return
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("cannot set up %s yet: %s", what, exc)
            if on_failure is not None:
                on_failure(exc)
        await asyncio.sleep(wait_s)
        wait_s = min(wait_s * 2, max_wait_s)


async def close_quietly(client: NatsClient) -> None:
    """Close a client whatever state its connection is in.

    nats-py's close() flushes what it buffered while disconnected; on a dead socket that
    raises, and the rest of its cleanup is skipped, leaving the transport open (an event
    loop then cannot close). Nothing buffered can be saved at that point anyway: unsent acks
    mean redeliveries. So the error is logged and the transport closed here.
    """
    if client.is_closed:
        return
    try:
        await client.close()
    except Exception as exc:  # uvloop raises RuntimeError on a closed transport; any will do
        log.debug("closing the NATS connection: %r", exc)
        transport = getattr(client, "_transport", None)
        if transport is not None:
            transport.close()


def desired_stream_config(settings: CommonSettings) -> StreamConfig:
    return queue_limits(settings).apply(
        StreamConfig(
            name=settings.nats_stream,
            description="Async function calls (faas-gateway)",
            subjects=[settings.subjects_wildcard],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=settings.nats_stream_replicas,
            duplicate_window=queue_duplicate_window_s(settings),
        )
    )


def queue_limits(settings: CommonSettings) -> StreamLimits:
    # Discard new: a full queue refuses the next call (503) rather than drop an accepted one.
    return StreamLimits(
        settings.async_queue_max_bytes,
        DiscardPolicy.NEW,
        settings.async_retention_s,
        "async_queue_max_bytes",
    )


def queue_duplicate_window_s(settings: CommonSettings) -> float:
    # JetStream refuses a duplicate window longer than max_age.
    if settings.async_retention_s > 0:
        return min(settings.duplicate_window_s, settings.async_retention_s)
    return settings.duplicate_window_s


async def ensure_key_value(
    js: JetStreamContext,
    config: KeyValueConfig,
    discard: DiscardPolicy = DiscardPolicy.NEW,
    setting: str = "",
) -> KeyValue:
    """The bucket, created with ``config`` if missing; one that exists is used as it is
    (perhaps with another description: nothing of ours depends on that), except that its
    size limit (``config.max_bytes``, named by ``setting``), ``discard`` policy and TTL are
    kept current. nats-py creates buckets with discard new; another policy is set after."""
    limits = (
        StreamLimits(config.max_bytes, discard, config.ttl or 0.0, setting)
        if config.max_bytes is not None and config.max_bytes > 0
        else None
    )
    stream = f"KV_{config.bucket}"
    try:
        bucket = await js.create_key_value(config)
        created = True
    except BadRequestError:
        bucket = await js.key_value(config.bucket)
        created = False
    except APIError as exc:
        raise (limits.refused(stream, exc) if limits else exc) from exc
    if limits is not None and (not created or discard != DiscardPolicy.NEW):
        await keep_limits(js, stream, limits)
    return bucket


async def ensure_stream(js: JetStreamContext, settings: CommonSettings) -> None:
    """Create the stream if it is missing; refuse to run against one that differs in kind;
    keep its limits and duplicate window current."""
    desired = desired_stream_config(settings)
    limits = queue_limits(settings)
    try:
        info = await js.stream_info(settings.nats_stream)
    except NotFoundError:
        try:
            await js.add_stream(desired)
            log.info("created stream %s on %s", desired.name, desired.subjects)
            return
        except BadRequestError:
            # Another process created it between our two requests; check what it made.
            info = await js.stream_info(settings.nats_stream)
        except APIError as exc:
            raise limits.refused(settings.nats_stream, exc) from exc

    existing = info.config
    conflicts = []
    if existing.retention != desired.retention:
        conflicts.append(f"retention is {_value(existing.retention)}, expected workqueue")
    if existing.storage != desired.storage:
        conflicts.append(f"storage is {_value(existing.storage)}, expected file")
    if sorted(existing.subjects or []) != sorted(desired.subjects or []):
        conflicts.append(f"subjects are {existing.subjects}, expected {desired.subjects}")
    if conflicts:
        raise StreamConfigConflictError(
            f"NATS stream {settings.nats_stream!r} exists with a conflicting config: "
            + "; ".join(conflicts)
            + ". Delete it (nats stream rm) or set nats_stream to another name."
        )
    # One update with the limits: a window longer than max_age is refused in between.
    window_s = desired.duplicate_window or 0
    if abs((existing.duplicate_window or 0) - window_s) > 1e-3:
        await keep_limits(js, settings.nats_stream, limits, info, duplicate_window=window_s)
    else:
        await keep_limits(js, settings.nats_stream, limits, info)


def _value(enum_or_none: Any) -> str:
    return str(getattr(enum_or_none, "value", enum_or_none))


async def direct_get_batch(
    client: NatsClient, stream: str, request: dict[str, Any], timeout_s: float
) -> list[Msg]:
    """A batched direct get (NATS 2.11+): the messages the server sends until end of batch.

    ``request`` is JetStream's: ``{"seq": N, "batch": K, "next_by_subj": ...}`` for K messages
    from sequence N, or ``{"multi_last": [subjects]}`` for the last message of each subject.
    """
    inbox = client.new_inbox()
    subscription = await client.subscribe(inbox)
    try:
        await client.publish(
            f"$JS.API.DIRECT.GET.{stream}", json.dumps(request).encode(), reply=inbox
        )
        deadline = time.monotonic() + timeout_s
        messages = []
        while True:
            msg = await subscription.next_msg(timeout=max(deadline - time.monotonic(), 0.001))
            status = (msg.headers or {}).get("Status")
            if status is None:
                messages.append(msg)
            elif status in ("204", "404"):  # end of batch; nothing matched
                return messages
            else:
                description = (msg.headers or {}).get("Description", "")
                raise nats.errors.Error(f"direct get on {stream}: {status} {description}")
    finally:
        with contextlib.suppress(nats.errors.Error):
            await subscription.unsubscribe()


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
        self._subscription = await self._client.subscribe(self._prefix + "*", cb=self._on_reply)

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

    async def _on_reply(self, msg: Msg) -> None:
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


def ack_is_duplicate(ack: bytes) -> bool:
    return b'"duplicate":true' in ack


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
