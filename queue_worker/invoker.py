"""One function call under the read, write and exec timeouts; every ending becomes an Outcome."""

import time

from multidict import CIMultiDict

from faas_gateway.core.call import QueuedCall
from faas_gateway.core.functions import FunctionSpec
from faas_gateway.core.headers import CALL_ID, RETRY, RETRY_MAX, START_TIME, end_to_end
from faas_gateway.core.outcome import Outcome, failure
from faas_gateway.http.client import (
    Timeouts,
    UpstreamClient,
    UpstreamError,
    UpstreamTimeoutError,
    failure_for_caller,
)
from faas_gateway.nats.results import ResultStore, ResultStoreError, take_body
from queue_worker.settings import WorkerSettings


class FunctionInvoker:
    def __init__(
        self, settings: WorkerSettings, client: UpstreamClient, results: ResultStore
    ) -> None:
        self._settings = settings
        self._client = client
        self._results = results  # where a response too large to hold goes as it arrives

    async def invoke(
        self, call: QueuedCall, function: FunctionSpec | None, attempt: int, max_attempts: int
    ) -> Outcome:
        started = time.monotonic()
        if function is None:
            return failure(404, f"function {call.function!r} is no longer registered", 0.0)
        exec_timeout_s = function.exec_timeout_s or self._settings.exec_timeout_s
        timeouts = Timeouts(
            connect_s=function.write_timeout_s or self._settings.write_timeout_s,
            read_s=function.read_timeout_s or self._settings.read_timeout_s,
            total_s=exec_timeout_s,
        )
        headers = CIMultiDict(call.headers)
        headers[CALL_ID] = call.call_id
        headers[START_TIME] = str(call.accepted_at_ns)
        headers[RETRY] = str(attempt)
        headers[RETRY_MAX] = str(max_attempts)
        try:
            async with await self._client.request(
                call.method,
                function.url_for(call.path, call.query),
                headers.items(),
                call.body,
                timeouts,
            ) as response:
                body, spooled_size = await take_body(
                    response, call.call_id, self._settings.max_held_response_bytes, self._results
                )
                return Outcome(
                    status_code=response.status,
                    headers=list(
                        end_to_end(response.headers, frozenset({"content-length"})).items()
                    ),
                    body=body,
                    duration_s=time.monotonic() - started,
                    spooled_size=spooled_size,
                )
        except ResultStoreError as exc:
            # Not lost: tried again later, when the store may have room (it is at its limit,
            # or NATS is away).
            return failure(
                502,
                f"the response of {function.name!r} was too large to hold and could not be "
                f"stored: {exc}",
                time.monotonic() - started,
                unreachable_or_timed_out=True,
            )
        except UpstreamTimeoutError:
            return failure(
                504,
                f"function {function.name!r} exceeded its timeout (exec {exec_timeout_s:g}s)",
                time.monotonic() - started,
                unreachable_or_timed_out=True,
            )
        except (UpstreamError, ValueError) as exc:
            # ValueError: the request cannot be framed (a header with a line break). Raising
            # instead would leave the message unsettled, so it would come back after ack_wait
            # and fail again, forever.
            # The error goes to the record and the callback: it says what went wrong, not
            # where the function listens; the detail is for the worker's log line.
            return failure(
                502,
                f"function {function.name!r} did not answer: {failure_for_caller(exc)}",
                time.monotonic() - started,
                unreachable_or_timed_out=isinstance(exc, UpstreamError),
                detail=f"{type(exc).__name__}: {exc}",
            )
