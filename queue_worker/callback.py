"""Posting a call's outcome to its X-Callback-Url, retried a few times with backoff."""

import asyncio
import logging
from dataclasses import dataclass

from multidict import CIMultiDict
from yarl import URL

from faas_common.headers import CALL_ID, DURATION_SECONDS, FUNCTION_NAME, FUNCTION_STATUS
from faas_common.logs import call_context
from faas_common.message import QueuedCall
from faas_common.upstream import Timeouts, UpstreamClient, UpstreamError
from queue_worker.decisions import judge_callback_attempt
from queue_worker.invoker import Outcome
from queue_worker.settings import WorkerSettings

log = logging.getLogger("faas.worker")


@dataclass(frozen=True, slots=True)
class CallbackResult:
    delivered: bool
    attempts: int
    last_status: int | None


def callback_headers(call: QueuedCall, outcome: Outcome) -> CIMultiDict[str]:
    """The function's own response headers, then ours, which win on a clash."""
    headers = CIMultiDict(outcome.headers)
    headers[CALL_ID] = call.call_id
    headers[FUNCTION_NAME] = call.function
    headers[FUNCTION_STATUS] = str(outcome.status_code)
    headers[DURATION_SECONDS] = f"{outcome.duration_s:.6f}"
    return headers


class CallbackSender:
    def __init__(self, settings: WorkerSettings, client: UpstreamClient) -> None:
        self._settings = settings
        self._client = client

    async def deliver(self, call: QueuedCall, outcome: Outcome) -> CallbackResult:
        assert call.callback_url is not None
        headers = list(callback_headers(call, outcome).items())
        limit_s = self._settings.callback_timeout_s
        timeouts = Timeouts(connect_s=limit_s, read_s=limit_s, total_s=limit_s)
        attempt = 0
        while True:
            attempt += 1
            status: int | None = None
            try:
                url = URL(call.callback_url)
                if url.scheme not in ("http", "https") or not url.raw_host:
                    raise ValueError("not an absolute http or https URL")
                async with await self._client.request(
                    "POST", url, headers, outcome.body, timeouts
                ) as response:
                    status = response.status
                    await response.read()
            except UpstreamError as exc:
                log.info(
                    "callback attempt %d to %s failed: %s",
                    attempt,
                    call.callback_url,
                    exc,
                    extra=call_context(call.call_id, call.function),
                )
            except ValueError as exc:
                # The request cannot be built (a host name IDNA cannot encode, say): every
                # attempt would fail alike. Raising instead would leave the
                # message unsettled, and the function would run again on redelivery.
                log.warning(
                    "callback to %s cannot be sent: %s: %s",
                    call.callback_url,
                    type(exc).__name__,
                    exc,
                    extra=call_context(call.call_id, call.function),
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
                        call.callback_url,
                        attempt,
                        status,
                        extra=call_context(call.call_id, call.function),
                    )
                return CallbackResult(verdict.delivered, attempt, status)
            await asyncio.sleep(verdict.retry_after_s)
