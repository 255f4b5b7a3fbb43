"""What happens next, decided without I/O so that tests can cover every case with a table."""

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass


class Settle(enum.Enum):
    ACK = "ack"  # done: the stream forgets the message
    NAK = "nak"  # not done here: redeliver, at once, to any worker
    NAK_LATER = "nak_later"  # not done here: redeliver after a pause (one ack_wait)
    TERM = "term"  # can never succeed: drop without redelivery


class Ending(enum.Enum):
    COMPLETED = "completed"  # the function was called and its outcome reported (or given up)
    MALFORMED = "malformed"  # the message cannot be read
    INTERRUPTED = "interrupted"  # shutdown cut the call short
    CRASHED = "crashed"  # the worker's own handling failed unexpectedly


def settle(ending: Ending) -> Settle:
    """At least once: a call is acked only after its outcome went to the callback (or gave up)."""
    return {
        Ending.COMPLETED: Settle.ACK,
        Ending.MALFORMED: Settle.TERM,
        Ending.INTERRUPTED: Settle.NAK,
        # Keep the call rather than lose it, but not in a hot loop of the same failure.
        Ending.CRASHED: Settle.NAK_LATER,
    }[ending]


def outcome_label(status_code: int) -> str:
    return "succeeded" if 200 <= status_code < 300 else "failed"


# Statuses below 500 that say "try again later" rather than "this request is wrong"; every
# 5xx is retried too, as the README promises.
RETRYABLE_CALLBACK_STATUSES = frozenset({408, 425, 429})

# 2 ** 62 times any sane initial wait is far past any max wait, and a float can still hold it;
# a larger exponent would raise OverflowError once callback_max_attempts is set above ~1000.
MAX_BACKOFF_DOUBLINGS = 62


@dataclass(frozen=True, slots=True)
class CallbackVerdict:
    delivered: bool
    retry_after_s: float | None  # None: stop trying


def judge_callback_attempt(
    status_code: int | None,
    attempt: int,
    max_attempts: int,
    initial_wait_s: float,
    max_wait_s: float,
    jitter: Callable[[float, float], float] = random.uniform,
) -> CallbackVerdict:
    """After attempt number ``attempt`` (1-based) ended with ``status_code`` (None: no answer).

    2xx is delivered. No answer, 408, 425, 429 and 5xx are retried with exponential backoff and
    jitter, never waiting more than ``max_wait_s``, until ``max_attempts``; any other status is
    final, since sending the same request again would get the same answer.
    """
    if status_code is not None and 200 <= status_code < 300:
        return CallbackVerdict(delivered=True, retry_after_s=None)
    retryable = (
        status_code is None
        or 500 <= status_code < 600
        or status_code in RETRYABLE_CALLBACK_STATUSES
    )
    if not retryable or attempt >= max_attempts:
        return CallbackVerdict(delivered=False, retry_after_s=None)
    doublings = min(attempt - 1, MAX_BACKOFF_DOUBLINGS)
    ceiling_s = min(max_wait_s, initial_wait_s * 2.0**doublings)
    # The floor keeps retries from bunching up at once; it must not lift a wait above
    # max_wait_s when that is set below half the initial wait.
    floor_s = min(initial_wait_s / 2, ceiling_s)
    return CallbackVerdict(delivered=False, retry_after_s=jitter(floor_s, ceiling_s))


def heartbeat_interval_s(ack_wait_s: float) -> float:
    """Renew the lease three times per ack_wait, so one lost renewal does not cost it."""
    return max(ack_wait_s / 3, 0.05)
