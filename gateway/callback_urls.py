"""X-Callback-Url at enqueue: an absolute http(s) URL to a host callback_allowed_hosts allows.

The worker checks again, against the address it actually connects to (DNS rebinding).
"""

import asyncio
import logging
import socket
from urllib.parse import urlsplit

from faas_gateway.core.callback_policy import HostPolicy, IPAddress, parse_address
from faas_gateway.core.headers import CALLBACK_URL
from gateway.errors import InvalidRequestError

log = logging.getLogger("faas.gateway")

RESOLVE_TIMEOUT_S = 2.0
# Names are resolved to check where they lead; async calls with callbacks come in bursts to
# few receivers, so a lookup is kept briefly instead of costing every request a getaddrinfo.
RESOLVED_KEEP_S = 10.0
RESOLVED_MAX_NAMES = 1024


def parse_callback_url(value: str) -> tuple[str, int]:
    """The URL's host and port, or InvalidRequestError (400)."""
    not_absolute = InvalidRequestError(f"{CALLBACK_URL} must be an absolute http or https URL")
    try:
        parts = urlsplit(value)
    except ValueError as exc:  # an unclosed IPv6 bracket, say; a client error, not ours
        raise not_absolute from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise not_absolute
    try:
        port = parts.port  # raises ValueError for a port that is not a number in range
    except ValueError as exc:
        raise InvalidRequestError(f"{CALLBACK_URL} has an invalid port") from exc
    try:
        # The worker's HTTP client resolves names through IDNA; a name it cannot encode (an
        # empty or over-long label) would fail every delivery attempt after the call ran.
        parts.hostname.encode("idna")
    except UnicodeError as exc:
        raise InvalidRequestError(f"{CALLBACK_URL} has an invalid host name") from exc
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


class CallbackUrls:
    def __init__(self, allowed_hosts: str) -> None:
        self._policy = HostPolicy.parse(allowed_hosts)
        self._resolved: dict[tuple[str, int], tuple[float, list[IPAddress]]] = {}

    async def validate(self, value: str | None) -> str | None:
        if value is None:
            return None
        host, port = parse_callback_url(value)
        refused = InvalidRequestError(
            f"{CALLBACK_URL} host {host!r} is not allowed (callback_allowed_hosts; link-local "
            "and unspecified addresses never are)"
        )
        verdict = self._policy.allows_name(host)
        if verdict is False:
            raise refused
        if verdict is None and parse_address(host) is None:
            for address in await self._resolve(host, port):
                if not self._policy.allows_address(address):
                    raise refused
        return value

    async def _resolve(self, host: str, port: int) -> list[IPAddress]:
        """Addresses of a name; none when it cannot be resolved now (the sender decides)."""
        loop = asyncio.get_running_loop()
        kept = self._resolved.get((host, port))
        if kept is not None and kept[0] > loop.time():
            return kept[1]
        addresses = await self._lookup(host, port)
        if len(self._resolved) >= RESOLVED_MAX_NAMES:
            self._resolved.clear()
        self._resolved[(host, port)] = (loop.time() + RESOLVED_KEEP_S, addresses)
        return addresses

    async def _lookup(self, host: str, port: int) -> list[IPAddress]:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT_S):
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError) as exc:
            log.debug("callback host %s does not resolve now: %s", host, exc)
            return []
        addresses = []
        for *_, sockaddr in infos:
            address = parse_address(str(sockaddr[0]))
            if address is not None:
                addresses.append(address)
        return addresses
