"""The RFC 7240 Prefer header, as far as the gateway honours it: respond-async and wait=N."""

from dataclasses import dataclass

PREFER = "Prefer"
PREFERENCE_APPLIED = "Preference-Applied"


@dataclass(frozen=True, slots=True)
class Preferences:
    respond_async: bool = False
    wait_s: float | None = None


NO_PREFERENCES = Preferences()


def parse_prefer(values: list[str]) -> Preferences:
    """Every Prefer header of a request; unknown or malformed preferences are ignored, as
    RFC 7240 asks. The first of a repeated preference wins."""
    respond_async = False
    wait_s: float | None = None
    for value in values:
        for item in value.split(","):
            token = item.split(";", 1)[0].strip()  # parameters after ';' mean nothing here
            name, _, raw = token.partition("=")
            name = name.strip().lower()
            if name == "respond-async":
                respond_async = True
            elif name == "wait" and wait_s is None:
                wait_s = _seconds(raw.strip().strip('"'))
    return Preferences(respond_async, wait_s)


def _seconds(text: str) -> float | None:
    # RFC 7240 has delta-seconds (digits); fractions are accepted as a courtesy.
    try:
        seconds = float(text)
    except ValueError:
        return None
    if not 0 <= seconds < float("inf"):
        return None
    return seconds


def wait_applied(wait_s: float) -> str:
    return f"wait={wait_s:g}"
