"""Relay permission: who may send mail to which domains through this relay.

Pure. The rule (DESIGN.md, "Relay control"): a client in ``relay.mynetworks`` or an
authenticated client may relay to any domain; anyone else may only send to the relay's own
``relay.domains``. Everything else is refused with ``554 5.7.1`` at RCPT. Plugins run after
this check and can only narrow it: an open relay is a defect.

The one recipient every client may send to is the bare ``<postmaster>`` (RFC 5321 §4.5.1:
a relay MUST accept it). The relay has no mailboxes of its own, so such mail is queued for
the configured postmaster mailbox (``relay.postmaster``, by default postmaster@hostname).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from twistedrelay.smtp import replies
from twistedrelay.smtp.replies import Reply

_TRUSTED_CACHE_SIZE = 4096
# Characters of a local part that route mail further (the "percent hack", UUCP bang paths,
# a quoted address): sender-specified routing.
_ROUTING = frozenset("%!@")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class RelayPolicy:
    """Decides whether a recipient may be accepted from a client.

    :param mynetworks: networks whose clients may relay anywhere.
    :param domains: domains anyone may send to; ``.example.org`` also matches every
        subdomain of example.org.
    :param postmaster: the mailbox that mail to the bare ``<postmaster>`` is queued for.
    """

    def __init__(
        self, mynetworks: Iterable[IPNetwork], domains: Iterable[str], postmaster: str
    ) -> None:
        self.postmaster = postmaster
        self._v4 = tuple(n for n in mynetworks if n.version == 4)
        self._v6 = tuple(n for n in mynetworks if n.version == 6)
        domains = [d.lower().rstrip(".") for d in domains]
        self._exact = frozenset(d for d in domains if not d.startswith("."))
        self._parents = tuple(d for d in domains if d.startswith("."))
        self._trusted: dict[str, bool] = {}

    def is_trusted_client(self, client_address: str) -> bool:
        """True when the client's address is inside ``mynetworks``.

        IPv4-mapped IPv6 addresses (``::ffff:127.0.0.1``) count as their IPv4 address; a
        value that is not an IP address (e.g. a UNIX socket peer) is never trusted. Answers
        are remembered (asked at every RCPT; at most _TRUSTED_CACHE_SIZE addresses).
        """
        trusted = self._trusted.get(client_address)
        if trusted is None:
            if len(self._trusted) >= _TRUSTED_CACHE_SIZE:
                self._trusted.clear()
            trusted = self._trusted[client_address] = self._in_mynetworks(client_address)
        return trusted

    def _in_mynetworks(self, client_address: str) -> bool:
        try:
            address = ipaddress.ip_address(client_address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        networks = self._v4 if address.version == 4 else self._v6
        return any(address in network for network in networks)

    def is_local_domain(self, domain: str) -> bool:
        """True when ``domain`` is one of ``relay.domains`` (anyone may send to it)."""
        domain = domain.lower().rstrip(".")
        if domain in self._exact:
            return True
        return any(domain.endswith(parent) for parent in self._parents)

    def queued_recipient(self, recipient: str) -> str:
        """The mailbox an accepted RCPT is queued for: ``recipient``, or the postmaster's."""
        return self.postmaster if recipient.lower() == "postmaster" else recipient

    def check_recipient(
        self, client_address: str, authenticated: bool, recipient: str
    ) -> Reply | None:
        """None when the recipient may be accepted, else the final refusal (554 5.7.1).

        A recipient without a domain (``postmaster``) is local by RFC 5321 §4.5.1. For a
        client that may not relay, a local part that routes further (``user%remote``,
        ``remote!user``, a quoted ``"user@remote"``) is refused too, as Postfix does by
        default (``allow_untrusted_routing = no``): a next hop that honours such routing
        would otherwise finish the relay for it.
        """
        if authenticated or self.is_trusted_client(client_address):
            return None
        local_part, at, domain = recipient.rpartition("@")
        if not at:
            return None  # postmaster
        if self.is_local_domain(domain) and not _ROUTING.intersection(local_part):
            return None
        return replies.RELAY_DENIED
