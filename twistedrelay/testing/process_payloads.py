"""Stand-in worker payloads for the process tests (see process/worker.py, WorkerPayload).

They let the master/worker machinery be tested without the SMTP server or the delivery
engine: each answers a connection with a one-line banner that names the worker's pid, slot
and current hostname, then closes it, so a test can tell which worker accepted and whether a
reload reached it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, cast

from twisted.application.service import IService, Service
from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort, ITransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from typing_extensions import override

from twistedrelay.config import Config
from twistedrelay.process.worker import InheritedSocket

log = Logger()

#: Longer than any shutdown bound a test sets, shorter than a forgotten process should live.
BLOCK_SECONDS = 60


def banner(hostname: str, slot: int) -> bytes:
    """The line the stand-in sends: "220 <hostname> pid=<pid> slot=<slot>"."""
    return f"220 {hostname} pid={os.getpid()} slot={slot}\r\n".encode("ascii")


class _BannerProtocol(Protocol):
    # Both set before connectionMade, so not Optional as in Protocol.
    factory: _BannerFactory
    transport: ITransport

    @override
    def connectionMade(self) -> None:
        service = self.factory.service
        self.transport.write(banner(service.config.hostname, service.slot))
        self.transport.loseConnection()


class _BannerFactory(Factory["_BannerProtocol"]):
    protocol = _BannerProtocol

    def __init__(self, service: BannerService) -> None:
        self.service = service


class BannerService(Service):
    """Accepts on every inherited socket and answers each connection with :func:`banner`."""

    def __init__(
        self,
        config: Config,
        slot: int,
        reactor: Any,  # what InheritedSocket.adopt takes (IReactorSocket)
        sockets: Mapping[str, Sequence[InheritedSocket]],
    ) -> None:
        self.config = config
        self.slot = slot
        self._reactor = reactor
        self._sockets = sockets
        self._ports: list[IListeningPort] = []

    @override
    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        factory = _BannerFactory(self)
        factory.noisy = False
        for inherited in (s for group in self._sockets.values() for s in group):
            self._ports.append(inherited.adopt(self._reactor, factory))

    @override
    def stopService(self) -> defer.Deferred[list[None]]:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        ports, self._ports = self._ports, []
        # maybeDeferred flattens the Deferred stopListening may return; its overloads cannot
        # say so for a "Deferred[None] | None" result.
        return defer.gatherResults(
            [cast("defer.Deferred[None]", defer.maybeDeferred(p.stopListening)) for p in ports]
        )

    def reload_config(self, config: Config) -> None:
        """Take the new hostname into later banners."""
        self.config = config
        log.info("banner payload reloaded: hostname={hostname}", hostname=config.hostname)


class StubbornService(BannerService):
    """A banner service whose drain never finishes, to test the worker's bound on it."""

    @override
    def stopService(self) -> defer.Deferred[list[None]]:
        super().stopService()
        return defer.Deferred()


class BlockingService(BannerService):
    """A banner service that blocks its reactor when asked to stop, as a wedged worker would."""

    @override
    def stopService(self) -> defer.Deferred[list[None]]:
        time.sleep(BLOCK_SECONDS)
        return super().stopService()


# The payloads take reactor as Any, as the WorkerPayload contract does (the worker's global
# reactor provides several reactor interfaces at once).


def pid_banner_payload(
    config: Config, slot: int, reactor: Any, sockets: Mapping[str, Sequence[InheritedSocket]]
) -> IService:
    """A payload answering each connection with its pid (a WorkerPayload)."""
    return BannerService(config, slot, reactor, sockets)


def stubborn_payload(
    config: Config, slot: int, reactor: Any, sockets: Mapping[str, Sequence[InheritedSocket]]
) -> IService:
    """A payload that never finishes draining (a WorkerPayload)."""
    return StubbornService(config, slot, reactor, sockets)


def blocking_payload(
    config: Config, slot: int, reactor: Any, sockets: Mapping[str, Sequence[InheritedSocket]]
) -> IService:
    """A payload that wedges its worker while draining, so only SIGKILL ends it."""
    return BlockingService(config, slot, reactor, sockets)


def crashing_payload(
    config: Config, slot: int, reactor: Any, sockets: Mapping[str, Sequence[InheritedSocket]]
) -> IService:
    """A payload that fails to build, so its worker exits at once (a WorkerPayload).

    :raises RuntimeError: always.
    """
    raise RuntimeError("stand-in payload failing on purpose")


def half_built_payload(
    config: Config, slot: int, reactor: Any, sockets: Mapping[str, Sequence[InheritedSocket]]
) -> IService:
    """A payload that starts a thread pool (as a queue store does) and then fails to build.

    :raises RuntimeError: always, with the pool's non-daemon threads left running.
    """
    ThreadPool(1, 1, "half-built").start()
    raise RuntimeError("stand-in payload failing after starting threads")
