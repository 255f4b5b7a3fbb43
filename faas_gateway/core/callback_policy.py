"""Which callback URLs may be called, and how receivers can trust a callback: pure functions.

Signatures follow Standard Webhooks: ``webhook-signature: v1,<base64 HMAC-SHA256>`` of
``"<webhook-id>.<webhook-timestamp>.<body>"``, one for each secret (``whsec_<base64>``) while a
secret is rotated. The body is the function's own response, so the call id, function and
status are bound through the signed id, ``<call id>:<function>:<status>``: neither a call id
nor a function name can hold a colon, and the status is digits, so a signature made for one
call cannot be read as another's (see the verifier in docs/api.md).

Allowed hosts (``callback_allowed_hosts``, comma-separated): host names (``hooks.example.com``),
wildcards (``*.example.com``: any name below it) and CIDRs (``10.0.0.0/8``, ``::1/128``). Empty
(the default): every host, except that no callback goes to a link-local address (169.254.0.0/16
holds the cloud metadata endpoints). With a list, a URL is allowed when its host name matches a
name or wildcard, or when the addresses it resolves to all lie in listed CIDRs; link-local
addresses then only pass if a CIDR names them. An unspecified address (0.0.0.0, ::) never
passes: connecting to it reaches this host's own services.

An IPv6 address that carries an IPv4 one (IPv4-mapped, IPv4-compatible, NAT64, 6to4) is judged
as that IPv4 address, against the list too: the packets end up there.

The gateway checks at enqueue (400), and the sender checks each address it is about to connect
to, on every redirect hop, so a name that resolves elsewhere later (DNS rebinding) is caught.
"""

import base64
import binascii
import hashlib
import hmac
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

SECRET_PREFIX = "whsec_"
MIN_SECRET_BYTES = 24  # Standard Webhooks: at least 192 bits
SECRET_FORMAT = (
    f"each secret is {SECRET_PREFIX} followed by the base64 of at least {MIN_SECRET_BYTES} "
    "random bytes (Standard Webhooks), several separated by spaces or commas; make one with: "
    "python3 -c \"import base64, os; print('whsec_' + base64.b64encode(os.urandom(32)).decode())\""
)


def signing_keys(secrets: str) -> tuple[bytes, ...]:
    """The HMAC keys of ``callback_signing_secret``; none when it is empty.

    A secret without the prefix is refused rather than taken as raw bytes: receivers' Standard
    Webhooks libraries read every secret as base64, and would never agree with us. The error
    says which secret is wrong by position, never what it holds.
    """
    keys: list[bytes] = []
    given = [secret for secret in re.split(r"[\s,]+", secrets) if secret]
    for position, secret in enumerate(given, 1):
        which = f"secret {position} of {len(given)}"
        if not secret.startswith(SECRET_PREFIX):
            raise ValueError(f"{which} does not start with {SECRET_PREFIX}: {SECRET_FORMAT}")
        encoded = secret.removeprefix(SECRET_PREFIX)
        try:
            # Padding is optional, as in the reference libraries.
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except binascii.Error as exc:
            message = f"{which} is not base64 after {SECRET_PREFIX}: {SECRET_FORMAT}"
            raise ValueError(message) from exc
        if len(key) < MIN_SECRET_BYTES:
            raise ValueError(f"{which} holds {len(key)} bytes: {SECRET_FORMAT}")
        keys.append(key)
    return tuple(keys)


def webhook_id(call_id: str, function: str, status_code: int) -> str:
    return f"{call_id}:{function}:{status_code}"


def sign(keys: Iterable[bytes], message_id: str, timestamp: int, body: bytes) -> str:
    """``webhook-signature``: ``v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`` for each
    key, space-separated."""
    signer = Signer(keys, message_id, timestamp)
    signer.update(body)  # not joined to the head: a body can be large
    return signer.signature()


class Signer:
    """``sign`` for a body read piece by piece (one too large to hold)."""

    def __init__(self, keys: Iterable[bytes], message_id: str, timestamp: int) -> None:
        head = f"{message_id}.{timestamp}.".encode()
        self._macs = [hmac.new(key, head, hashlib.sha256) for key in keys]

    def update(self, piece: bytes) -> None:
        for mac in self._macs:
            mac.update(piece)

    def signature(self) -> str:
        return " ".join("v1," + base64.b64encode(mac.digest()).decode() for mac in self._macs)


# RFC 6052's well-known NAT64 prefix: a translator sends these on to the IPv4 address inside.
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# RFC 4291's deprecated IPv4-compatible addresses, ::a.b.c.d; :: and ::1 are not among them.
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries: ::ffff:a.b.c.d, ::a.b.c.d, NAT64, 6to4."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:  # 2002::/16, the IPv4 address in bits 16-47
        return address.sixtofour
    if address in NAT64 or (address in IPV4_COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def judged_as(address: IPAddress) -> IPAddress:
    embedded = embedded_ipv4(address)
    return address if embedded is None else embedded


def never_allowed_by_default(address: IPAddress) -> bool:
    judged = judged_as(address)
    return judged.is_link_local or judged.is_unspecified


def parse_address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class HostPolicy:
    names: frozenset[str]
    suffixes: tuple[str, ...]  # from wildcards: ".example.com"
    networks: tuple[IPNetwork, ...]

    @classmethod
    def parse(cls, spec: str) -> "HostPolicy":
        names: set[str] = set()
        suffixes: list[str] = []
        networks: list[IPNetwork] = []
        for raw in spec.split(","):
            entry = raw.strip().lower()
            if not entry:
                continue
            if entry.startswith("*."):
                suffixes.append(entry[1:])
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            if "/" in entry or "*" in entry:
                raise ValueError(f"callback_allowed_hosts: cannot read {raw.strip()!r}")
            names.add(entry.rstrip("."))
        return cls(frozenset(names), tuple(suffixes), tuple(networks))

    @property
    def open(self) -> bool:
        return not (self.names or self.suffixes or self.networks)

    def allows_name(self, host: str) -> bool | None:
        """True or False when the host itself decides; None when its addresses must."""
        host = host.lower().rstrip(".")
        address = parse_address(host)
        if address is not None:
            return self.allows_address(address)
        if self.open:
            return None  # any name, as long as it does not lead to a forbidden address
        if host in self.names or any(host.endswith(suffix) for suffix in self.suffixes):
            return True
        return None if self.networks else False

    def allows_address(self, address: IPAddress) -> bool:
        judged = judged_as(address)
        if judged.is_unspecified:
            return False
        if any(judged in network for network in self.networks):
            return True
        if self.open:
            return not never_allowed_by_default(judged)
        return False

    def allows_connection(self, host: str, address: IPAddress) -> bool:
        """At send time: the URL's host and the address the connection actually reached."""
        by_name = self.allows_name(host)
        if by_name is True and parse_address(host) is None:
            # A listed name is trusted wherever it resolves, except to the forbidden places.
            return self.allows_address(address) or not never_allowed_by_default(address)
        if by_name is False:
            return False
        return self.allows_address(address)
