"""Callback URL policy and signatures, as tables; no network."""

import base64
import hashlib
import hmac
import ipaddress
import time

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from faas_gateway.core.callback_policy import HostPolicy, sign, signing_keys, webhook_id

KEY_A = bytes(range(32))
KEY_B = bytes(range(100, 124))
SECRET_A = "whsec_" + base64.b64encode(KEY_A).decode()
SECRET_B = "whsec_" + base64.b64encode(KEY_B).decode()

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


@pytest.mark.parametrize(
    ("secrets", "keys"),
    [
        ("", ()),
        ("  ", ()),
        (SECRET_A, (KEY_A,)),
        (f"{SECRET_A} {SECRET_B}", (KEY_A, KEY_B)),  # rotation: sign with both
        (f"{SECRET_A},{SECRET_B}", (KEY_A, KEY_B)),
        (f" {SECRET_A} ,\t{SECRET_B} ", (KEY_A, KEY_B)),
        (SECRET_A.rstrip("="), (KEY_A,)),  # padding is optional
    ],
)
def test_signing_secrets_are_whsec_base64(secrets, keys):
    assert signing_keys(secrets) == keys


@pytest.mark.parametrize(
    ("secrets", "problem"),
    [
        ("s3cret-that-is-long-enough-to-be-a-key", "secret 1 of 1 does not start with whsec_"),
        (base64.b64encode(KEY_A).decode(), "secret 1 of 1 does not start with whsec_"),
        (f"{SECRET_A} s3cret", "secret 2 of 2 does not start with whsec_"),
        ("whsec_" + base64.urlsafe_b64encode(b"\xfb" * 30).decode(), "is not base64"),
        ("whsec_not*base64*at*all*", "is not base64"),
        ("whsec_" + base64.b64encode(b"x" * 23).decode(), "holds 23 bytes"),
        ("whsec_", "holds 0 bytes"),
    ],
)
def test_unusable_signing_secrets_are_refused_without_being_repeated(secrets, problem):
    with pytest.raises(ValueError, match=problem) as refused:
        signing_keys(secrets)
    message = str(refused.value)
    assert "whsec_ followed by the base64 of at least 24 random bytes" in message
    for secret in secrets.split():
        if secret != "whsec_":
            assert secret.removeprefix("whsec_") not in message


def test_signature_is_standard_webhooks_v1_over_id_timestamp_body():
    message_id = webhook_id("call-1.a", "echo", 200)
    assert message_id == "call-1.a:echo:200"
    body = b'{"ok":true}'
    content = b"call-1.a:echo:200.1700000000." + body
    expected = [
        "v1," + base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()
        for key in (KEY_A, KEY_B)
    ]
    assert sign([KEY_A], message_id, 1700000000, body) == expected[0]
    assert sign([KEY_A, KEY_B], message_id, 1700000000, body) == " ".join(expected)


def test_the_standardwebhooks_package_verifies_our_signatures_with_either_secret():
    body = b'{"result": "done"}'
    timestamp = int(time.time())
    headers = {
        "webhook-id": webhook_id("c1", "echo", 200),
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(
            signing_keys(f"{SECRET_A} {SECRET_B}"), "c1:echo:200", timestamp, body
        ),
    }
    for secret in (SECRET_A, SECRET_B):
        assert Webhook(secret).verify(body, headers) == {"result": "done"}
    other = "whsec_" + base64.b64encode(bytes(24)).decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET_A).verify(body, {**headers, "webhook-id": "c2:echo:200"})
