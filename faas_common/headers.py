"""Header names both processes use, and which headers a proxy must not pass on."""

from collections.abc import Iterable

from multidict import CIMultiDict

CALL_ID = "X-Call-Id"
START_TIME = "X-Start-Time"
DURATION_SECONDS = "X-Duration-Seconds"
CALLBACK_URL = "X-Callback-Url"
FUNCTION_NAME = "X-Function-Name"
FUNCTION_STATUS = "X-Function-Status"
FORWARDED_FOR = "X-Forwarded-For"
FORWARDED_HOST = "X-Forwarded-Host"
NATS_MSG_ID = "Nats-Msg-Id"

# RFC 9110 section 7.6.1, plus the non-standard ones proxies still meet in the wild.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)


def end_to_end(
    headers: Iterable[tuple[str, str]], also_drop: frozenset[str] = frozenset()
) -> CIMultiDict[str]:
    """Copy headers without hop-by-hop ones, those named by Connection, and ``also_drop``.

    ``also_drop`` holds lower-case names.
    """
    items = list(headers)
    dropped = set(HOP_BY_HOP) | also_drop
    for name, value in items:
        if name.lower() == "connection":
            dropped.update(token.strip().lower() for token in value.split(",") if token.strip())
    return CIMultiDict((name, value) for name, value in items if name.lower() not in dropped)
