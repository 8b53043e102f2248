"""Transports that write at once (twistedrelay.transport): real reactor, loopback sockets."""

from __future__ import annotations

import socket
from typing import Any

import pytest_twisted
from twisted.internet import defer, threads
from twisted.internet.protocol import ClientFactory, Factory, Protocol

from twistedrelay.testing.waiting import wait_until
from twistedrelay.transport import connect_tcp, listen_tcp


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class _Collect(Protocol):
    def __init__(self) -> None:
        self.received = bytearray()
        self.lost: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received += data

    def connectionLost(self, reason: object = None) -> None:  # noqa: N802
        self.lost.callback(None)


class _Accepted(_Collect):
    accepted: list[_Accepted] = []

    def connectionMade(self) -> None:  # noqa: N802
        _Accepted.accepted.append(self)


def _read_exactly(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(min(1 << 20, count - len(data)))
        if not chunk:
            break
        data += chunk
    return bytes(data)


async def _accepted_connection() -> tuple[Any, socket.socket, Any]:
    """A listen_tcp port, a blocking client socket and the server side's transport."""
    _Accepted.accepted.clear()
    port = listen_tcp(_reactor(), 0, Factory.forProtocol(_Accepted), interface="127.0.0.1")
    client = await threads.deferToThread(
        socket.create_connection, ("127.0.0.1", port.getHost().port), 5
    )
    await wait_until(_reactor(), lambda: _Accepted.accepted, "the accepted connection")
    return port, client, _Accepted.accepted[0].transport


@pytest_twisted.ensureDeferred
async def test_a_write_is_sent_before_write_returns() -> None:
    """With nothing queued, write() sends at once: nothing is left for the reactor to send."""
    port, client, transport = await _accepted_connection()
    try:
        transport.write(b"220 hello\r\n")
        assert transport not in _reactor().getWriters(), "no write readiness was asked for"
        assert transport.dataBuffer == b""
        assert not transport._tempDataBuffer
        assert await threads.deferToThread(_read_exactly, client, 11) == b"220 hello\r\n"
    finally:
        client.close()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_what_the_kernel_does_not_take_is_buffered_in_order() -> None:
    """Writes larger than the socket buffer arrive whole and in order; the rest is buffered."""
    port, client, transport = await _accepted_connection()
    try:
        pieces = [bytes([65 + i]) * (3 << 20) for i in range(4)] + [b"end"]
        for piece in pieces:
            transport.write(piece)
        assert transport in _reactor().getWriters(), "the rest waits for write readiness"
        expected = b"".join(pieces)
        received = await threads.deferToThread(_read_exactly, client, len(expected))
        assert received == expected
        transport.loseConnection()
        assert await threads.deferToThread(client.recv, 1) == b""
    finally:
        client.close()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_client_connection_writes_at_once_and_closes_after_its_data() -> None:
    """connect_tcp: writes go out at once; loseConnection still sends what was written."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(5)  # accept() and the accepted socket's reads end if nothing comes
    protocol = _Collect()
    factory = ClientFactory.forProtocol(lambda: protocol)
    connect_tcp(_reactor(), "127.0.0.1", server.getsockname()[1], factory, timeout=5)
    accepted, _ = await threads.deferToThread(server.accept)
    try:
        await wait_until(_reactor(), lambda: protocol.transport is not None, "the connection")
        await wait_until(_reactor(), lambda: protocol.transport.connected, "connected")
        protocol.transport.write(b"EHLO a\r\n")
        protocol.transport.writeSequence([b"MAIL FROM:<>\r\n", b"QUIT\r\n"])
        protocol.transport.loseConnection()
        expected = b"EHLO a\r\nMAIL FROM:<>\r\nQUIT\r\n"
        assert await threads.deferToThread(_read_exactly, accepted, len(expected)) == expected
        assert await threads.deferToThread(accepted.recv, 1) == b""
        await protocol.lost
    finally:
        accepted.close()
        server.close()
