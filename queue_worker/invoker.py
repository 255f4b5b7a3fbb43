"""One function call under the read, write and exec timeouts; every ending becomes an Outcome."""

import time

from faas_gateway.core.call import QueuedCall
from faas_gateway.core.functions import FunctionSpec
from faas_gateway.core.headers import CALL_ID, RETRY, RETRY_MAX, START_TIME
from faas_gateway.core.outcome import BodySpool, Outcome, failure
from faas_gateway.http.client import Timeouts, UpstreamClient
from faas_gateway.http.outcomes import outcome_of

# Set by the worker on every call: a caller's own are replaced.
OURS = frozenset(name.lower() for name in (CALL_ID, START_TIME, RETRY, RETRY_MAX))


class FunctionInvoker:
    def __init__(
        self,
        client: UpstreamClient,
        spool: BodySpool,
        defaults: Timeouts,
        max_held_bytes: int,
    ) -> None:
        self._client = client
        self._spool = spool  # where a response too large to hold goes as it arrives
        self._defaults = defaults  # for functions that set no timeouts of their own
        self._max_held_bytes = max_held_bytes
        self._timeouts: dict[str, tuple[FunctionSpec, Timeouts]] = {}

    async def invoke(
        self, call: QueuedCall, function: FunctionSpec | None, attempt: int, max_attempts: int
    ) -> Outcome:
        started = time.monotonic()
        if function is None:
            return failure(404, f"function {call.function!r} is no longer registered", 0.0)
        timeouts = self._timeouts_of(function)
        headers = [(name, value) for name, value in call.headers if name.lower() not in OURS]
        headers += (
            (CALL_ID, call.call_id),
            (START_TIME, str(call.accepted_at_ns)),
            (RETRY, str(attempt)),
            (RETRY_MAX, str(max_attempts)),
        )
        return await outcome_of(
            self._client.request(
                call.method,
                function.url_for(call.path, call.query),
                headers,
                call.body,
                timeouts,
            ),
            function=function.name,
            spool_name=call.call_id,
            started_monotonic=started,
            max_held_bytes=self._max_held_bytes,
            spool=self._spool,
            timeout_error=(
                f"function {function.name!r} exceeded its timeout (exec {timeouts.total_s:g}s)"
            ),
        )

    def _timeouts_of(self, function: FunctionSpec) -> Timeouts:
        """The function's own timeouts, or the worker's; kept while its spec stays the same."""
        cached = self._timeouts.get(function.name)
        if cached is not None and cached[0] is function:
            return cached[1]
        timeouts = Timeouts(
            connect_s=function.write_timeout_s or self._defaults.connect_s,
            read_s=function.read_timeout_s or self._defaults.read_s,
            total_s=function.exec_timeout_s or self._defaults.total_s or 0.0,
        )
        self._timeouts[function.name] = (function, timeouts)
        return timeouts
