"""Retrying a function call: which outcome leads to done, retry after N seconds, or give up.

Pure: no I/O and no clock, so that tests/core/test_retries.py covers every case with a table. The
worker acts on the verdict: a retry goes back to the queue with a delay (``nak(delay)``), so
waiting holds no worker slot.
"""

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from faas_gateway.core.timefmt import parse_duration_s

ANNOTATION_ATTEMPTS = "com.openfaas.retry.attempts"
ANNOTATION_CODES = "com.openfaas.retry.codes"
ANNOTATION_MIN_WAIT = "com.openfaas.retry.min_wait"
ANNOTATION_MAX_WAIT = "com.openfaas.retry.max_wait"

# 2 ** 62 times any sane wait is far past any max wait, and a float can still hold it.
MAX_BACKOFF_DOUBLINGS = 62
# Bounds on any policy, from annotations or settings: a wait of 1e300 seconds is no policy but a
# number NATS cannot take as a delay, and an attempt count beyond this is a typo.
MAX_ATTEMPTS = 1000
MAX_WAIT_S = 24 * 3600.0


class InvalidRetryPolicyError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int  # function calls in all, the first included
    retry_codes: frozenset[int]
    min_wait_s: float
    max_wait_s: float

    def overridden_by(self, annotations: Mapping[str, str]) -> "RetryPolicy":
        """A function's own policy: its ``com.openfaas.retry.*`` annotations over this one."""
        try:
            max_attempts = int(annotations.get(ANNOTATION_ATTEMPTS, self.max_attempts))
            codes = self.retry_codes
            if ANNOTATION_CODES in annotations:
                codes = parse_codes(annotations[ANNOTATION_CODES])
            min_wait_s = self.min_wait_s
            if ANNOTATION_MIN_WAIT in annotations:
                min_wait_s = parse_duration_s(annotations[ANNOTATION_MIN_WAIT])
            max_wait_s = self.max_wait_s
            if ANNOTATION_MAX_WAIT in annotations:
                max_wait_s = parse_duration_s(annotations[ANNOTATION_MAX_WAIT])
        except ValueError as exc:
            raise InvalidRetryPolicyError(str(exc)) from exc
        if not 1 <= max_attempts <= MAX_ATTEMPTS:
            raise InvalidRetryPolicyError(f"{ANNOTATION_ATTEMPTS} must be 1 to {MAX_ATTEMPTS}")
        for name, wait_s in ((ANNOTATION_MIN_WAIT, min_wait_s), (ANNOTATION_MAX_WAIT, max_wait_s)):
            if wait_s > MAX_WAIT_S:
                raise InvalidRetryPolicyError(f"{name} must be at most 24h")
        return RetryPolicy(max_attempts, codes, min_wait_s, max(max_wait_s, min_wait_s))


def parse_codes(text: str) -> frozenset[int]:
    """``"408,429,500-504"``: status codes and ranges, comma-separated; "" for none."""
    codes: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        low, _, high = part.partition("-")
        if not low.isdigit() or not (high or low).isdigit():
            raise ValueError(f"invalid status code or range {part!r}")
        first, last = int(low), int(high or low)
        if not 100 <= first <= last <= 599:
            raise ValueError(f"invalid status code or range {part!r}")
        codes.update(range(first, last + 1))
    return frozenset(codes)


def parse_retry_after_s(value: str | None, now_unix_s: float) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date; None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        return None
    return max(0.0, moment.timestamp() - now_unix_s)


@dataclass(frozen=True, slots=True)
class CallVerdict:
    final: bool  # True: done (success or given up); False: retry after wait_s
    wait_s: float = 0.0


DONE = CallVerdict(final=True)


def judge_call_attempt(
    status_code: int,
    unreachable_or_timed_out: bool,
    attempt: int,
    policy: RetryPolicy,
    retry_after_s: float | None = None,
    jitter: Callable[[float, float], float] = random.uniform,
) -> CallVerdict:
    """After function call number ``attempt`` (1-based) ended with ``status_code``.

    2xx is done. Connection errors and timeouts (``unreachable_or_timed_out``) and the
    policy's codes are retried until ``max_attempts`` calls were made; anything else is final
    at once. The wait grows exponentially from min_wait to max_wait with full jitter between
    min_wait and the current ceiling; a Retry-After on 429 or 503 replaces it, never below
    min_wait nor above max_wait.
    """
    if 200 <= status_code < 300:
        return DONE
    retryable = unreachable_or_timed_out or status_code in policy.retry_codes
    if not retryable or attempt >= policy.max_attempts:
        return DONE
    if retry_after_s is not None and status_code in (429, 503):
        wait_s = min(max(retry_after_s, policy.min_wait_s), policy.max_wait_s)
        return CallVerdict(final=False, wait_s=wait_s)
    wait_s = backoff_s(attempt, policy.min_wait_s, policy.max_wait_s, policy.min_wait_s, jitter)
    return CallVerdict(final=False, wait_s=wait_s)


def backoff_s(
    attempt: int,
    first_s: float,
    max_s: float,
    floor_s: float,
    jitter: Callable[[float, float], float] = random.uniform,
) -> float:
    """The wait after attempt number ``attempt`` (1-based): exponential from ``first_s``,
    never over ``max_s``, with jitter between ``floor_s`` and that ceiling (a floor above the
    ceiling is lowered to it, so a wait never exceeds ``max_s``)."""
    doublings = min(max(attempt - 1, 0), MAX_BACKOFF_DOUBLINGS)
    ceiling_s = min(max_s, first_s * 2.0**doublings)
    return jitter(min(floor_s, ceiling_s), ceiling_s)


class Backoff:
    """Waits between tries of something that failed (NATS away, a stream not there yet):
    ``first_s``, doubling each time, at most ``max_s``; ``reset`` after a success."""

    def __init__(self, first_s: float = 0.1, max_s: float = 2.0) -> None:
        self._first_s = first_s
        self._max_s = max_s
        self._next_s = first_s

    def next_s(self) -> float:
        wait_s = self._next_s
        self._next_s = min(self._next_s * 2, self._max_s)
        return wait_s

    def reset(self) -> None:
        self._next_s = self._first_s


# Statuses below 500 that say "try again later" rather than "this request is wrong"; every
# 5xx is retried too, as docs/api.md says.
RETRYABLE_CALLBACK_STATUSES = frozenset({408, 425, 429})


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
    # The floor keeps retries from bunching up at once.
    wait_s = backoff_s(attempt, initial_wait_s, max_wait_s, initial_wait_s / 2, jitter)
    return CallbackVerdict(delivered=False, retry_after_s=wait_s)
