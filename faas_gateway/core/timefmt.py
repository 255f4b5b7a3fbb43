"""Times and durations as text: Go durations as OpenFaaS writes them (``60``, ``2.5``,
``1m5s``), and RFC 3339 times with milliseconds in UTC both ways (``2026-11-23T08:00:00.120Z``)."""

import functools
import math
import re
import time
from datetime import UTC, datetime, timedelta

_GO_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_S = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_duration_s(value: object) -> float:
    """Return seconds for ``value``; raise ValueError with the accepted forms otherwise."""
    if isinstance(value, bool):
        raise ValueError("a duration must be seconds or a Go duration like '1m5s', not a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _parse_text(value.strip())
    else:
        raise ValueError(f"a duration must be seconds or a Go duration like '1m5s', got {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"a duration must be a finite number of seconds >= 0, got {value!r}")
    return seconds


def _parse_text(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    position = 0
    total_s = 0.0
    for match in _GO_PART.finditer(text):
        if match.start() != position:
            break
        total_s += float(match.group(1)) * _UNIT_S[match.group(2)]
        position = match.end()
    if position == 0 or position != len(text):
        raise ValueError(
            f"invalid duration {text!r}: use seconds (60, 2.5) or a Go duration (65s, 1m5s, 500ms)"
        )
    return total_s


def format_duration_s(seconds: float) -> str:
    """Shortest readable form, for help texts and logs: 90s, 2.5s, 72h, 1h30m."""
    if seconds != int(seconds) or seconds < 3600 or seconds % 60:
        return f"{int(seconds)}s" if seconds == int(seconds) else f"{seconds:g}s"
    hours, minutes = divmod(int(seconds) // 60, 60)
    return f"{hours}h" + (f"{minutes}m" if minutes else "")


def rfc3339_ms(unix_ns: int | None) -> str | None:
    """``2026-11-23T08:00:00.120Z`` for a time in Unix nanoseconds."""
    if unix_ns is None:
        return None
    seconds, fraction_ns = divmod(unix_ns, 1_000_000_000)
    return f"{_utc_second(seconds)}.{fraction_ns // 1_000_000:03d}Z"


def now_rfc3339() -> str:
    return rfc3339_ms(time.time_ns()) or ""


@functools.lru_cache(maxsize=8)
def _utc_second(unix_s: int) -> str:
    # Every record is encoded up to three times with three times in it; most share a second.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(unix_s))


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_rfc3339_ns(text: str) -> int:
    """RFC 3339 (``Z`` or an offset) to Unix nanoseconds; ValueError if it is not one."""
    if len(text) == 24 and text[19] == "." and text[23] == "Z" and text[20:23].isdigit():
        # The form rfc3339_ms writes (every record's times): the second is parsed once.
        return _utc_second_ns(text[:19]) + int(text[20:23]) * 1_000_000
    moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone")
    # Integer arithmetic: a float timestamp loses the last digits of nanoseconds.
    return (moment - _EPOCH) // timedelta(microseconds=1) * 1000


@functools.lru_cache(maxsize=64)
def _utc_second_ns(text: str) -> int:
    # A worker reads each record's times back before writing it again; most share a second.
    return parse_rfc3339_ns(text + "Z")
