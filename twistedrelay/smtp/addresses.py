"""Mailbox and path syntax of SMTP envelopes (RFC 5321 §4.1.2, RFC 6531).

Owns the question "is this a syntactically valid reverse-path / forward-path?" and the
small helpers that take addresses apart (``domain_of``). It does not decide whether an
address is *allowed* (that is policy.py) and does no DNS.

Invariant: every address this module accepts fits the RFC 5321 §4.5.3.1 length limits
(local part 64 octets, domain 255 octets, path 256 octets, counted in UTF-8) and contains
no control character, so it is safe to log and to store in an envelope.

UTF-8 (RFC 6531) is accepted by the syntax here: non-ASCII characters may appear in the
local part and in domain labels (U-labels). Whether UTF-8 is *permitted* in a given
transaction (the SMTPUTF8 parameter) is the session's decision; it uses ``is_ascii``.
U-labels are checked for printable characters only; full IDNA2008 validation is left to
delivery, which must convert them to A-labels anyway.
"""

from __future__ import annotations

import ipaddress
import re

MAX_LOCAL_PART_OCTETS = 64
MAX_DOMAIN_OCTETS = 255
MAX_PATH_OCTETS = 256
MAX_LABEL_OCTETS = 63

# Non-ASCII characters allowed by RFC 6531 (UTF8-non-ascii). Surrogates are excluded: they
# only appear when undecodable bytes were smuggled in through surrogateescape.
_UTF8 = "\u0080-\ud7ff\ue000-\U0010ffff"
# RFC 5321 §4.1.2 Atom = 1*atext; RFC 6531 §3.3 extends atext with UTF8-non-ascii.
_ATOM = rf"[A-Za-z0-9!#$%&'*+\-/=?^_`{{|}}~{_UTF8}]+"
_DOT_STRING = re.compile(rf"{_ATOM}(?:\.{_ATOM})*")
# RFC 5321 §4.1.2 Quoted-string = DQUOTE *QcontentSMTP DQUOTE
_QUOTED_STRING = re.compile(rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_UTF8}]|\\[\x20-\x7e])*"')
# RFC 5321 §4.1.2 sub-domain = Let-dig [Ldh-str]; RFC 6531 allows U-labels.
_LABEL = re.compile(rf"[A-Za-z0-9{_UTF8}](?:[A-Za-z0-9\-{_UTF8}]*[A-Za-z0-9{_UTF8}])?")


class AddressError(ValueError):
    """The text is not a valid mailbox or path; the message says why."""


def is_ascii(text: str) -> bool:
    """Whether ``text`` is pure ASCII (no SMTPUTF8 needed to carry it)."""
    return text.isascii()


def domain_of(address: str) -> str:
    """The domain of a mailbox, lower-cased; ``""`` for the null sender and ``postmaster``.

    :param address: a mailbox as returned by ``parse_path`` (the local part may be quoted
        and contain ``@``, so the last ``@`` separates the domain).
    """
    local, at, domain = address.rpartition("@")
    return domain.lower() if at else ""


def _octets(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def check_domain(domain: str) -> None:
    """Check a domain name or an address literal (RFC 5321 §4.1.2, §4.1.3).

    :raises AddressError: the domain is malformed or too long.
    """
    if not domain:
        raise AddressError("empty domain")
    if domain.startswith("["):
        _check_address_literal(domain)
        return
    if _octets(domain) > MAX_DOMAIN_OCTETS:
        raise AddressError("domain too long")
    for label in domain.split("."):
        if not _LABEL.fullmatch(label):
            raise AddressError(f"bad domain label {label!r}")
        if label.isascii():
            if len(label) > MAX_LABEL_OCTETS:
                raise AddressError("domain label too long")
        elif not label.isprintable():
            raise AddressError("unprintable character in domain")


def _check_address_literal(literal: str) -> None:
    """RFC 5321 §4.1.3: ``[IPv4]`` or ``[IPv6:address]``; general literals are refused."""
    if not literal.endswith("]") or len(literal) < 3:
        raise AddressError("bad address literal")
    inner = literal[1:-1]
    try:
        if inner[:5].upper() == "IPV6:":
            text = inner[5:]
            # ipaddress accepts a scope ID ("%eth0"), which RFC 5321 does not.
            if "%" in text:
                raise ValueError(text)
            ipaddress.IPv6Address(text)
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        raise AddressError(f"bad address literal {literal!r}") from None


def check_mailbox(mailbox: str) -> None:
    """Check ``Local-part "@" ( Domain / address-literal )`` (RFC 5321 §4.1.2).

    :raises AddressError: the mailbox is malformed or a part is too long.
    """
    local, at, domain = mailbox.rpartition("@")
    if not at:
        raise AddressError("missing @domain")
    if not (_DOT_STRING.fullmatch(local) or _QUOTED_STRING.fullmatch(local)):
        raise AddressError("bad local part")
    if not local.isascii() and not local.isprintable():
        raise AddressError("unprintable character in local part")
    if _octets(local) > MAX_LOCAL_PART_OCTETS:
        raise AddressError("local part too long")
    check_domain(domain)


def _check_source_route(route: str) -> None:
    """RFC 5321 §4.1.2 A-d-l = At-domain *( "," At-domain ); At-domain = "@" Domain."""
    for hop in route.split(","):
        if not hop.startswith("@") or hop.startswith("@["):
            raise AddressError("bad source route")
        check_domain(hop[1:])


def parse_path(path: str, *, allow_null: bool = False, allow_postmaster: bool = False) -> str:
    """Parse ``"<" [ A-d-l ":" ] Mailbox ">"`` and return the mailbox.

    A source route is accepted and dropped (RFC 5321 §4.1.2 and Appendix C: servers MUST
    accept and SHOULD ignore it).

    :param path: the path including the angle brackets.
    :param allow_null: accept ``<>`` (the null reverse-path of MAIL FROM) and return ``""``.
    :param allow_postmaster: accept ``<postmaster>`` without a domain, as RCPT TO must
        (RFC 5321 §4.1.1.3); it is returned as written.
    :returns: the mailbox without brackets or route.
    :raises AddressError: the path is malformed or too long.
    """
    if len(path) < 2 or path[0] != "<" or path[-1] != ">":
        raise AddressError("path must be enclosed in <>")
    if _octets(path) > MAX_PATH_OCTETS:
        raise AddressError("path too long")
    inner = path[1:-1]
    if not inner:
        if allow_null:
            return ""
        raise AddressError("null path not allowed here")
    if allow_postmaster and inner.lower() == "postmaster":
        return inner
    if inner.startswith("@"):
        route, colon, inner = inner.partition(":")
        if not colon:
            raise AddressError("source route without ':'")
        _check_source_route(route)
    check_mailbox(inner)
    return inner
