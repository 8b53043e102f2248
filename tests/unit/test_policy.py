"""Relay permission: the open-relay matrix, without sockets."""

import ipaddress

import pytest

from twistedrelay.policy import RelayPolicy
from twistedrelay.smtp import replies

POLICY = RelayPolicy(
    [ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128")],
    ["example.org", ".sub.example.net"],
    "admin@example.org",
)


@pytest.mark.parametrize(
    ("client", "authenticated", "domain", "permitted"),
    [
        ("127.0.0.1", False, "example.org", True),
        ("127.0.0.1", False, "foreign.test", True),
        ("127.0.0.2", False, "example.org", True),
        ("127.0.0.2", False, "foreign.test", False),
        ("127.0.0.2", True, "foreign.test", True),
        ("::1", False, "foreign.test", True),
        ("::ffff:127.0.0.1", False, "foreign.test", True),
        ("::ffff:127.0.0.2", False, "foreign.test", False),
        ("192.0.2.1", False, "a.sub.example.net", True),
        ("192.0.2.1", False, "sub.example.net", False),
        ("192.0.2.1", False, "EXAMPLE.ORG.", True),
        ("192.0.2.1", False, "", True),
        ("not-an-ip", False, "foreign.test", False),
    ],
)
def test_relay_matrix(client: str, authenticated: bool, domain: str, permitted: bool) -> None:
    """Trusted networks and authenticated clients relay anywhere; others only to our domains."""
    reply = POLICY.check_recipient(
        client, authenticated, f"user@{domain}" if domain else "postmaster"
    )
    assert (reply is None) is permitted
    if not permitted:
        assert reply == replies.RELAY_DENIED
        assert (reply.code, reply.enhanced) == (554, "5.7.1")


def test_empty_mynetworks_trusts_nobody() -> None:
    """With no mynetworks, even loopback is a stranger."""
    policy = RelayPolicy([], [], "postmaster@relay.test")
    assert policy.check_recipient("127.0.0.1", False, "a@foreign.test") == replies.RELAY_DENIED


@pytest.mark.parametrize("recipient", ["postmaster", "Postmaster", "POSTMASTER"])
def test_bare_postmaster_is_queued_for_the_postmaster_mailbox(recipient: str) -> None:
    """RFC 5321 §4.5.1: <postmaster> in any case goes to the configured mailbox."""
    assert POLICY.queued_recipient(recipient) == "admin@example.org"


@pytest.mark.parametrize(
    "recipient", ["postmaster@example.org", "postmaster@foreign.test", "user@example.org"]
)
def test_other_recipients_are_queued_as_given(recipient: str) -> None:
    """Only the bare form is special: postmaster@domain is an ordinary mailbox."""
    assert POLICY.queued_recipient(recipient) == recipient


@pytest.mark.parametrize(
    "recipient",
    ["a%evil.test@example.org", "evil.test!a@example.org", '"a@evil.test"@example.org'],
)
def test_sender_routed_local_parts_are_refused_to_strangers(recipient: str) -> None:
    """allow_untrusted_routing = no: a stranger cannot route through our domains; trusted or
    authenticated clients can (their relaying is allowed anyway)."""
    assert POLICY.check_recipient("192.0.2.1", False, recipient) == replies.RELAY_DENIED
    assert POLICY.check_recipient("127.0.0.1", False, recipient) is None
    assert POLICY.check_recipient("192.0.2.1", True, recipient) is None
