"""Which messages a worker takes and which of its calls may start: slots, prefetch, limits.

Apart from the handling of a call on purpose: what is counted here changes with every
message, and one place decides it, so that no path can take a slot twice or leave one held.
"""

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable

from faas_gateway.core.functions import FunctionSpec


class Admission:
    """Up to ``max_inflight`` function calls run at once, and ``prefetch`` more messages are
    fetched ahead, so that a slot that frees up starts its next call at once instead of after
    a fetch round trip. A call whose function has returned no longer holds a slot while its
    callback is sent, but messages held in all stay below twice max_inflight (plus those
    fetched ahead), so a receiver that is down slows intake instead of piling up results.
    """

    def __init__(self, max_inflight: int, prefetch: int) -> None:
        self.max_inflight = max_inflight
        self.prefetch = prefetch
        self.running = 0  # function calls running now
        self.claimed = 0  # messages taken whose function call has not ended yet
        self.held = 0  # messages taken and not settled yet: claimed, or calling back
        self.freed = asyncio.Event()
        self._slots = asyncio.Semaphore(max_inflight)
        self._by_function: dict[str, int] = {}
        self._waiting: set[asyncio.Task[object]] = set()
        self._closed = False

    def free(self) -> int:
        """How many more messages to take now."""
        calls = self.max_inflight + self.prefetch - self.claimed
        held = 2 * self.max_inflight + self.prefetch - self.held
        return min(calls, held)

    def take(self) -> "Claim":
        """A message was taken: it holds a claim until its call ends, and counts as held
        until it is settled. Counted before its task runs, so that no fetch overshoots."""
        self.claimed += 1
        self.held += 1
        return Claim(self)

    def reserve(self, function: FunctionSpec | None) -> bool:
        """Count a call of ``function`` as running here, unless it is at its max_inflight."""
        if function is None:
            return True
        running = self._by_function.get(function.name, 0)
        limit = function.max_inflight
        if limit is not None and running >= limit:
            return False
        self._by_function[function.name] = running + 1
        return True

    def unreserve(self, function: FunctionSpec | None) -> None:
        if function is not None:
            self._by_function[function.name] -= 1

    async def take_slot(self) -> None:
        """Wait for one of the max_inflight slots. After ``close`` (a stop) no call gets one:
        the wait ends with CancelledError, and the message goes back to the queue."""
        if self._closed:
            raise asyncio.CancelledError
        task = asyncio.current_task()
        assert task is not None
        self._waiting.add(task)
        try:
            await self._slots.acquire()
        finally:
            self._waiting.discard(task)
        self.running += 1

    def release_slot(self) -> None:
        self.running -= 1
        self._slots.release()

    def close(self) -> None:
        """A stop: no call starts from now on. Messages fetched ahead and waiting for a slot go
        back now, and so does one still on its way to the wait (see Worker._drain)."""
        self._closed = True
        for task in list(self._waiting):
            task.cancel()

    def _release_claim(self) -> None:
        self.claimed -= 1
        self.freed.set()

    def _settled(self) -> None:
        self.held -= 1
        self.freed.set()


class Claim:
    """One message's claim: given back once when its function returns (or it will not run),
    and its hold once when it is settled; both exactly once, whatever path it takes."""

    __slots__ = ("_admission", "_claimed", "_held")

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._claimed = True
        self._held = True

    def release(self) -> None:
        if self._claimed:
            self._claimed = False
            self._admission._release_claim()

    def settled(self) -> None:
        self.release()
        if self._held:
            self._held = False
            self._admission._settled()


class RecentIds:
    """Call ids seen lately, at most ``max_ids`` of them for at most ``keep_s`` seconds: a
    bounded memory of cancellations and of calls finished here."""

    def __init__(self, keep_s: float, max_ids: int, clock: Callable[[], float] = time.monotonic):
        self._keep_s = keep_s
        self._max_ids = max_ids
        self._clock = clock
        self._until: OrderedDict[str, float] = OrderedDict()

    def add(self, call_id: str) -> None:
        self._until.pop(call_id, None)
        self._until[call_id] = self._clock() + self._keep_s
        self._prune()

    def __contains__(self, call_id: object) -> bool:
        until = self._until.get(call_id)  # type: ignore[call-overload]
        if until is None:
            return False
        if until < self._clock():
            self._prune()
            return False
        return True

    def __len__(self) -> int:
        self._prune()
        return len(self._until)

    def _prune(self) -> None:
        now = self._clock()
        while self._until and (
            len(self._until) > self._max_ids or next(iter(self._until.values())) < now
        ):
            self._until.popitem(last=False)
