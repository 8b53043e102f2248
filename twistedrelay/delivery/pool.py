"""DestinationPool: the outbound connections of one destination, reused across messages.

Owns connection reuse: a connection that finished a transaction is made ready again
(ClientSession.reset: RSET, pipelined in front of the next MAIL when the host offers
PIPELINING) and kept idle for the next message of the same destination, up to
``reuse_limit`` transactions, and closed after ``idle_timeout`` seconds without work.
Opening a connection tries the mail hosts in order (MX preference) until one greets and
accepts EHLO: failover. The number of connections is bounded by the scheduler, which
starts at most ``window`` jobs per destination; the pool never opens more connections
than jobs it is asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, error
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ClientFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from twistedrelay.delivery.connection import ConnectionNotReadyError, SMTPClientProtocol
from twistedrelay.delivery.outcome import (
    ConnectionFailure,
    Outcome,
    classify_connection_failure,
    classify_reply,
)
from twistedrelay.eventlog import sanitize
from twistedrelay.metrics import RelayMetrics
from twistedrelay.resolver import MailHost
from twistedrelay.smtp.client_session import ClientSession
from twistedrelay.smtp.replies import TLS_HANDSHAKE_FAILED
from twistedrelay.tls import ClientTLSOptions, tls_version
from twistedrelay.transport import connect_tcp

_log = Logger(namespace="twistedrelay.delivery")


class AllHostsFailedError(Exception):
    """No mail host of the destination could take a transaction.

    ``outcome`` is the last host's failure (deferred for connection trouble, bounced when
    a host refused us permanently at greeting or EHLO).
    """

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.diagnostic)
        self.outcome = outcome


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """The [delivery] settings a pool uses."""

    helo_name: str
    reuse_limit: int = 100
    chunking: bool = True
    idle_timeout: float = 2.0
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    data_timeout: float = 600.0


@dataclass(slots=True)
class PooledConnection:
    """A connection with the mail host it goes to and the TLS policy it was opened with."""

    protocol: SMTPClientProtocol
    host: MailHost
    tls: ClientTLSOptions
    idle_timer: IDelayedCall | None = None
    reused: bool = False  # taken from the idle connections for this transaction

    @property
    def tls_description(self) -> str:
        """The delivery log's ``tls=`` value (see :meth:`ClientTLSOptions.log_value`)."""
        if not self.protocol.tls_used:
            return self.tls.log_value(None)
        # "TLS" when the version cannot be read any more (the connection is gone).
        return self.tls.log_value(tls_version(self.protocol.transport) or "TLS")


class _ConnectorFactory(ClientFactory):
    noisy = False

    def __init__(self, protocol: SMTPClientProtocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: Any) -> SMTPClientProtocol:
        return self.protocol_instance

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if not self.protocol_instance.ready.called:
            self.protocol_instance.ready.errback(reason)


