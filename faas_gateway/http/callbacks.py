"""Posting a call's outcome to its X-Callback-Url, retried with backoff.

Used by the queue-worker for async calls and by the gateway for sync calls that turned async.
"""

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterable, Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from multidict import CIMultiDict
from yarl import URL

from faas_gateway.core.callback_policy import (
    HostPolicy,
    Signer,
    parse_address,
    signing_keys,
    webhook_id,
)
from faas_gateway.core.headers import (
    CALL_ID,
    DURATION_SECONDS,
    FUNCTION_NAME,
    FUNCTION_STATUS,
    RETRY,
    RETRY_MAX,
    WEBHOOK_ID,
    WEBHOOK_SIGNATURE,
    WEBHOOK_TIMESTAMP,
)
from faas_gateway.core.outcome import Outcome
from faas_gateway.core.retry import judge_callback_attempt
from faas_gateway.http.client import (
    Timeouts,
    UpstreamClient,
    UpstreamError,
    UpstreamRefusedError,
)
from faas_gateway.nats.results import ResultStore, ResultStoreError
from faas_gateway.runtime.logs import call_context
from faas_gateway.runtime.settings import CommonSettings

log = logging.getLogger("faas.callback")

K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class CallbackResult:
    delivered: bool
    attempts: int
    last_status: int | None


# Never copied from the function's response into its callback: credentials, which the
# function would plant on our request to the receiver (Authorization, Cookie) or meant for its
# own caller (Set-Cookie); headers for proxies; and the headers of callbacks and their
# signatures, which only the sender sets. Content-Length is the sender's to frame.
NOT_COPIED = frozenset({"authorization", "cookie", "set-cookie", "set-cookie2", "content-length"})
NOT_COPIED_PREFIXES = ("proxy-", "x-callback-", "webhook-")
# Set by the sender (X-Retry and X-Retry-Max by the worker only, but a function's own would
# mislead a receiver of a gateway's callback as much): each appears once, ours.
SENDER_HEADERS = frozenset(
    name.lower()
    for name in (CALL_ID, FUNCTION_NAME, FUNCTION_STATUS, DURATION_SECONDS, RETRY, RETRY_MAX)
)


def callback_headers(
    call_id: str,
    function: str,
    outcome: Outcome,
    extra_headers: Iterable[tuple[str, str]] = (),
) -> CIMultiDict[str]:
    """The function's response headers a callback may carry, then ours, each once."""
    extra = list(extra_headers)
    ours = SENDER_HEADERS
    if any(name.lower() not in SENDER_HEADERS for name, _ in extra):
        ours = ours | {name.lower() for name, _ in extra}
    # One list, one multidict: this runs for every callback.
    items = [
        (name, value)
        for name, value in outcome.headers
        if (lowered := name.lower()) not in NOT_COPIED
        and lowered not in ours
        and not lowered.startswith(NOT_COPIED_PREFIXES)
    ]
    items += (
        (CALL_ID, call_id),
        (FUNCTION_NAME, function),
        (FUNCTION_STATUS, str(outcome.status_code)),
        (DURATION_SECONDS, f"{outcome.duration_s:.6f}"),
    )
    items += extra
    return CIMultiDict(items)


MAX_REDIRECTS = 5
# Hosts and addresses whose verdict is remembered (the policy never changes in a process;
# an address is judged anew for each host it is reached by). Parsing them was a tenth of the
# worker's CPU per call (bench scenario 6); past this many the memory starts over.
MAX_VERDICTS = 4096


Body = bytes | Callable[[], AsyncIterable[bytes]]


