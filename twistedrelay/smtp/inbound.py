"""InboundService: the inbound SMTP listeners of one process, and their orderly shutdown.

Owns which sockets accept SMTP in this process and the drain on the way out: stop
accepting, let sessions finish what they are sending (bounded), then close the rest with
421. A message not yet durable when its session is closed was never acknowledged, so
closing it loses nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from typing_extensions import override

from twistedrelay.config import Endpoint
from twistedrelay.process.worker import InheritedSocket
from twistedrelay.smtp.server import InboundParts, SMTPServerFactory
from twistedrelay.transport import listen_tcp

_log = Logger(namespace="twistedrelay.smtp")

DRAIN_POLL_SECONDS = 0.1


class InboundService(Service):
    """Accepts SMTP on inherited sockets (workers) or on endpoints it binds itself (tests).

    :param sockets: listener mode ("smtp", "submission", "submissions") → inherited sockets.
    :param endpoints: listener mode → endpoints to bind here instead.
    :param drain_seconds: how long sessions may go on after stopService before a 421.
    """

    def __init__(
        self,
        parts: InboundParts,
        sockets: Mapping[str, Sequence[InheritedSocket]] | None = None,
        endpoints: Mapping[str, Sequence[Endpoint]] | None = None,
        drain_seconds: float = 10.0,
    ) -> None:
        self.parts = parts
        self.sockets = sockets or {}
        self.endpoints = endpoints or {}
        self.drain_seconds = drain_seconds
        self.factories: dict[str, SMTPServerFactory] = {}
        self.ports: list[IListeningPort] = []

    def _factory_for(self, mode: str) -> tuple[SMTPServerFactory, IProtocolFactory]:
        factory = self.factories.get(mode)
        if factory is None:
            factory = self.factories[mode] = SMTPServerFactory(self.parts, mode)
        if mode == "submissions":
            if self.parts.server_tls is None:
                raise ValueError("implicit TLS (smtp.submissions) needs tls.certificate")
            return factory, TLSMemoryBIOFactory(self.parts.server_tls, False, factory)
        return factory, factory

    @override
    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # unannotated in Twisted
        reactor = self.parts.reactor
        for mode, inherited in self.sockets.items():
            for sock in inherited:
                self.ports.append(sock.adopt(reactor, self._factory_for(mode)[1]))
        for mode, endpoints in self.endpoints.items():
            for endpoint in endpoints:
                port = listen_tcp(
                    reactor, endpoint.port, self._factory_for(mode)[1], interface=endpoint.host
                )
                self.ports.append(port)
        for port in self.ports:
            _log.info("accepting SMTP on {address}", address=port.getHost())

    @property
    def session_count(self) -> int:
        """Open inbound sessions in this process."""
        return sum(len(f.sessions) for f in self.factories.values())

    @override
    def stopService(self) -> defer.Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]  # unannotated in Twisted
        return defer.ensureDeferred(self._drain())

    async def _drain(self) -> None:
        reactor = self.parts.reactor
        await defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in self.ports])
        self.ports.clear()
        for factory in self.factories.values():
            factory.close_idle_sessions()
        deadline = reactor.seconds() + self.drain_seconds
        while self.session_count and reactor.seconds() < deadline:
            await deferLater(reactor, DRAIN_POLL_SECONDS, lambda: None)
        for factory in self.factories.values():
            factory.close_all_sessions()

    def listening_addresses(self) -> list[Any]:
        """The addresses of the sockets this service accepts on (tests read free ports)."""
        return [port.getHost() for port in self.ports]
