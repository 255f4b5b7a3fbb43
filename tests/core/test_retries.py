"""The retry decision for function calls, as a table; no NATS, no clock."""

import pytest
from pydantic import ValidationError

from faas_gateway.core.functions import FunctionSpec
from faas_gateway.core.retry import (
    DONE,
    CallVerdict,
    InvalidRetryPolicyError,
    RetryPolicy,
    judge_call_attempt,
    parse_codes,
    parse_retry_after_s,
)
from queue_worker.settings import WorkerSettings

POLICY = RetryPolicy(
    max_attempts=4,
    retry_codes=parse_codes("408,429,500,502,503,504"),
    min_wait_s=1.0,
    max_wait_s=6.0,
)


def ceiling(low: float, high: float) -> float:
    return high


@pytest.mark.parametrize(
    ("status", "unreachable", "attempt", "retry_after_s", "expected"),
    [
        (200, False, 1, None, DONE),
        (204, False, 3, None, DONE),
        (400, False, 1, None, DONE),  # not retryable: final at once
        (404, False, 1, None, DONE),
        (501, False, 1, None, DONE),  # not in the codes
        (500, False, 1, None, CallVerdict(final=False, wait_s=1.0)),
        (500, False, 2, None, CallVerdict(final=False, wait_s=2.0)),
        (500, False, 3, None, CallVerdict(final=False, wait_s=4.0)),
        (500, False, 4, None, DONE),  # attempts used up
        (502, True, 1, None, CallVerdict(final=False, wait_s=1.0)),  # unreachable
        (504, True, 3, None, CallVerdict(final=False, wait_s=4.0)),  # timed out
        (503, False, 1, 3.0, CallVerdict(final=False, wait_s=3.0)),  # Retry-After honoured
        (429, False, 1, 0.0, CallVerdict(final=False, wait_s=1.0)),  # never below min_wait
        (503, False, 1, 3600.0, CallVerdict(final=False, wait_s=6.0)),  # nor above max_wait
        (500, False, 1, 3.0, CallVerdict(final=False, wait_s=1.0)),  # only on 429 and 503
        (503, False, 4, 3.0, DONE),
    ],
)
def test_judge_call_attempt(status, unreachable, attempt, retry_after_s, expected):
    verdict = judge_call_attempt(status, unreachable, attempt, POLICY, retry_after_s, ceiling)
    assert verdict == expected


def test_waits_grow_to_the_cap_and_jitter_stays_within_it():
    waits = [
        judge_call_attempt(500, False, attempt, POLICY, jitter=ceiling).wait_s
        for attempt in (1, 2, 3)
    ]
    assert waits == [1.0, 2.0, 4.0]
    many = RetryPolicy(100, frozenset({500}), 1.0, 6.0)
    assert judge_call_attempt(500, False, 99, many, jitter=ceiling).wait_s == 6.0
    for attempt in range(1, 99):
        wait_s = judge_call_attempt(500, False, attempt, many).wait_s
        assert 1.0 <= wait_s <= 6.0


def test_annotations_override_the_policy():
    annotations = {
        "com.openfaas.retry.attempts": "2",
        "com.openfaas.retry.codes": "429, 500-503",
        "com.openfaas.retry.min_wait": "500ms",
        "com.openfaas.retry.max_wait": "1m",
    }
    policy = POLICY.overridden_by(annotations)
    assert policy == RetryPolicy(2, frozenset({429, 500, 501, 502, 503}), 0.5, 60.0)
    assert POLICY.overridden_by({}) == POLICY
    assert POLICY.overridden_by({"com.openfaas.retry.codes": ""}).retry_codes == frozenset()
    for bad in ({"com.openfaas.retry.attempts": "0"}, {"com.openfaas.retry.codes": "99"}):
        with pytest.raises(InvalidRetryPolicyError):
            POLICY.overridden_by(bad)


def test_retry_after_in_seconds_or_as_an_http_date():
    now = 1_795_392_000.0  # 2026-11-23T00:00:00Z
    assert parse_retry_after_s("7", now) == 7.0
    assert parse_retry_after_s("Mon, 23 Nov 2026 00:00:30 GMT", now) == 30.0
    assert parse_retry_after_s("Mon, 23 Nov 2026 00:00:00 GMT", now + 5) == 0.0
    assert parse_retry_after_s("soon", now) is None
    assert parse_retry_after_s(None, now) is None


@pytest.mark.parametrize(
    ("annotations", "allowed"),
    [
        ({"com.openfaas.retry.attempts": "1000"}, True),
        ({"com.openfaas.retry.attempts": "1001"}, False),
        ({"com.openfaas.retry.attempts": "1000000000000"}, False),
        ({"com.openfaas.retry.min_wait": "24h"}, True),
        ({"com.openfaas.retry.min_wait": "1e300"}, False),
        ({"com.openfaas.retry.min_wait": "86401"}, False),
        ({"com.openfaas.retry.max_wait": "24h"}, True),
        ({"com.openfaas.retry.max_wait": "24h0m1s"}, False),
        ({"com.openfaas.retry.max_wait": "1e300h"}, False),
        ({"com.openfaas.retry.max_wait": "inf"}, False),
        ({"com.openfaas.retry.min_wait": "nan"}, False),
    ],
)
def test_annotations_are_bounded(annotations, allowed):
    """Waits up to 24 h and attempts up to 1000; beyond that the function is not registered,
    so a worker never meets a delay NATS cannot take."""
    entry = {"name": "f", "url": "http://127.0.0.1:1", "annotations": annotations}
    if allowed:
        POLICY.overridden_by(annotations)
        FunctionSpec.model_validate(entry)
        return
    with pytest.raises(InvalidRetryPolicyError):
        POLICY.overridden_by(annotations)
    with pytest.raises(ValidationError, match="retry annotations"):
        FunctionSpec.model_validate(entry)


@pytest.mark.parametrize(
    ("setting", "value", "allowed"),
    [
        ("max_retry_attempts", "1000", True),
        ("max_retry_attempts", "1001", False),
        ("max_retry_attempts", "0", False),
        ("initial_retry_wait", "24h", True),
        ("initial_retry_wait", "1e300", False),
        ("max_retry_wait", "86401", False),
        ("retry_http_codes", "429,500-504", True),
        ("retry_http_codes", "600", False),
    ],
)
def test_worker_retry_settings_have_the_same_bounds(setting, value, allowed):
    if allowed:
        WorkerSettings(**{setting: value})
        return
    with pytest.raises(ValidationError, match=setting):
        WorkerSettings(**{setting: value})
