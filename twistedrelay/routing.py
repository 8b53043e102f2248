"""Routing: which destination a recipient's mail goes to.

Pure. A destination is either the recipient's domain (delivered to its MX hosts) or a
next hop named by a route in ``[delivery] routes``. Route syntax follows Postfix's
transport/relayhost: ``host`` and ``host:port`` look up the MX of ``host``; ``[host]`` and
``[host]:port`` use the host's own address records with no MX lookup; an IP address is used
as it is. Route keys are a domain, ``.domain`` (every subdomain), or ``*`` (smarthost).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class NextHop:
    """Where to connect for a routed destination.

    ``port`` None means the relay's ``delivery.smtp_port``. ``mx_lookup`` False means the
    host's A/AAAA records (or the IP literal itself) are used without an MX lookup.
    """

    host: str
    port: int | None
    mx_lookup: bool

    def __str__(self) -> str:
        bracketed = not self.mx_lookup and (":" in self.host or not is_ip_address(self.host))
        host = f"[{self.host}]" if bracketed else self.host
        return host if self.port is None else f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Destination:
    """What one delivery queue and pool serve: a recipient domain or a route's next hop.

    ``name`` is the domain for MX delivery, or the route text for routed mail; it is the key
    for per-destination queues, pools, backoff and concurrency limits.
    """

    name: str
    next_hop: NextHop | None = None


@functools.lru_cache(maxsize=4096)
def is_ip_address(host: str) -> bool:
    """True for an IPv4 or IPv6 address literal (without brackets).

    Cached: routing and the resolver ask it for every message, and parsing costs more than
    the rest of a route lookup.
    """
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def parse_next_hop(text: str) -> NextHop:
    """Parse a route value: ``host``, ``host:port``, ``[host]``, ``[host]:port``, ``[v6]:port``.

    :raises ValueError: with a message suitable for a config error.
    """
    text = text.strip()
    if not text:
        raise ValueError("empty next hop")
    port: int | None = None
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not host:
            raise ValueError(f"unbalanced brackets in {text!r}")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"expected ':port' after ']' in {text!r}")
            port = _parse_port(rest[1:], text)
        mx_lookup = False
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            host = text
        elif ":" in host:
            raise ValueError(f"an IPv6 next hop needs brackets: [{text}]")
        else:
            port = _parse_port(port_text, text)
        mx_lookup = not is_ip_address(host)
    if not is_ip_address(host) and not _is_hostname(host):
        raise ValueError(f"not a host name or address: {host!r}")
    return NextHop(host.lower(), port, mx_lookup)


def _parse_port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"bad port in {whole!r}")
    return int(text)


def _is_hostname(host: str) -> bool:
    labels = host.rstrip(".").split(".")
    return all(
        0 < len(label) < 64 and label.replace("-", "").replace("_", "").isalnum()
        for label in labels
    )


def is_valid_route_key(key: str) -> bool:
    """A route key is ``*``, a domain, or ``.domain`` for all its subdomains."""
    return key == "*" or _is_hostname(key.removeprefix("."))


class RouteTable:
    """Maps a recipient domain to its Destination using the configured routes.

    Lookup order, most specific first: the exact domain, then ``.parent`` keys from the
    nearest parent up, then ``*``, then the domain itself (MX delivery).
    """

    def __init__(self, routes: Mapping[str, NextHop]) -> None:
        self._routes = {key.lower(): hop for key, hop in routes.items()}

    def destination_for(self, domain: str) -> Destination:
        """The destination for mail to ``domain`` (lower-cased by the caller or here)."""
        domain = domain.lower().rstrip(".")
        hop = self._routes.get(domain)
        if hop is None:
            labels = domain.split(".")
            for i in range(1, len(labels)):
                hop = self._routes.get("." + ".".join(labels[i:]))
                if hop is not None:
                    break
        if hop is None:
            hop = self._routes.get("*")
        if hop is None:
            return Destination(domain)
        return Destination(str(hop), hop)
