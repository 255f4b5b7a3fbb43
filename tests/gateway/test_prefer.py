"""The Prefer header as the gateway reads it: respond-async and wait, as a table."""

import pytest

from gateway.request import Preferences, parse_prefer


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], Preferences()),
        (["wait=10"], Preferences(wait_s=10.0)),
        (["respond-async, wait=5"], Preferences(respond_async=True, wait_s=5.0)),
        (["Respond-Async", "WAIT=2.5"], Preferences(respond_async=True, wait_s=2.5)),
        (['wait="7"'], Preferences(wait_s=7.0)),
        (["wait=3;foo=bar, handling=lenient"], Preferences(wait_s=3.0)),
        (["wait=1", "wait=9"], Preferences(wait_s=1.0)),  # the first wins
        (["wait=soon"], Preferences()),  # malformed: ignored, as RFC 7240 asks
        (["wait=-1"], Preferences()),
        (["wait=inf"], Preferences()),
        (["respond-async"], Preferences(respond_async=True)),
        (["return=minimal"], Preferences()),
    ],
)
def test_prefer_header(headers: list[str], expected: Preferences) -> None:
    assert parse_prefer(headers) == expected
