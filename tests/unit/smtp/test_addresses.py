"""Tests for twistedrelay.smtp.addresses: RFC 5321 §4.1.2 paths and RFC 6531 UTF-8."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twistedrelay.smtp.addresses import (
    AddressError,
    check_mailbox,
    domain_of,
    is_ascii,
    parse_path,
)


@pytest.mark.parametrize(
    "path",
    [
        "<user@example.com>",
        "<first.last+tag@sub.example.co.uk>",
        "<!#$%&'*+-/=?^_`{|}~@example.com>",
        '<"john doe"@example.com>',
        '<"a\\"b@c"@example.com>',
        "<user@[192.0.2.1]>",
        "<user@[IPv6:2001:db8::1]>",
        "<user@localhost>",
        "<üser@exämple.de>",
        "<用户@例子.广告>",
    ],
)
def test_valid_paths_are_accepted(path: str) -> None:
    """Dot-strings, quoted strings, address literals and UTF-8 mailboxes parse."""
    assert parse_path(path) == path[1:-1]


@pytest.mark.parametrize(
    "path",
    [
        "user@example.com",
        "<user@example.com",
        "<user>",
        "<@example.com>",
        "<user@>",
        "<.user@example.com>",
        "<user.@example.com>",
        "<us..er@example.com>",
        "<user@example..com>",
        "<user@example.com.>",
        "<user@-example.com>",
        "<user@example-.com>",
        "<user@exa_mple.com>",
        "<us er@example.com>",
        '<"unterminated@example.com>',
        "<user@[300.0.0.1]>",
        "<user@[192.0.2.01]>",
        "<user@[IPv6:zz::1]>",
        "<user@[IPv6:fe80::1%eth0]>",
        "<user@[tag:content]>",
        "<user@[192.0.2.1>",
        "<user\x00@example.com>",
        "<user@exa\u200bmple.com>",
        "<\udcffuser@example.com>",
        "<>",
        "<postmaster>",
    ],
)
def test_invalid_paths_are_refused(path: str) -> None:
    """Malformed local parts, domains, literals and control characters raise AddressError."""
    with pytest.raises(AddressError):
        parse_path(path)


def test_null_path_only_where_allowed() -> None:
    """``<>`` is the null reverse-path when allow_null is set."""
    assert parse_path("<>", allow_null=True) == ""


def test_postmaster_without_domain_only_where_allowed() -> None:
    """``<Postmaster>`` (any case) is valid for RCPT (RFC 5321 §4.1.1.3)."""
    assert parse_path("<Postmaster>", allow_postmaster=True) == "Postmaster"


def test_source_route_is_dropped() -> None:
    """RFC 5321 Appendix C: a source route is accepted and ignored."""
    assert parse_path("<@hop1.example,@hop2.example:user@example.com>") == "user@example.com"


@pytest.mark.parametrize(
    "route", ["<@:user@example.com>", "<@hop1 user@example.com>", "<@x,y:u@e.com>"]
)
def test_bad_source_route_is_refused(route: str) -> None:
    """A malformed source route is a syntax error."""
    with pytest.raises(AddressError):
        parse_path(route)


def test_length_limits() -> None:
    """Local part 64, domain label 63 and path 256 octets (RFC 5321 §4.5.3.1)."""
    check_mailbox("a" * 64 + "@example.com")
    with pytest.raises(AddressError):
        check_mailbox("a" * 65 + "@example.com")
    with pytest.raises(AddressError):
        check_mailbox("a@" + "b" * 64 + ".com")
    # Octets, not characters: 22 three-byte characters are 66 octets.
    with pytest.raises(AddressError):
        check_mailbox("用" * 22 + "@example.com")
    long_domain = ".".join(["d" * 60] * 4)
    check_mailbox("a@" + long_domain)
    with pytest.raises(AddressError):
        parse_path("<" + "a" * 10 + "@" + long_domain + ".example>")


def test_domain_of() -> None:
    """The domain is after the last @, lower-cased; none for null and postmaster."""
    assert domain_of('"a@b"@Example.COM') == "example.com"
    assert domain_of("") == ""
    assert domain_of("postmaster") == ""


def test_is_ascii() -> None:
    """ASCII detection decides whether SMTPUTF8 is needed."""
    assert is_ascii("user@example.com")
    assert not is_ascii("üser@example.com")


@given(st.text(max_size=80))
def test_parse_path_only_raises_address_error(text: str) -> None:
    """Any text either parses to a mailbox inside the path or raises AddressError."""
    try:
        mailbox = parse_path(text, allow_null=True, allow_postmaster=True)
    except AddressError:
        return
    assert mailbox in text
