"""Pure parts of activation records: the Prefer header and the record's time format."""

import pytest

from faas_gateway.core.timefmt import parse_rfc3339_ns, rfc3339_ms
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


def test_record_times_are_rfc3339_utc_with_milliseconds_and_read_back() -> None:
    unix_ns = 1_795_392_000_123_456_789
    text = rfc3339_ms(unix_ns)
    assert text == "2026-11-23T00:00:00.123Z"
    assert parse_rfc3339_ns(text) == 1_795_392_000_123_000_000
    assert rfc3339_ms(None) is None
    assert parse_rfc3339_ns("2026-11-23T01:00:00+01:00") == 1_795_392_000_000_000_000
    with pytest.raises(ValueError):
        parse_rfc3339_ns("2026-11-23T00:00:00")  # no zone
