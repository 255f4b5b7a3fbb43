"""Header names both processes use, and which headers a proxy must not pass on."""

from collections.abc import Iterable, Mapping

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
RETRY = "X-Retry"  # the attempt number, 1 for the first call
RETRY_MAX = "X-Retry-Max"  # attempts allowed in all
# Standard Webhooks' signature headers, on signed callbacks (faas_gateway/callback_policy.py).
WEBHOOK_ID = "webhook-id"
WEBHOOK_TIMESTAMP = "webhook-timestamp"
WEBHOOK_SIGNATURE = "webhook-signature"

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


def header(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    """The first value of header ``name`` (any case) in a list of pairs, or None."""
    lowered = name.lower()
    for key, value in headers:
        if key.lower() == lowered:
            return value
    return None


def end_to_end(
    headers: Mapping[str, str] | Iterable[tuple[str, str]], also_drop: frozenset[str] = frozenset()
) -> CIMultiDict[str]:
    """Copy headers without hop-by-hop ones, those named by Connection, and ``also_drop``.

    ``also_drop`` holds lower-case names. Copying the whole multidict and deleting the few
    names present is much cheaper than filtering item by item: this runs on every proxied call.
    """
    copy: CIMultiDict[str] = CIMultiDict(headers)
    for value in copy.getall("Connection", ()):
        for token in value.split(","):
            token = token.strip()
            if token:
                copy.popall(token, None)
    for name in HOP_BY_HOP:
        if name in copy:
            del copy[name]
    for name in also_drop:
        if name in copy:
            del copy[name]
    return copy
