"""TCP transports that write at once when nothing is waiting to be sent.

Twisted's TCP transport never writes in ``write()``: it buffers the bytes and asks the
reactor for write readiness (``epoll_ctl`` to add EPOLLOUT), sends them on the next
reactor turn, then asks the reactor to stop (``epoll_ctl`` again). An SMTP conversation
is many short writes (each reply, each pipelined command group, each message), so that
costs two system calls and a reactor turn per write: about a fifth of a worker's reactor
thread under load (benchmarks/PERFORMANCE.md, round 4). These transports send straight
away when their buffer is empty and only hand what the kernel did not take to Twisted's
buffered path, which keeps ordering, flow control (producers), half-close and error
handling exactly as they are. After STARTTLS, or when anything is already buffered, every
write goes the usual way.

The helpers take the reactor the code was given; a reactor that is not Twisted's posix
reactor (a test double) gets the plain reactor call.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from typing import Any, cast

from twisted.internet import tcp
from twisted.internet.interfaces import IConnector, IListeningPort
from twisted.internet.posixbase import PosixReactorBase
from typing_extensions import override


class _WritesAtOnce:
    """Mixin for a ``tcp.Connection`` subclass: send in ``write()`` when nothing is queued."""

    def write(self, data: bytes) -> None:
        conn: Any = self
        if (
            conn.TLS
            or not data
            or not conn.connected
            or conn.disconnecting
            or conn._writeDisconnecting
            or conn._writeDisconnected
            or conn._tempDataLen
            or conn.offset < len(conn.dataBuffer)
        ):
            super().write(data)  # type: ignore[misc]
            return
        try:
            sent = conn.socket.send(data)
        except OSError:
            # EAGAIN: the kernel buffer is full; anything else: the reactor's doWrite
            # meets the same error and reports the lost connection the usual way.
            sent = 0
        if sent < len(data):
            super().write(data[sent:])  # type: ignore[misc]

    def writeSequence(self, iovec: Iterable[bytes]) -> None:  # noqa: N802 (ITransport's name)
        self.write(b"".join(iovec))


class _Server(_WritesAtOnce, tcp.Server):
    """An accepted connection that writes at once."""


class _Client(_WritesAtOnce, tcp.Client):
    """An outgoing connection that writes at once."""


class _Port(tcp.Port):
    """A listening port whose accepted connections write at once."""

    transport = _Server


class _Connector(tcp.Connector):
    """A connector whose connection writes at once."""

    @override
    def _makeTransport(self) -> tcp.Client:
        return _Client(self.host, self.port, self.bindAddress, self, self.reactor)  # type: ignore[no-untyped-call]


def adopt_stream_port(
    reactor: Any, fd: int, family: socket.AddressFamily, factory: Any
) -> IListeningPort:
    """``reactor.adoptStreamPort`` with connections that write at once."""
    if not isinstance(reactor, PosixReactorBase) or family not in (
        socket.AF_INET,
        socket.AF_INET6,
    ):
        return reactor.adoptStreamPort(fd, family, factory)  # type: ignore[no-any-return]
    port = _Port._fromListeningDescriptor(reactor, fd, family, factory)  # type: ignore[no-untyped-call]
    port.startListening()
    return cast(IListeningPort, port)


def listen_tcp(
    reactor: Any, port: int, factory: Any, interface: str = "", backlog: int = 50
) -> IListeningPort:
    """``reactor.listenTCP`` with connections that write at once."""
    if not isinstance(reactor, PosixReactorBase):
        return reactor.listenTCP(  # type: ignore[no-any-return]
            port, factory, backlog=backlog, interface=interface
        )
    listening = _Port(port, factory, backlog, interface, reactor)
    listening.startListening()
    return listening


def connect_tcp(
    reactor: Any, host: str, port: int, factory: Any, timeout: float = 30.0
) -> IConnector:
    """``reactor.connectTCP`` with a connection that writes at once."""
    if not isinstance(reactor, PosixReactorBase):
        return reactor.connectTCP(host, port, factory, timeout=timeout)  # type: ignore[no-any-return]
    connector = _Connector(host, port, factory, timeout, None, reactor)
    connector.connect()
    return connector
