"""Callback URL policy and signatures, as tables; no network."""

import hashlib
import hmac
import ipaddress

import pytest

from faas_common.callback_policy import HostPolicy, sign

OPEN = HostPolicy.parse("")
LISTED = HostPolicy.parse("hooks.example.com, *.corp.example, 10.0.0.0/8, ::1/128")


@pytest.mark.parametrize(
    ("policy", "host", "expected"),
    [
        (OPEN, "receiver.example.com", None),  # its addresses decide
        (OPEN, "127.0.0.1", True),
        (OPEN, "10.1.2.3", True),
        (OPEN, "169.254.169.254", False),  # cloud metadata
        (OPEN, "[fe80::1]", False),
        (OPEN, "0.0.0.0", False),
        (OPEN, "[::]", False),
        (OPEN, "[::ffff:169.254.169.254]", False),
        (LISTED, "hooks.example.com", True),
        (LISTED, "HOOKS.example.com.", True),
        (LISTED, "a.b.corp.example", True),
        (LISTED, "corp.example", None),  # not below the wildcard; CIDRs may still allow it
        (LISTED, "10.9.9.9", True),
        (LISTED, "[::1]", True),
        (LISTED, "192.168.1.1", False),
        (LISTED, "169.254.169.254", False),
        (HostPolicy.parse("hooks.example.com"), "other.example.com", False),
        # IPv6 forms that carry an IPv4 address are judged by that address.
        (OPEN, "[::169.254.169.254]", False),  # IPv4-compatible
        (OPEN, "[64:ff9b::169.254.169.254]", False),  # NAT64
        (OPEN, "[64:ff9b::a9fe:a9fe]", False),  # the same, written in hex
        (OPEN, "[2002:a9fe:a9fe::1]", False),  # 6to4: bits 16-47
        (OPEN, "[::ffff:0.0.0.0]", False),
        (OPEN, "[64:ff9b::0.0.0.0]", False),
        (OPEN, "[2002::]", False),  # 6to4 of 0.0.0.0
        (OPEN, "[::1]", True),  # loopback, not IPv4-compatible 0.0.0.1
        (OPEN, "[64:ff9b::93.184.216.34]", True),
        (OPEN, "[2002:5db8:d822::1]", True),
        (OPEN, "[2001:db8::a9fe:a9fe]", True),  # no IPv4 inside
        (LISTED, "[::ffff:10.1.2.3]", True),  # the CIDRs apply to the embedded IPv4
        (LISTED, "[64:ff9b::10.1.2.3]", True),
        (LISTED, "[2002:0a01:0203::]", True),
        (LISTED, "[::10.1.2.3]", True),
        (LISTED, "[64:ff9b::192.168.1.1]", False),
        (LISTED, "[2002:a9fe:a9fe::]", False),
        (HostPolicy.parse("64:ff9b::/96"), "[64:ff9b::169.254.169.254]", False),
        (HostPolicy.parse("169.254.0.0/16"), "[64:ff9b::169.254.169.254]", True),
        # Unspecified is never a callback target, whatever the list names.
        (HostPolicy.parse("0.0.0.0/0"), "0.0.0.0", False),
        (HostPolicy.parse("::/0"), "[::]", False),
        (HostPolicy.parse("0.0.0.0/0"), "[::ffff:0.0.0.0]", False),
    ],
)
def test_hosts_at_enqueue(policy, host, expected):
    assert policy.allows_name(host) == expected


@pytest.mark.parametrize(
    ("policy", "host", "address", "expected"),
    [
        (OPEN, "receiver.example.com", "93.184.216.34", True),
        (OPEN, "rebound.example.com", "169.254.169.254", False),  # DNS rebinding
        (LISTED, "hooks.example.com", "93.184.216.34", True),
        (LISTED, "hooks.example.com", "169.254.169.254", False),
        (LISTED, "corp.example", "10.0.0.5", True),
        (LISTED, "corp.example", "8.8.8.8", False),
        (HostPolicy.parse("169.254.0.0/16"), "metadata.internal", "169.254.169.254", True),
        # A name that leads to an IPv6 form of a forbidden IPv4 address.
        (OPEN, "rebound.example.com", "::169.254.169.254", False),
        (OPEN, "rebound.example.com", "64:ff9b::a9fe:a9fe", False),
        (OPEN, "rebound.example.com", "2002:a9fe:a9fe::", False),
        (OPEN, "rebound.example.com", "::ffff:169.254.169.254", False),
        (LISTED, "hooks.example.com", "64:ff9b::169.254.169.254", False),
        (LISTED, "hooks.example.com", "2002:a9fe:a9fe::", False),
        (LISTED, "corp.example", "64:ff9b::10.0.0.5", True),
        (LISTED, "corp.example", "2002:0808:0808::", False),
        # A name that leads to 0.0.0.0 or :: reaches this host's own services.
        (OPEN, "0", "0.0.0.0", False),
        (OPEN, "zero.example.com", "::", False),
        (OPEN, "zero.example.com", "64:ff9b::", False),
        (LISTED, "hooks.example.com", "0.0.0.0", False),
        (HostPolicy.parse("0.0.0.0/0"), "zero.example.com", "0.0.0.0", False),
        (HostPolicy.parse("zero.example.com, 0.0.0.0/8"), "zero.example.com", "0.0.0.0", False),
    ],
)
def test_addresses_at_send(policy, host, address, expected):
    assert policy.allows_connection(host, ipaddress.ip_address(address)) == expected


def test_unreadable_entries_are_refused():
    for spec in ("10.0.0.0/99", "a*.example.com", "host/path"):
        with pytest.raises(ValueError, match="callback_allowed_hosts"):
            HostPolicy.parse(spec)


def test_signature_is_hmac_sha256_of_timestamp_dot_body():
    expected = hmac.new(b"s3cret", b'1700000000.{"ok":true}', hashlib.sha256).hexdigest()
    assert sign("s3cret", "1700000000", b'{"ok":true}') == "sha256=" + expected
