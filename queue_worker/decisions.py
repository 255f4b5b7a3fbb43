"""What happens next, decided without I/O so that tests can cover every case with a table."""

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass


class Settle(enum.Enum):
    ACK = "ack"  # done: the stream forgets the message
    NAK = "nak"  # not done here: redeliver, at once, to any worker
    TERM = "term"  # can never succeed: drop without redelivery


class Ending(enum.Enum):
    COMPLETED = "completed"  # the function was called and its outcome reported (or given up)
    MALFORMED = "malformed"  # the message cannot be read
    INTERRUPTED = "interrupted"  # shutdown cut the call short


def settle(ending: Ending) -> Settle:
    """At least once: a call is acked only after its outcome went to the callback (or gave up)."""
    return {
        Ending.COMPLETED: Settle.ACK,
        Ending.MALFORMED: Settle.TERM,
        Ending.INTERRUPTED: Settle.NAK,
    }[ending]


def outcome_label(status_code: int) -> str:
    return "succeeded" if 200 <= status_code < 300 else "failed"


# Statuses that say "try again later" rather than "this request is wrong".
RETRYABLE_CALLBACK_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


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
    full jitter until ``max_attempts``; any other status is final, since sending the same
    request again would get the same answer.
    """
    if status_code is not None and 200 <= status_code < 300:
        return CallbackVerdict(delivered=True, retry_after_s=None)
    retryable = status_code is None or status_code in RETRYABLE_CALLBACK_STATUSES
    if not retryable or attempt >= max_attempts:
        return CallbackVerdict(delivered=False, retry_after_s=None)
    ceiling_s = min(max_wait_s, initial_wait_s * 2 ** (attempt - 1))
    return CallbackVerdict(delivered=False, retry_after_s=jitter(initial_wait_s / 2, ceiling_s))


def heartbeat_interval_s(ack_wait_s: float) -> float:
    """Renew the lease three times per ack_wait, so one lost renewal does not cost it."""
    return max(ack_wait_s / 3, 0.05)
