"""The ``/metrics`` HTTP endpoint the master serves (twisted.web).

Owns only the HTTP side: content negotiation (Prometheus text or OpenMetrics), the
listening site, and :class:`MetricsService`, which adopts the socket the master bound (so the
port may be privileged and survives worker restarts) and keeps the queue gauges counted.
What is collected is decided by the registry (``metrics.build_master_registry``). A scrape
never touches the queue directory: the queue gauges come from a cache
(``metrics.QueueGaugeCollector``), so rendering stays well under 100 ms however large the
queue.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from twisted.application.service import IService, Service
from twisted.logger import Logger
from twisted.web.http import Request as HTTPRequest
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site
from typing_extensions import override

from twistedrelay.metrics import QueueGaugeCollector, build_master_registry

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IListeningPort, IReactorTCP

    from twistedrelay.config import Endpoint
    from twistedrelay.process.sockets import BoundSocket


class MetricsResource(Resource):
    """Renders the registry in the exposition format the scraper asks for."""

    isLeaf = True  # noqa: N815 (Twisted's attribute name)

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # twisted.web's Resource is unannotated
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        """Collect now and answer with the text exposition."""
        accept = request.getHeader("accept")
        encoder, content_type = choose_encoder(accept or "")
        body: bytes = encoder(self._registry)
        request.setHeader("Content-Type", content_type)
        return body


class _QuietSite(Site):
    """A Site that writes no access log line per scrape (one every 15 s is only noise)."""

    def __init__(self, resource: IResource) -> None:
        super().__init__(resource)  # type: ignore[no-untyped-call]  # twisted.web's Site is unannotated

    @override
    def log(self, request: HTTPRequest) -> None:
        """Log nothing."""


class _Root(Resource):
    """Serves its children; anything else is a plain 404."""

    @override
    def getChild(self, path: bytes, request: Request) -> IResource:
        """Unknown path: not found."""
        return notFound()


def build_metrics_resource(registry: CollectorRegistry) -> Resource:
    """A root resource serving ``registry`` at ``/metrics`` (other paths answer 404).

    :param registry: e.g. from ``metrics.build_master_registry``.
    """
    root = _Root()  # type: ignore[no-untyped-call]  # inherits Resource's unannotated __init__
    root.putChild(b"metrics", MetricsResource(registry))
    return root


def start_metrics_server(
    reactor: IReactorTCP, endpoint: Endpoint, registry: CollectorRegistry
) -> IListeningPort:
    """Listen on ``endpoint`` (``[metrics] listen``) and serve ``/metrics`` from ``registry``.

    :returns: the listening port; ``stopListening()`` it when the master stops.
    :raises twisted.internet.error.CannotListenError: the address is taken or not local.
    """
    # Twisted types listenTCP's factory as ServerFactory[_ProtoWithFactory] and Factory is
    # invariant in its protocol, so no concrete HTTPFactory matches; the call is right at run time.
    site = build_metrics_site(registry)
    return reactor.listenTCP(endpoint.port, site, interface=endpoint.host)  # type: ignore[arg-type]


def build_metrics_site(registry: CollectorRegistry) -> Site:
    """The HTTP site serving ``/metrics`` from ``registry``, without per-scrape access logs."""
    site = _QuietSite(build_metrics_resource(registry))
    site.noisy = False
    return site


class MetricsService(Service):
    """Serves ``/metrics`` on a socket the master bound, and keeps the queue gauges counted.

    :param reactor: must provide IReactorSocket (``adoptStreamPort``) and IReactorTime.
    :param sock: a bound, listening, non-blocking socket; the service adopts a duplicate and
        never closes the original.
    :param registry: what to serve.
    :param queue_collector: started and stopped with the service, when given.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,  # IReactorSocket and IReactorTime at once: no single interface says both
        sock: socket.socket,
        registry: CollectorRegistry,
        queue_collector: QueueGaugeCollector | None = None,
    ) -> None:
        self._reactor = reactor
        self._sock = sock
        self._registry = registry
        self._queue_collector = queue_collector
        self.port: IListeningPort | None = None

    @override
    def startService(self) -> None:
        """Start listening and counting."""
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        site = _QuietSite(build_metrics_resource(self._registry))
        site.noisy = False
        self.port = self._reactor.adoptStreamPort(self._sock.fileno(), self._sock.family, site)
        if self._queue_collector is not None:
            self._queue_collector.start()
        self.log.info("serving metrics on {address}", address=self._sock.getsockname())

    @override
    def stopService(self) -> Deferred[None] | None:
        """Stop counting and close the adopted port (the master's socket stays open)."""
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        if self._queue_collector is not None:
            self._queue_collector.stop()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None


def metrics_service_factory(
    reactor: Any,  # IReactorSocket and IReactorTime, as MetricsService needs
    queue_directory: str | os.PathLike[str],
    interval_seconds: float = 5.0,
) -> Callable[[BoundSocket, str], IService]:
    """What the master calls with its bound ``[metrics] listen`` socket and metrics directory.

    The service it builds serves the workers' summed metrics plus the queue gauges, counted
    every ``interval_seconds`` in ``queue_directory``.
    """

    def build(bound: BoundSocket, multiprocess_directory: str) -> IService:
        collector = QueueGaugeCollector(queue_directory, reactor, interval_seconds)
        registry = build_master_registry(multiprocess_directory, collector)
        return MetricsService(reactor, bound.sock, registry, collector)

    return build
