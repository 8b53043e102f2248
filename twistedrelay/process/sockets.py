"""The master's listening sockets: bound once, before privileges are dropped.

Owns binding every listener of the config (``[smtp] listen``, ``submission``,
``submissions`` and ``[metrics] listen``) and keeping the sockets open for the life of the
master. It does not accept connections: workers inherit the SMTP sockets and the metrics
server adopts its own. With several workers each SMTP address is bound once per worker slot
with SO_REUSEPORT, so the kernel spreads new connections evenly over the slots' accept
queues; one shared accept queue let whichever worker woke first take a whole burst (42 of
42 connections in a benchmark run, leaving the other core idle). The master keeps every
copy open, so a restarted worker adopts its slot's socket again and the connections queued
there while it was down are served then. Invariant: after ``privilegedStartService``
returns, every configured address is bound and listening, or start-up failed with a
:class:`ListenError` naming it.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from twisted.application.service import Service
from twisted.logger import Logger
from typing_extensions import override

from twistedrelay.config import Config, Endpoint

#: Listener names, in the order workers receive them.
SMTP_LISTENERS = ("smtp", "submission", "submissions")
#: The [smtp] key holding each listener's addresses.
_SMTP_KEYS = {"smtp": "listen", "submission": "submission", "submissions": "submissions"}
METRICS_LISTENER = "metrics"

#: A deep accept queue: a burst of connections waits in the kernel while workers are busy or
#: one is being restarted, instead of being refused (the kernel caps it at somaxconn).
LISTEN_BACKLOG = 1024


log = Logger()


class ListenError(Exception):
    """A configured address cannot be listened on; str() names the listener and address."""


@dataclass(frozen=True, slots=True)
class BoundSocket:
    """One listening socket owned by the master.

    :ivar name: the listener it serves ("smtp", "submission", "submissions", "metrics").
    :ivar endpoint: the configured address (port 0 means "any free port").
    :ivar sock: the bound, listening, non-blocking socket.
    """

    name: str
    endpoint: Endpoint
    sock: socket.socket

    @property
    def port(self) -> int:
        """The port actually bound (differs from the configured one when that was 0)."""
        port: int = self.sock.getsockname()[1]
        return port


def bind_listener(
    name: str, endpoint: Endpoint, backlog: int = LISTEN_BACKLOG, *, reuse_port: bool = False
) -> BoundSocket:
    """Bind and listen on one address.

    The socket has SO_REUSEADDR (a restarted relay rebinds while old connections sit in
    TIME_WAIT), IPV6_V6ONLY on IPv6 (so ``[::]:25`` and ``0.0.0.0:25`` can both be
    configured), and is non-blocking, as the reactors that adopt it expect.

    :param name: the listener name, used in the error message.
    :param reuse_port: set SO_REUSEPORT (one of a group of sockets on the same address).
    :raises ListenError: the address does not resolve, or bind/listen fails (in use, no
        permission for a port below 1024, address not on this host).
    """
    try:
        infos = socket.getaddrinfo(
            endpoint.host, endpoint.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as e:
        raise ListenError(f"cannot listen for {name} on {endpoint}: {e}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise ListenError(f"cannot listen for {name} on {endpoint}: {e.strerror or e}") from None
    return BoundSocket(name, endpoint, sock)


def bind_copies(name: str, endpoint: Endpoint, copies: int) -> list[BoundSocket]:
    """Bind ``copies`` listening sockets on one address (SO_REUSEPORT when more than one).

    A plain socket is bound first and closed again: SO_REUSEPORT alone would let the group
    join another process's listener on the same address (a second relay run by the same
    user), which must fail with "in use" instead. The probe also picks the port when the
    configured one is 0.

    :raises ListenError: as bind_listener().
    """
    if copies <= 1:
        return [bind_listener(name, endpoint)]
    probe = bind_listener(name, endpoint)
    port = probe.port
    probe.sock.close()
    bound: list[BoundSocket] = []
    try:
        for _ in range(copies):
            copy = bind_listener(name, Endpoint(endpoint.host, port), reuse_port=True)
            bound.append(BoundSocket(name, endpoint, copy.sock))
    except ListenError:
        for each in bound:
            each.sock.close()
        raise
    return bound


def configured_listeners(
    config: Config, include_metrics: bool = True
) -> list[tuple[str, Endpoint]]:
    """Every (listener name, address) the master binds, SMTP listeners first."""
    listeners = [(name, endpoint) for name in SMTP_LISTENERS for endpoint in _smtp(config, name)]
    if include_metrics and config.metrics.listen is not None:
        listeners.append((METRICS_LISTENER, config.metrics.listen))
    return listeners


def _smtp(config: Config, name: str) -> Sequence[Endpoint]:
    endpoints: Sequence[Endpoint] = getattr(config.smtp, _SMTP_KEYS[name])
    return endpoints


class ListeningSockets(Service):
    """Binds every configured listener in ``privilegedStartService``; closes them on stop.

    twistd calls ``privilegedStartService`` before it drops privileges (``--uid``/``--gid``),
    so port 25 can be bound by a relay that then runs unprivileged.

    :param include_metrics: also bind ``[metrics] listen`` (when the master serves metrics).
    :param copies: how many sockets to bind per SMTP address: one per worker slot.
    """

    def __init__(self, config: Config, include_metrics: bool = True, copies: int = 1) -> None:
        self._listeners = configured_listeners(config, include_metrics)
        self._copies = max(1, copies)
        #: Every bound socket; the copies of an SMTP address are consecutive, slot 0's first.
        self.bound: list[BoundSocket] = []

    @override
    def privilegedStartService(self) -> None:
        super().privilegedStartService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        try:
            self.bind_all()
        except ListenError as e:
            # A start-up error for the operator, not a traceback: the message names it all.
            log.critical("cannot start: {error}", error=str(e))
            raise SystemExit(2) from None

    @override
    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        self.close_all()

    def bind_all(self) -> None:
        """Bind every listener, once; on failure close what was bound and re-raise.

        :raises ListenError: naming the first address that could not be bound.
        """
        if self.bound:
            return
        try:
            for name, endpoint in self._listeners:
                if name in SMTP_LISTENERS:
                    self.bound.extend(bind_copies(name, endpoint, self._copies))
                else:
                    self.bound.append(bind_listener(name, endpoint))
        except ListenError:
            self.close_all()
            raise
        for bound in self.bound:
            if bound.name in SMTP_LISTENERS and self._copy_index(bound) != 0:
                continue  # one line per address, not per copy
            log.info(
                "listening for {name} on {address}",
                name=bound.name,
                address=Endpoint(bound.endpoint.host, bound.port),
            )

    def close_all(self) -> None:
        """Close every bound socket (workers keep their own inherited copies)."""
        for bound in self.bound:
            bound.sock.close()
        self.bound = []

    def by_name(self, slot: int = 0) -> Mapping[str, Sequence[BoundSocket]]:
        """The SMTP sockets of worker ``slot`` grouped by listener name (no empty groups).

        :param slot: the worker slot; it gets its own copy of every SMTP address.
        """
        grouped: dict[str, list[BoundSocket]] = {}
        for bound in self.bound:
            if bound.name in SMTP_LISTENERS and self._copy_index(bound) == slot % self._copies:
                grouped.setdefault(bound.name, []).append(bound)
        return grouped

    def _copy_index(self, bound: BoundSocket) -> int:
        """Which slot's copy of its address an SMTP socket is (bind_all binds them in order)."""
        smtp = [each for each in self.bound if each.name in SMTP_LISTENERS]
        return smtp.index(bound) % self._copies

    def metrics_socket(self) -> BoundSocket | None:
        """The bound metrics socket, if ``[metrics] listen`` is set."""
        return next((b for b in self.bound if b.name == METRICS_LISTENER), None)
