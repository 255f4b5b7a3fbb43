"""Calls that would come back to this gateway: refused at deploy, and stopped in flight.

A function whose URL is the gateway's own address calls itself through the gateway for ever;
so does a function that passes its request on to the gateway, on purpose or by a wrong URL
behind a load balancer. The first is refused when the function is registered (400, or the
functions file stops start-up). The second cannot be seen from a URL, so every request the
gateway forwards carries a ``Via`` entry (RFC 9110 7.6.3) naming this gateway process and the
function:

    Via: 1.1 faas-gateway-3f9a2c1d5e7b (function echo)

The worker passes it on with the rest of a queued call's headers. A request that arrives with
this process's entry for the same function has been here before (508 Loop Detected), as has
one that passed through MAX_GATEWAY_HOPS gateways already (loops through several gateway
processes). Functions may still call other functions through the gateway with the headers
they got: a chain A -> B -> C is no loop.
"""

import asyncio
import ipaddress
import secrets
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from multidict import MultiMapping

from gateway.errors import LoopDetectedError

VIA = "Via"
RECEIVED_BY_PREFIX = "faas-gateway-"
# More gateway entries than this in one request's Via: a loop through several gateways (each
# one sees only its own entry), or a chain no design needs.
MAX_GATEWAY_HOPS = 10
# A deploy waits this long at most for the function's host name to resolve.
RESOLVE_TIMEOUT_S = 2.0

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Hops:
    """This gateway process's Via entries: added to what it forwards, looked for in what it
    takes. One per process, shared by the sync and async routes."""

    def __init__(self, instance: str | None = None) -> None:
        self.received_by = RECEIVED_BY_PREFIX + (instance or secrets.token_hex(6))

    def via_for(self, incoming: MultiMapping[str], function: str) -> str:
        """The Via to forward a call of ``function`` with; LoopDetectedError if this request
        has been here for that function already, or through too many gateways."""
        mark = f"{self.received_by} (function {function})"
        entry = f"1.1 {mark}"
        values = incoming.getall(VIA, None)
        if not values:  # nearly every request: one lookup, nothing to search
            return entry
        via = ", ".join(values)
        if mark in via:
            raise LoopDetectedError(
                f"this request has come back through the gateway to function {function!r}: "
                "a loop (see its Via header)"
            )
        if via.count(RECEIVED_BY_PREFIX) >= MAX_GATEWAY_HOPS:
            raise LoopDetectedError(
                f"this request has passed through {MAX_GATEWAY_HOPS} gateways already: "
                "a loop (see its Via header)"
            )
        return f"{via}, {entry}"


# --- function URLs that are the gateway's own address ------------------------------------------


async def gateway_url_problem(url: str, gateway_host: str, gateway_port: int) -> str | None:
    """Why a function at ``url`` would be this gateway itself, or None (at deploy)."""
    if not _same_port(url, gateway_port):  # most URLs: no name to resolve
        return None
    return own_address_problem(
        url,
        gateway_host,
        gateway_port,
        await resolve_async(urlsplit(url).hostname or ""),
        await resolve_async(gateway_host),
    )


def gateway_url_problem_now(url: str, gateway_host: str, gateway_port: int) -> str | None:
    """gateway_url_problem, blocking: for the functions file at start-up."""
    if not _same_port(url, gateway_port):
        return None
    return own_address_problem(
        url,
        gateway_host,
        gateway_port,
        resolve(urlsplit(url).hostname or ""),
        resolve(gateway_host),
    )


def _same_port(url: str, gateway_port: int) -> bool:
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # out of range: no one listens there, the gateway least of all
        return False
    return gateway_port != 0 and port == gateway_port


def own_address_problem(
    url: str,
    gateway_host: str,
    gateway_port: int,
    url_addresses: Iterable[IPAddress],
    gateway_addresses: Iterable[IPAddress],
) -> str | None:
    """Why ``url``, on the gateway's port, is this gateway, or None. The addresses are what
    the URL's host and ``gateway_host`` resolve to."""
    listening_on_all = gateway_host in ("", "0.0.0.0", "::")
    ours = set(gateway_addresses)
    for address in url_addresses:
        if address.is_unspecified:
            # Connecting to 0.0.0.0 or :: reaches this machine.
            address = ipaddress.ip_address("::1" if address.version == 6 else "127.0.0.1")
        if address in ours or (listening_on_all and _is_this_machine(address)):
            listening = f"[{gateway_host}]" if ":" in gateway_host else gateway_host or "*"
            return (
                f"url {url!r} points at this gateway ({listening}:{gateway_port}), "
                "which would call itself for ever"
            )
    return None


def _is_this_machine(address: IPAddress) -> bool:
    """Loopback, or an address of one of this machine's interfaces: one it can bind to."""
    if address.is_loopback:
        return True
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((str(address), 0))
    except OSError:
        return False
    return True


def resolve(host: str) -> set[IPAddress]:
    """The addresses ``host`` names; none if it does not resolve (then it is not us, as far
    as anyone can tell now)."""
    literal = _literal(host)
    if literal is not None:
        return {literal}
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return set()
    return _addresses(infos)


async def resolve_async(host: str) -> set[IPAddress]:
    literal = _literal(host)
    if literal is not None:
        return {literal}
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT_S):
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, None, type=socket.SOCK_STREAM
            )
    except (OSError, UnicodeError, TimeoutError):
        return set()
    return _addresses(infos)


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


def _addresses(infos: Iterable[tuple[object, ...]]) -> set[IPAddress]:
    found: set[IPAddress] = set()
    for info in infos:
        sockaddr = info[4]
        assert isinstance(sockaddr, tuple)
        literal = _literal(str(sockaddr[0]))
        if literal is not None:
            found.add(literal)
    return found