class DestinationPool:
    """Connections for one destination.

    :param tls_for_host: given a mail host name, returns the TLS options (level and
        connection creator) for the ClientSession and the STARTTLS step.
    """

    def __init__(
        self,
        destination: str,
        settings: PoolSettings,
        reactor: Any,
        metrics: RelayMetrics,
        tls_for_host: Callable[[str], ClientTLSOptions],
    ) -> None:
        self.destination = destination
        self.settings = settings
        self.reactor = reactor
        self.metrics = metrics
        self.tls_for_host = tls_for_host
        self.idle: list[PooledConnection] = []
        self.open_count = 0

    async def acquire(self, hosts: Sequence[MailHost], *, fresh: bool = False) -> PooledConnection:
        """A ready connection: an idle one if any, else a new one to the first host that works.

        :param fresh: always a new connection (an idle one just failed).
        :raises AllHostsFailedError: every host failed to connect or refused EHLO.
        """
        while self.idle and not fresh:
            pooled = self.idle.pop()
            if pooled.idle_timer is not None and pooled.idle_timer.active():
                pooled.idle_timer.cancel()
            if pooled.protocol.is_ready and pooled.protocol.is_open:
                self.metrics.outbound_connection_reused()
                pooled.reused = True
                return pooled
        last: Outcome | None = None
        for host in hosts:
            try:
                return await self._connect(host)
            except ConnectionNotReadyError as e:
                last = classify_reply(e.reply)
                if last.result.value == "bounced" and e.reply.code >= 500:
                    # RFC 5321 §5.1: a permanent refusal at greeting/EHLO ends the try.
                    break
            except Exception as e:  # noqa: BLE001 (any connect error: try the next host)
                last = classify_connection_failure(_connection_failure(e), str(host))
        raise AllHostsFailedError(
            last or classify_connection_failure(ConnectionFailure.UNREACHABLE, self.destination)
        )

    async def _connect(self, host: MailHost) -> PooledConnection:
        tls = self.tls_for_host(host.name)
        try:
            return await self._connect_with(host, tls)
        except ConnectionNotReadyError as e:
            if tls.level != "may" or e.reply.enhanced != TLS_HANDSHAKE_FAILED.enhanced:
                raise
            # RFC 7435 §3: opportunistic TLS that fails falls back to clear text, as Postfix
            # does, on a new connection to the same host (STARTTLS cannot be taken back).
            _log.info(
                "{destination}: TLS handshake with {host} failed ({reply}); retrying in clear",
                destination=self.destination,
                host=str(host),
                reply=sanitize(e.reply),
            )
        return await self._connect_with(host, ClientTLSOptions("none", None))

    async def _connect_with(self, host: MailHost, tls: ClientTLSOptions) -> PooledConnection:
        creator = tls.creator
        protocol = SMTPClientProtocol(
            ClientSession(self.settings.helo_name, tls_level=tls.level),
            self.reactor,
            self.settings.command_timeout,
            self.settings.data_timeout,
            tls_context=(lambda: creator) if creator is not None else None,
            chunking=self.settings.chunking,
        )
        connect_tcp(
            self.reactor,
            host.address,
            host.port,
            _ConnectorFactory(protocol),
            timeout=self.settings.connect_timeout,
        )
        self.open_count += 1
        protocol.closed.addBoth(self._closed)
        try:
            await protocol.ready
        except BaseException:
            if protocol.tls_used and not protocol.tls_established:
                self.metrics.tls_handshake("outbound", False)
            if protocol.is_open:
                protocol.transport.abortConnection()  # type: ignore[union-attr]
            elif not protocol.closed.called:
                protocol.closed.callback(None)
            raise
        if protocol.tls_established:
            self.metrics.tls_handshake("outbound", True)
        # Counted once the host greeted and took EHLO, so refused connects do not inflate it.
        self.metrics.outbound_connection_opened()
        protocol.closed.addBoth(lambda _: self.metrics.outbound_connection_closed())
        return PooledConnection(protocol, host, tls)

    def _closed(self, _: object) -> None:
        self.open_count -= 1

    async def release(self, pooled: PooledConnection) -> None:
        """Give a connection back after a transaction: keep it for reuse or QUIT it."""
        protocol = pooled.protocol
        if (
            not protocol.is_open
            or not protocol.session.reusable  # failed, its close not seen yet
            or protocol.session.transaction_count >= self.settings.reuse_limit
        ):
            protocol.quit()
            return
        try:
            await protocol.reset()
        except ConnectionNotReadyError:
            protocol.quit()
            return
        pooled.idle_timer = self.reactor.callLater(
            self.settings.idle_timeout, self._close_idle, pooled
        )
        self.idle.append(pooled)

    def _close_idle(self, pooled: PooledConnection) -> None:
        if pooled in self.idle:
            self.idle.remove(pooled)
        pooled.protocol.quit()

    def close(self) -> None:
        """QUIT every idle connection (shutdown)."""
        for pooled in list(self.idle):
            if pooled.idle_timer is not None and pooled.idle_timer.active():
                pooled.idle_timer.cancel()
            pooled.protocol.quit()
        self.idle.clear()

    @property
    def is_empty(self) -> bool:
        """No connection is open (idle or busy): the pool may be forgotten."""
        return self.open_count <= 0 and not self.idle


def _connection_failure(exc: BaseException) -> ConnectionFailure:
    if isinstance(exc, error.ConnectionRefusedError):
        return ConnectionFailure.REFUSED
    if isinstance(exc, error.TimeoutError | defer.TimeoutError):
        return ConnectionFailure.CONNECT_TIMEOUT
    if isinstance(exc, error.NoRouteError | error.DNSLookupError):
        return ConnectionFailure.UNREACHABLE
    return ConnectionFailure.LOST
