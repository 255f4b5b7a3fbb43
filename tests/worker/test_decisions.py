"""The worker's decisions, without I/O: callback retries, how messages are settled, the lease."""

import random

import pytest

from faas_gateway.core.retry import CallbackVerdict, judge_callback_attempt
from queue_worker.decisions import (
    Ending,
    Settle,
    heartbeat_interval_s,
    outcome_label,
    settle,
)

INITIAL_WAIT_S = 0.5
MAX_WAIT_S = 4.0
MAX_ATTEMPTS = 5


def lowest(low: float, high: float) -> float:
    return low


def highest(low: float, high: float) -> float:
    return high


def judge(status: int | None, attempt: int, jitter=random.uniform, **overrides) -> CallbackVerdict:
    settings = {
        "max_attempts": MAX_ATTEMPTS,
        "initial_wait_s": INITIAL_WAIT_S,
        "max_wait_s": MAX_WAIT_S,
        **overrides,
    }
    return judge_callback_attempt(status, attempt, jitter=jitter, **settings)


# callbacks


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
@pytest.mark.parametrize("attempt", [1, 3, MAX_ATTEMPTS])
def test_2xx_is_delivered(status, attempt):
    assert judge(status, attempt) == CallbackVerdict(delivered=True, retry_after_s=None)


@pytest.mark.parametrize("status", [None, 408, 425, 429, 500, 501, 502, 503, 504, 507, 599])
def test_no_answer_timeouts_throttling_and_5xx_are_retried_until_attempts_run_out(status):
    for attempt in range(1, MAX_ATTEMPTS):
        verdict = judge(status, attempt)
        assert verdict.delivered is False
        assert verdict.retry_after_s is not None, f"attempt {attempt} of {MAX_ATTEMPTS}"
        assert 0 < verdict.retry_after_s <= MAX_WAIT_S

    assert judge(status, MAX_ATTEMPTS) == CallbackVerdict(delivered=False, retry_after_s=None)
    assert judge(status, MAX_ATTEMPTS + 1) == CallbackVerdict(delivered=False, retry_after_s=None)


@pytest.mark.parametrize(
    "status", [100, 199, 300, 301, 302, 304, 400, 401, 403, 404, 405, 409, 410, 413, 422, 451]
)
def test_other_statuses_are_final_at_the_first_attempt(status):
    assert judge(status, 1) == CallbackVerdict(delivered=False, retry_after_s=None)


@pytest.mark.parametrize(
    ("attempt", "ceiling_s"),
    [
        (1, 0.5),  # the initial wait
        (2, 1.0),
        (3, 2.0),
        (4, 4.0),  # reaches the max wait
        (5, 4.0),  # and stays there
        (9, 4.0),
    ],
)
def test_waits_double_up_to_the_max_wait_with_jitter_between_bounds(attempt, ceiling_s):
    asked: list[tuple[float, float]] = []

    def recording(low: float, high: float) -> float:
        asked.append((low, high))
        return (low + high) / 2

    overrides = {"max_attempts": 10}
    assert judge(503, attempt, highest, **overrides).retry_after_s == ceiling_s
    assert judge(503, attempt, lowest, **overrides).retry_after_s == INITIAL_WAIT_S / 2
    assert judge(503, attempt, recording, **overrides).retry_after_s == pytest.approx(
        (INITIAL_WAIT_S / 2 + ceiling_s) / 2
    )
    assert asked == [(INITIAL_WAIT_S / 2, ceiling_s)]


@pytest.mark.parametrize("jitter", [lowest, highest, random.uniform])
def test_wait_never_exceeds_a_max_wait_below_half_the_initial_wait(jitter):
    for attempt in range(1, 5):
        verdict = judge(None, attempt, jitter, initial_wait_s=1.0, max_wait_s=0.2)
        assert verdict.retry_after_s is not None
        assert 0 < verdict.retry_after_s <= 0.2


def test_very_many_attempts_still_wait_within_the_max():
    for attempt in (64, 1100, 5000):
        verdict = judge(None, attempt, highest, max_attempts=10_000)
        assert verdict.retry_after_s == MAX_WAIT_S


def test_default_jitter_stays_within_bounds():
    rng = random.Random(1234)
    for _ in range(500):
        attempt = rng.randint(1, MAX_ATTEMPTS - 1)
        verdict = judge(None, attempt)
        ceiling_s = min(MAX_WAIT_S, INITIAL_WAIT_S * 2 ** (attempt - 1))
        assert verdict.retry_after_s is not None
        assert INITIAL_WAIT_S / 2 <= verdict.retry_after_s <= ceiling_s


# settling messages and outcome labels


@pytest.mark.parametrize(
    ("ending", "action"),
    [
        (Ending.COMPLETED, Settle.ACK),  # outcome reported: the stream may forget it
        (Ending.MALFORMED, Settle.TERM),  # can never succeed: no redelivery
        (Ending.INTERRUPTED, Settle.NAK),  # shutdown: another worker takes it at once
        (Ending.CRASHED, Settle.NAK_LATER),  # our own failure: kept, retried after a pause
    ],
)
def test_settle(ending, action):
    assert settle(ending) is action


def test_every_ending_is_settled():
    for ending in Ending:
        assert isinstance(settle(ending), Settle)


@pytest.mark.parametrize(
    ("status", "label"),
    [
        (200, "succeeded"),
        (202, "succeeded"),
        (299, "succeeded"),
        (199, "failed"),
        (301, "failed"),
        (404, "failed"),
        (500, "failed"),
        (502, "failed"),
        (504, "failed"),
    ],
)
def test_outcome_label(status, label):
    assert outcome_label(status) == label


# the lease


@pytest.mark.parametrize(
    ("ack_wait_s", "interval_s"),
    [
        (30.0, 10.0),
        (3.0, 1.0),
        (0.3, 0.1),
        (0.06, 0.05),  # not busier than 20 renewals a second
        (0.0, 0.05),
    ],
)
def test_heartbeat_interval(ack_wait_s, interval_s):
    assert heartbeat_interval_s(ack_wait_s) == pytest.approx(interval_s)


@pytest.mark.parametrize("ack_wait_s", [0.2, 1.0, 30.0, 600.0])
def test_lease_is_renewed_at_least_twice_per_ack_wait(ack_wait_s):
    assert heartbeat_interval_s(ack_wait_s) * 2 < ack_wait_s