class CallbackSender:
    def __init__(
        self,
        settings: CommonSettings,
        client: UpstreamClient,
        results: ResultStore | None = None,
    ) -> None:
        self._settings = settings
        self._client = client
        self._results = results  # where a body too large to hold was stored
        self._hosts = HostPolicy.parse(settings.callback_allowed_hosts)
        self._keys = signing_keys(settings.callback_signing_secret)
        limit_s = settings.callback_timeout_s
        self._timeouts = Timeouts(connect_s=limit_s, read_s=limit_s, total_s=limit_s)
        self._name_verdicts: dict[str, bool | None] = {}
        self._address_verdicts: dict[tuple[str, str], bool] = {}

    async def deliver(
        self,
        callback_url: str,
        call_id: str,
        function: str,
        outcome: Outcome,
        extra_headers: Iterable[tuple[str, str]] = (),
    ) -> CallbackResult:
        headers = callback_headers(call_id, function, outcome, extra_headers)
        body: Body = outcome.body
        if outcome.spooled_size is not None:
            # Read from the results store again for each attempt (and each redirect), never
            # held whole; its length is known, so receivers get a Content-Length.
            assert self._results is not None, "a spooled body needs the results store"
            body = functools.partial(self._results.chunks, call_id)
            headers["Content-Length"] = str(outcome.spooled_size)
        if self._keys:
            headers[WEBHOOK_ID] = webhook_id(call_id, function, outcome.status_code)
        timeouts = self._timeouts
        attempt = 0
        while True:
            attempt += 1
            if self._keys:
                # Signed again each attempt: receivers refuse old timestamps, and a retry
                # minutes later is no replay. The id stays, for them to de-duplicate on.
                timestamp = int(time.time())
                headers[WEBHOOK_TIMESTAMP] = str(timestamp)
                signer = Signer(self._keys, headers[WEBHOOK_ID], timestamp)
            status: int | None = None
            try:
                if self._keys:
                    if isinstance(body, bytes):
                        signer.update(body)
                    else:
                        async for piece in body():
                            signer.update(piece)
                    headers[WEBHOOK_SIGNATURE] = signer.signature()
                status = await self._post(URL(callback_url), headers, body, timeouts)
            except UpstreamRefusedError as exc:
                log.warning("callback refused: %s", exc, extra=call_context(call_id, function))
                return CallbackResult(delivered=False, attempts=attempt, last_status=None)
            except (UpstreamError, ResultStoreError) as exc:
                log.info(
                    "callback attempt %d to %s failed: %s",
                    attempt,
                    callback_url,
                    exc,
                    extra=call_context(call_id, function),
                )
            except ValueError as exc:
                # The request cannot be built (a host name IDNA cannot encode, say): every
                # attempt would fail alike. Raising instead would leave the
                # message unsettled, and the function would run again on redelivery.
                log.warning(
                    "callback to %s cannot be sent: %s: %s",
                    callback_url,
                    type(exc).__name__,
                    exc,
                    extra=call_context(call_id, function),
                )
                return CallbackResult(delivered=False, attempts=attempt, last_status=None)
            verdict = judge_callback_attempt(
                status,
                attempt,
                self._settings.callback_max_attempts,
                self._settings.callback_initial_wait_s,
                self._settings.callback_max_wait_s,
            )
            if verdict.retry_after_s is None:
                if not verdict.delivered:
                    log.warning(
                        "callback to %s given up after %d attempts (last status %s)",
                        callback_url,
                        attempt,
                        status,
                        extra=call_context(call_id, function),
                    )
                return CallbackResult(verdict.delivered, attempt, status)
            await asyncio.sleep(verdict.retry_after_s)

    async def _post(
        self, url: URL, headers: CIMultiDict[str], body: Body, timeouts: Timeouts
    ) -> int:
        """One delivery attempt: the final status, after following 307 and 308 with the body
        (a redirect that drops the body would lose the result); other 3xx are answers."""
        for _ in range(MAX_REDIRECTS + 1):
            if url.scheme not in ("http", "https") or not url.raw_host:
                raise ValueError("not an absolute http or https URL")
            host = url.raw_host
            if self._allows_name(host) is False:
                raise UpstreamRefusedError(f"{host} is not in callback_allowed_hosts")
            async with await self._client.request(
                "POST",
                url,
                headers.items(),
                body if isinstance(body, bytes) else body(),
                timeouts,
                allow_peer=functools.partial(self._allows, host),
            ) as response:
                await response.read()
                location = response.headers.get("Location")
                if response.status not in (307, 308) or not location:
                    return response.status
            url = url.join(URL(location))
        raise UpstreamError(f"more than {MAX_REDIRECTS} redirects")

    def _allows_name(self, host: str) -> bool | None:
        try:
            return self._name_verdicts[host]
        except KeyError:
            verdict = self._hosts.allows_name(host)
            _remember(self._name_verdicts, host, verdict)
            return verdict

    def _allows(self, host: str, address: str) -> bool:
        key = (host, address)
        try:
            return self._address_verdicts[key]
        except KeyError:
            parsed = parse_address(address)
            verdict = parsed is not None and self._hosts.allows_connection(host, parsed)
            _remember(self._address_verdicts, key, verdict)
            return verdict


def _remember(verdicts: dict[K, V], key: K, verdict: V) -> None:
    if len(verdicts) >= MAX_VERDICTS:
        verdicts.clear()
    verdicts[key] = verdict
