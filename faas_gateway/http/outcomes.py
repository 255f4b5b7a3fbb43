"""A function call's response, or its failure, as an Outcome: the one place for the 504
(timeout) and 502 (unreachable) mapping, used by the worker and by sync calls that turned async.

A body larger than ``max_held_bytes`` is never held: it goes on into a spool (the results
object store) as it arrives, and the outcome carries only its size.
"""

import time
from collections.abc import AsyncIterator, Awaitable

from faas_gateway.core.headers import end_to_end
from faas_gateway.core.outcome import BodySpool, Outcome, SpoolError, failure
from faas_gateway.http.client import (
    UpstreamError,
    UpstreamResponse,
    UpstreamTimeoutError,
    failure_for_caller,
)

# The outcome's body is held whole (or spooled): whoever sends it on frames it again.
NOT_KEPT = frozenset({"content-length"})


async def outcome_of(
    response: Awaitable[UpstreamResponse],
    *,
    function: str,
    spool_name: str,
    started_monotonic: float,
    max_held_bytes: int,
    spool: BodySpool,
    timeout_error: str,
) -> Outcome:
    """The outcome of the call ``response`` will answer; never raises for the call's faults.

    ``timeout_error`` is the record's words for a call over its timeout; a function that
    cannot be reached is described without its address (the detail is for the log only).
    """
    try:
        async with await response as upstream:
            body, spooled_size = await take_body(upstream, spool_name, max_held_bytes, spool)
            return Outcome(
                status_code=upstream.status,
                headers=list(end_to_end(upstream.headers, NOT_KEPT).items()),
                body=body,
                duration_s=time.monotonic() - started_monotonic,
                spooled_size=spooled_size,
            )
    except SpoolError as exc:
        # Not lost: the worker tries the call again later, when the store may have room (it
        # is at its limit, or NATS is away).
        return failure(
            502,
            f"the response of {function!r} was too large to hold and could not be stored: {exc}",
            time.monotonic() - started_monotonic,
            unreachable_or_timed_out=True,
        )
    except UpstreamTimeoutError:
        return failure(
            504,
            timeout_error,
            time.monotonic() - started_monotonic,
            unreachable_or_timed_out=True,
            timed_out=True,
        )
    except (UpstreamError, ValueError) as exc:
        # ValueError: the request cannot be framed (a header with a line break); raising
        # instead would leave an async call's message unsettled, to come back and fail again.
        return failure(
            502,
            f"function {function!r} did not answer: {failure_for_caller(exc)}",
            time.monotonic() - started_monotonic,
            unreachable_or_timed_out=isinstance(exc, UpstreamError),
            detail=f"{type(exc).__name__}: {exc}",
        )


async def take_body(
    response: UpstreamResponse, name: str, max_held_bytes: int, spool: BodySpool
) -> tuple[bytes, int | None]:
    """A response's body: held in memory up to ``max_held_bytes``; a larger one goes on into
    the spool under ``name`` as it arrives, and only its size comes back."""
    declared = response.content_length
    if declared is not None and declared <= max_held_bytes:
        return await response.read(), None
    held: list[bytes] = []
    size = 0
    chunks = response.chunks()
    while True:
        try:
            chunk = await anext(chunks)
        except StopAsyncIteration:
            return b"".join(held), None
        held.append(chunk)
        size += len(chunk)
        if size > max_held_bytes:
            return b"", await spool.put_stream(name, _chain(held, chunks))


async def _chain(first: list[bytes], rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    while first:
        yield first.pop(0)
    async for chunk in rest:
        yield chunk
