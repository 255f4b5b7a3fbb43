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
