"""Admission: whether a new inbound connection may start a session in this worker.

Pure: counts and a clock value in, a refusal or None out. One Admission is shared by every
listener of a worker, so ``smtp.max_connections`` bounds the worker's sessions, and
``max_connections_per_ip`` and ``connection_rate_per_ip`` bound what one client can take
(a slowloris from one address cannot starve everyone else). A client is an IPv4 address
or an IPv6 /64 (client_key), since one host commonly holds a whole /64. The limits are
read from the config at each decision, so a reload applies to the next connection; they
hold per worker process, each worker counting its own sessions.
"""

from __future__ import annotations

import ipaddress
from typing import Protocol

from twistedrelay.smtp import replies
from twistedrelay.smtp.replies import Reply

RATE_WINDOW_SECONDS = 60.0
#: Beyond this many remembered addresses, forget the ones with no recent connection.
MAX_REMEMBERED_ADDRESSES = 100_000


def client_key(address: str) -> str:
    """The client an address belongs to: an IPv4 address (also IPv4-mapped) or an IPv6 /64."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class ConnectionLimits(Protocol):
    """The limits Admission reads ([smtp] in config.py), structurally, to stay pure."""

    @property
    def max_connections(self) -> int:
        """Sessions one worker serves at once."""

    @property
    def max_connections_per_ip(self) -> int:
        """Sessions one client address may hold at once."""

    @property
    def connection_rate_per_ip(self) -> int:
        """New connections per minute from one address (0: no limit)."""


class Admission:
    """Open sessions per worker and per client address, and recent connects per address."""

    def __init__(self) -> None:
        self.open_sessions = 0
        self._per_address: dict[str, int] = {}
        self._recent: dict[str, list[float]] = {}

    def refusal_for(self, address: str, now: float, limits: ConnectionLimits) -> Reply | None:
        """None when a connection from ``address`` may start a session now, else the 421.

        A connection that is admitted counts toward the rate at once; call started() and
        ended() around its session for the concurrency limits.
        """
        if self.open_sessions >= limits.max_connections:
            return replies.TOO_MANY_CONNECTIONS
        address = client_key(address)
        if self._per_address.get(address, 0) >= limits.max_connections_per_ip:
            return replies.TOO_MANY_CONNECTIONS
        if limits.connection_rate_per_ip:
            recent = [t for t in self._recent.get(address, ()) if now - t < RATE_WINDOW_SECONDS]
            if len(recent) >= limits.connection_rate_per_ip:
                self._recent[address] = recent
                return replies.TOO_MANY_CONNECTIONS
            recent.append(now)
            self._recent[address] = recent
            if len(self._recent) > MAX_REMEMBERED_ADDRESSES:
                self._forget_quiet_addresses(now)
        return None

    def started(self, address: str) -> None:
        """A session from ``address`` began."""
        address = client_key(address)
        self.open_sessions += 1
        self._per_address[address] = self._per_address.get(address, 0) + 1

    def ended(self, address: str) -> None:
        """A session from ``address`` ended."""
        address = client_key(address)
        self.open_sessions = max(0, self.open_sessions - 1)
        left = self._per_address.get(address, 1) - 1
        if left > 0:
            self._per_address[address] = left
        else:
            self._per_address.pop(address, None)

    def sessions_from(self, address: str) -> int:
        """Open sessions from ``address``'s client (client_key)."""
        return self._per_address.get(client_key(address), 0)

    def _forget_quiet_addresses(self, now: float) -> None:
        self._recent = {
            address: times
            for address, times in self._recent.items()
            if times and now - times[-1] < RATE_WINDOW_SECONDS
        }
