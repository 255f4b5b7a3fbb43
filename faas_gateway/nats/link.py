"""A process's connection to NATS: connect, reconnect for ever, close; used by both processes.

``NatsLink`` is made before it connects (no I/O), so that the stores can be built first and
hold it; they reach the client through it, and get NatsUnavailableError while it is not
connected. Credentials and TLS come from the settings (faas_gateway/nats/auth.py).
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from faas_gateway.core.retry import Backoff
from faas_gateway.nats.auth import (
    NatsCredentialsError,
    connect_options,
    redact_url,
    server_urls,
    tls_configured,
)
from faas_gateway.nats.jetstream import AckedPublisher
from faas_gateway.runtime.settings import CommonSettings

log = logging.getLogger("faas.nats")

CONNECT_TIMEOUT_S = 2


class NatsUnavailableError(RuntimeError):
    """NATS is not connected now (or was not yet): retrying later may succeed."""


class NatsLink:
    def __init__(
        self,
        settings: CommonSettings,
        client_name: str,
        *,
        buffer_while_reconnecting: bool = True,
        request_timeout_s: float = 5.0,
    ) -> None:
        self._settings = settings
        self._client_name = client_name
        self._buffer = buffer_while_reconnecting
        self._request_timeout_s = request_timeout_s
        # What else must happen when the connection is lost and made again; added to before
        # connecting, by whatever depends on the connection (stream setup, watches, metrics).
        self.on_reconnected: list[Callable[[], Awaitable[None]]] = []
        self.on_disconnected: list[Callable[[], Awaitable[None]]] = []
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._acks: AckedPublisher | None = None

    async def connect(self) -> None:
        """Connect, retrying for ever (cancel to give up); NatsCredentialsError for settings
        that cannot work."""
        nc = await connect(
            self._settings,
            self._client_name,
            buffer_while_reconnecting=self._buffer,
            on_reconnected=self._reconnected,
            on_disconnected=self._disconnected,
        )
        acks = AckedPublisher(nc)
        await acks.start()
        self._js = nc.jetstream(timeout=self._request_timeout_s)
        self._acks = acks
        self._nc = nc

    async def _reconnected(self) -> None:
        for hook in self.on_reconnected:
            await hook()

    async def _disconnected(self) -> None:
        for hook in self.on_disconnected:
            await hook()

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    @property
    def nc(self) -> NatsClient:
        if self._nc is None:
            raise NatsUnavailableError("not connected to NATS yet")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise NatsUnavailableError("not connected to NATS yet")
        return self._js

    @property
    def acks(self) -> AckedPublisher:
        if self._acks is None:
            raise NatsUnavailableError("not connected to NATS yet")
        return self._acks

    @property
    def max_payload(self) -> int:
        """The server's largest message (1 MiB by default, and before connecting)."""
        return self._nc.max_payload if self._nc is not None else 1024 * 1024

    async def flush(self, timeout_s: float) -> None:
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.flush(timeout=int(timeout_s))

    async def close(self) -> None:
        if self._nc is not None:
            await close_quietly(self._nc)


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


async def retry_until_answers(
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
    backoff = Backoff(max_s=max_wait_s)
    while True:
        try:
            await setup()
            return
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("cannot set up %s yet: %s", what, exc)
            if on_failure is not None:
                on_failure(exc)
        await asyncio.sleep(backoff.next_s())


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
