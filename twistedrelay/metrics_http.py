"""The ``/metrics`` HTTP endpoint the master serves (twisted.web).

Owns only the HTTP side: content negotiation (Prometheus text or OpenMetrics) and the
listening site. What is collected is decided by the registry it is given
(``metrics.build_master_registry``). A scrape never touches the queue directory: the queue
gauges come from a cache (``metrics.QueueGaugeCollector``), so rendering stays well under
100 ms however large the queue.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from twisted.web.pages import notFound
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from typing_extensions import override

if TYPE_CHECKING:
    from twisted.internet.interfaces import IListeningPort, IReactorTCP

    from twistedrelay.config import Endpoint


class MetricsResource(Resource):
    """Renders the registry in the exposition format the scraper asks for."""

    isLeaf = True  # noqa: N815 (Twisted's attribute name)

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    @override
    def render_GET(self, request: Request) -> bytes:  # type: ignore[override]
        """Collect now and answer with the text exposition."""
        accept = request.getHeader("accept")
        encoder, content_type = choose_encoder(accept or "")
        body: bytes = encoder(self._registry)
        request.setHeader("Content-Type", content_type)
        return body


class _QuietSite(Site):
    """A Site that writes no access log line per scrape (one every 15 s is only noise)."""

    @override
    def log(self, request: Request) -> None:
        """Log nothing."""


class _Root(Resource):
    """Serves its children; anything else is a plain 404."""

    @override
    def getChild(self, path: bytes, request: Request) -> Resource:  # type: ignore[override]
        """Unknown path: not found."""
        return notFound()


def build_metrics_resource(registry: CollectorRegistry) -> Resource:
    """A root resource serving ``registry`` at ``/metrics`` (other paths answer 404).

    :param registry: e.g. from ``metrics.build_master_registry``.
    """
    root = _Root()
    root.putChild(b"metrics", MetricsResource(registry))
    return root


def start_metrics_server(
    reactor: IReactorTCP, endpoint: Endpoint, registry: CollectorRegistry
) -> IListeningPort:
    """Listen on ``endpoint`` (``[metrics] listen``) and serve ``/metrics`` from ``registry``.

    :returns: the listening port; ``stopListening()`` it when the master stops.
    :raises twisted.internet.error.CannotListenError: the address is taken or not local.
    """
    return reactor.listenTCP(endpoint.port, build_metrics_site(registry), interface=endpoint.host)


def build_metrics_site(registry: CollectorRegistry) -> Site:
    """The HTTP site serving ``/metrics`` from ``registry``, without per-scrape access logs."""
    site = _QuietSite(build_metrics_resource(registry))
    site.noisy = False
    return site
