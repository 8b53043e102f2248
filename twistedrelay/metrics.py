"""Metrics: every Prometheus metric of the relay, defined once, summed over all processes.

Owns the metric names, their labels and their meaning (the Metrics contract of DESIGN.md and
issue 5). Nothing is registered at import time: a :class:`RelayMetrics` registers its metrics
in the registry it is given, so tests may build as many as they like. Labels only ever carry
values from the fixed sets in :data:`METRICS`; an unknown value is a programming error and
raises :class:`ValueError`.

Who calls what (every call is cheap: label children are bound once, in ``__init__``):

- ``session_opened(listener)`` / ``session_closed()``: an inbound connection is made / lost;
  listener is "smtp", "submission" or "submissions".
- ``reply_sent(code)``: every SMTP reply the inbound server sends.
- ``tls_handshake(direction, ok)``: a TLS handshake ended; direction "inbound" (STARTTLS,
  implicit TLS) or "outbound" (STARTTLS to a mail host).
- ``message_received(size_bytes)``: a message was durably queued (the 250 after DATA).
- ``delivery(result, seconds_in_queue)``: one recipient's attempt ended delivered, deferred
  or bounced, ``seconds_in_queue`` after the message arrived.
- ``outbound_connection_opened()`` / ``outbound_connection_closed()``: an outbound SMTP
  connection is up / gone; ``outbound_connection_reused()``: it carries one more message.
- ``dns_lookup(kind, failed=False)``: the resolver sent one query ("mx", "a", "aaaa").

Multi-process (see ``docs/operations.md``): the master creates an empty directory
(:func:`prepare_multiprocess_dir`), starts every worker with :func:`worker_environment`, and
serves a registry from :func:`build_master_registry`, which sums the workers' mmap files
(``prometheus_client.multiprocess.MultiProcessCollector``) and adds the queue gauges that only
the master computes (:class:`QueueGaugeCollector`). A worker builds
:meth:`RelayMetrics.for_worker`. When a worker dies the master calls
:func:`mark_worker_dead` so its live gauges (open sessions, open connections) vanish while its
counters keep counting in the sums.

Queue depth is never computed by walking the queue on scrape: :class:`QueueGaugeCollector`
counts the state directories with ``os.scandir`` in a thread every few seconds and a scrape
reports the cached counts.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from twistedrelay.queue.ids import arrival_time_of, is_queue_id

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime
    from twisted.python.failure import Failure

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# How prometheus_client sums a gauge over processes ("" for counters and histograms).
MultiprocessMode = Literal[
    "", "all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum",
    "mostrecent", "livemostrecent",
]  # fmt: skip

RESULTS = ("delivered", "deferred", "bounced")
QUEUE_STATES = ("incoming", "active", "deferred", "hold")
LISTENERS = ("smtp", "submission", "submissions")
REPLY_CLASSES = ("2xx", "3xx", "4xx", "5xx")
DNS_KINDS = ("mx", "a", "aaaa")
TLS_DIRECTIONS = ("inbound", "outbound")
TLS_RESULTS = ("ok", "failed")

# From a loopback hop (tens of ms) to the maximal queue lifetime (5 days).
QUEUE_TIME_BUCKETS = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
    14400.0, 86400.0, 432000.0,
)  # fmt: skip


# eq=False: specs are used as dict keys by identity (their labels dict is unhashable).
@dataclass(frozen=True, slots=True, eq=False)
class MetricSpec:
    """One metric as exposed: full name (counters end in ``_total``), type, help, labels.

    ``labels`` maps each label name to its complete set of values; ``multiprocess_mode`` says
    how prometheus_client combines a gauge over worker processes.
    """

    name: str
    kind: str
    help: str
    labels: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    multiprocess_mode: MultiprocessMode = ""
    buckets: tuple[float, ...] = ()


MESSAGES_RECEIVED = MetricSpec(
    "twistedrelay_messages_received_total",
    "counter",
    "Messages accepted into the queue (250 after DATA).",
)
RECEIVED_BYTES = MetricSpec(
    "twistedrelay_received_bytes_total",
    "counter",
    "Bytes of message content accepted into the queue.",
)
DELIVERIES = MetricSpec(
    "twistedrelay_deliveries_total",
    "counter",
    "Delivery outcomes, one per recipient and attempt.",
    {"result": RESULTS},
)
DELIVERY_SECONDS = MetricSpec(
    "twistedrelay_delivery_seconds",
    "histogram",
    "Time from queue entry to delivery, per delivered recipient.",
    buckets=QUEUE_TIME_BUCKETS,
)
DEFERRED_QUEUE_SECONDS = MetricSpec(
    "twistedrelay_deferred_queue_seconds",
    "histogram",
    "Time in the queue of a recipient each time an attempt defers it.",
    buckets=QUEUE_TIME_BUCKETS,
)
QUEUE_MESSAGES = MetricSpec(
    "twistedrelay_queue_messages",
    "gauge",
    "Queue entries per state, from the last counting pass.",
    {"state": QUEUE_STATES},
)
QUEUE_OLDEST_AGE = MetricSpec(
    "twistedrelay_queue_oldest_age_seconds",
    "gauge",
    "Age of the oldest entry in incoming, active or deferred (0 when those are empty).",
)
QUEUE_COUNT_SECONDS = MetricSpec(
    "twistedrelay_queue_count_duration_seconds",
    "gauge",
    "How long the last counting pass over the queue directories took.",
)
SMTP_SESSIONS = MetricSpec(
    "twistedrelay_smtp_sessions",
    "gauge",
    "Inbound SMTP sessions open now.",
    multiprocess_mode="livesum",
)
SMTP_SESSIONS_TOTAL = MetricSpec(
    "twistedrelay_smtp_sessions_opened_total",
    "counter",
    "Inbound SMTP sessions opened, by listener.",
    {"listener": LISTENERS},
)
SMTP_REPLIES = MetricSpec(
    "twistedrelay_smtp_replies_total",
    "counter",
    "SMTP replies sent by the inbound server, by code class.",
    {"class": REPLY_CLASSES},
)
TLS_HANDSHAKES = MetricSpec(
    "twistedrelay_tls_handshakes_total",
    "counter",
    "TLS handshakes, inbound (STARTTLS, implicit TLS) and outbound (STARTTLS), by result.",
    {"direction": TLS_DIRECTIONS, "result": TLS_RESULTS},
)
OUTBOUND_CONNECTIONS = MetricSpec(
    "twistedrelay_outbound_connections",
    "gauge",
    "Outbound SMTP connections open now.",
    multiprocess_mode="livesum",
)
OUTBOUND_CONNECTIONS_TOTAL = MetricSpec(
    "twistedrelay_outbound_connections_opened_total",
    "counter",
    "Outbound SMTP connections opened.",
)
OUTBOUND_REUSES = MetricSpec(
    "twistedrelay_outbound_connection_reuses_total",
    "counter",
    "Messages sent over an already open outbound connection (after RSET).",
)
DNS_LOOKUPS = MetricSpec(
    "twistedrelay_dns_lookups_total",
    "counter",
    "DNS queries made by the resolver (cache misses), by record type.",
    {"kind": DNS_KINDS},
)
DNS_FAILURES = MetricSpec(
    "twistedrelay_dns_failures_total",
    "counter",
    "DNS queries that got no usable answer (timeout, SERVFAIL, refused), by record type. "
    "NXDOMAIN and empty answers are answers, not failures.",
    {"kind": DNS_KINDS},
)

#: Every metric the relay exposes; the contract test pins this table.
METRICS: tuple[MetricSpec, ...] = (
    MESSAGES_RECEIVED,
    RECEIVED_BYTES,
    DELIVERIES,
    DELIVERY_SECONDS,
    DEFERRED_QUEUE_SECONDS,
    QUEUE_MESSAGES,
    QUEUE_OLDEST_AGE,
    QUEUE_COUNT_SECONDS,
    SMTP_SESSIONS,
    SMTP_SESSIONS_TOTAL,
    SMTP_REPLIES,
    TLS_HANDSHAKES,
    OUTBOUND_CONNECTIONS,
    OUTBOUND_CONNECTIONS_TOTAL,
    OUTBOUND_REUSES,
    DNS_LOOKUPS,
    DNS_FAILURES,
)

#: The metrics the master computes itself; workers never create these.
MASTER_METRICS = (QUEUE_MESSAGES, QUEUE_OLDEST_AGE, QUEUE_COUNT_SECONDS)


# Any: a Counter, Histogram or Gauge as spec.kind says at run time; each caller uses the
# methods of the kind it asked for.
def _build(spec: MetricSpec, registry: CollectorRegistry) -> Any:
    """Create the prometheus_client metric for ``spec`` in ``registry``."""
    labelnames = tuple(spec.labels)
    if spec.kind == "counter":
        return Counter(spec.name, spec.help, labelnames, registry=registry)
    if spec.kind == "histogram":
        return Histogram(spec.name, spec.help, labelnames, registry=registry, buckets=spec.buckets)
    mode = spec.multiprocess_mode or "all"
    return Gauge(spec.name, spec.help, labelnames, registry=registry, multiprocess_mode=mode)


def _bind(spec: MetricSpec, metric: Any) -> dict[str, Any]:  # Any: as _build's
    """Pre-bind the child of every value of a one-label metric, so each series starts at 0."""
    (values_,) = spec.labels.values()
    return {value: metric.labels(value) for value in values_}


def _unknown(label: str, value: object, allowed: Iterable[str]) -> ValueError:
    return ValueError(f"{label}={value!r} is not one of {', '.join(allowed)}")


class RelayMetrics:
    """The metrics a worker (or a single-process relay, or a test) moves.

    :param registry: where to register; a fresh private ``CollectorRegistry`` by default. In a
        worker the values live in the multiprocess mmap files whatever the registry.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        worker_specs = [spec for spec in METRICS if spec not in MASTER_METRICS]
        built = {spec: _build(spec, self.registry) for spec in worker_specs}
        self._received = built[MESSAGES_RECEIVED]
        self._received_bytes = built[RECEIVED_BYTES]
        self._deliveries = _bind(DELIVERIES, built[DELIVERIES])
        self._delivery_seconds = built[DELIVERY_SECONDS]
        self._deferred_seconds = built[DEFERRED_QUEUE_SECONDS]
        self._sessions = built[SMTP_SESSIONS]
        self._sessions_total = _bind(SMTP_SESSIONS_TOTAL, built[SMTP_SESSIONS_TOTAL])
        replies = _bind(SMTP_REPLIES, built[SMTP_REPLIES])
        # Indexed by code // 100; SMTP has no 1xx replies (RFC 5321 §4.2.1).
        self._replies = [None, None, replies["2xx"], replies["3xx"], replies["4xx"], replies["5xx"]]
        handshakes = built[TLS_HANDSHAKES]
        self._handshakes = {
            (direction, ok): handshakes.labels(direction, "ok" if ok else "failed")
            for direction in TLS_DIRECTIONS
            for ok in (True, False)
        }
        self._outbound_open = built[OUTBOUND_CONNECTIONS]
        self._outbound_total = built[OUTBOUND_CONNECTIONS_TOTAL]
        self._outbound_reuses = built[OUTBOUND_REUSES]
        self._dns_lookups = _bind(DNS_LOOKUPS, built[DNS_LOOKUPS])
        self._dns_failures = _bind(DNS_FAILURES, built[DNS_FAILURES])

    @classmethod
    def for_worker(cls, directory: str | os.PathLike[str] | None = None) -> RelayMetrics:
        """The metrics of a worker process, written to the multiprocess directory.

        :param directory: the directory the master prepared; by default the one named by
            ``PROMETHEUS_MULTIPROC_DIR`` in the environment.
        :raises ValueError: no directory given and none in the environment.
        """
        path = os.fspath(directory) if directory is not None else os.environ.get(MULTIPROC_ENV)
        if not path:
            raise ValueError(f"no multiprocess metrics directory: set {MULTIPROC_ENV}")
        use_multiprocess_values(path)
        return cls()

    # -- inbound ---------------------------------------------------------------------------

    def session_opened(self, listener: str) -> None:
        """An inbound session started on ``listener`` ("smtp", "submission", "submissions").

        :raises ValueError: an unknown listener name.
        """
        child = self._sessions_total.get(listener)
        if child is None:
            raise _unknown("listener", listener, LISTENERS)
        child.inc()
        self._sessions.inc()

    def session_closed(self) -> None:
        """An inbound session ended (call exactly once per ``session_opened``)."""
        self._sessions.dec()

    def reply_sent(self, code: int) -> None:
        """The server sent a reply with this three-digit code.

        :raises ValueError: a code outside 200–599.
        """
        child = self._replies[code // 100] if 200 <= code < 600 else None
        if child is None:
            raise ValueError(f"not an SMTP reply code: {code!r}")
        child.inc()

    def message_received(self, size_bytes: int) -> None:
        """A message of ``size_bytes`` was durably queued."""
        self._received.inc()
        self._received_bytes.inc(size_bytes)

    def tls_handshake(self, direction: str, ok: bool) -> None:
        """A TLS handshake finished ("inbound" or "outbound"), successfully or not.

        :raises ValueError: an unknown direction.
        """
        child = self._handshakes.get((direction, ok))
        if child is None:
            raise _unknown("direction", direction, TLS_DIRECTIONS)
        child.inc()

    # -- delivery --------------------------------------------------------------------------

    def delivery(self, result: str, seconds_in_queue: float) -> None:
        """One recipient's attempt ended with ``result`` after ``seconds_in_queue`` since arrival.

        Delivered recipients feed ``twistedrelay_delivery_seconds``, deferred ones
        ``twistedrelay_deferred_queue_seconds``.

        :raises ValueError: a result other than delivered, deferred, bounced.
        """
        child = self._deliveries.get(result)
        if child is None:
            raise _unknown("result", result, RESULTS)
        child.inc()
        if result == "delivered":
            self._delivery_seconds.observe(seconds_in_queue)
        elif result == "deferred":
            self._deferred_seconds.observe(seconds_in_queue)

    def outbound_connection_opened(self) -> None:
        """An outbound SMTP connection was established."""
        self._outbound_total.inc()
        self._outbound_open.inc()

    def outbound_connection_closed(self) -> None:
        """An outbound SMTP connection that was opened is gone (once per opened)."""
        self._outbound_open.dec()

    def outbound_connection_reused(self) -> None:
        """An open outbound connection starts another transaction."""
        self._outbound_reuses.inc()

    def dns_lookup(self, kind: str, failed: bool = False) -> None:
        """The resolver sent one query of ``kind`` ("mx", "a", "aaaa"); ``failed`` if no answer.

        :raises ValueError: an unknown kind.
        """
        child = self._dns_lookups.get(kind)
        if child is None:
            raise _unknown("kind", kind, DNS_KINDS)
        child.inc()
        if failed:
            self._dns_failures[kind].inc()


# -- multi-process plumbing ------------------------------------------------------------------


def use_multiprocess_values(directory: str | os.PathLike[str]) -> None:
    """Make metrics created from now on in this process write to ``directory``'s mmap files.

    prometheus_client chooses its value class when it is imported, from the environment.
    A worker is normally started with the variable already set; this also covers a process
    that imported prometheus_client first, so its numbers cannot silently stay private.
    """
    os.environ[MULTIPROC_ENV] = os.fspath(directory)
    if values.ValueClass is not _MultiProcessValue:
        values.ValueClass = _MultiProcessValue


def _process_id() -> int:
    return _pid


def _forked() -> None:
    global _pid
    _pid = os.getpid()


# prometheus_client's multiprocess values ask for the PID at every update, to notice a
# fork (about 11 getpid calls per message); this PID is kept current by a fork hook instead.
_pid = os.getpid()
os.register_at_fork(after_in_child=_forked)
_MultiProcessValue = values.MultiProcessValue(process_identifier=_process_id)


def prepare_multiprocess_dir(directory: str | os.PathLike[str]) -> Path:
    """Create ``directory`` (the master, at start) and remove metric files of earlier runs.

    Old files would add counters of processes from a previous run to the sums. Only
    prometheus_client's ``*.db`` files are removed, so a mistyped path never empties anything
    else.
    """
    path = Path(directory)
    path.mkdir(parents=True, mode=0o750, exist_ok=True)
    for old in path.glob("*.db"):
        old.unlink()
    return path


def worker_environment(directory: str | os.PathLike[str]) -> dict[str, str]:
    """The environment entry a worker needs so its metrics go to ``directory``."""
    return {MULTIPROC_ENV: os.fspath(directory)}


def mark_worker_dead(pid: int, directory: str | os.PathLike[str]) -> None:
    """Forget the live gauges of a dead worker; its counters stay in the sums."""
    mark_process_dead(pid, os.fspath(directory))


def build_master_registry(
    directory: str | os.PathLike[str], *collectors: Collector
) -> CollectorRegistry:
    """The registry the master serves: the workers' sums plus the master's own collectors.

    :param directory: the multiprocess directory the workers write to.
    :param collectors: e.g. the :class:`QueueGaugeCollector`.
    """
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=os.fspath(directory))
    for collector in collectors:
        registry.register(collector)
    return registry


# -- queue gauges ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QueueCounts:
    """The result of one counting pass: entries per state and the oldest arrival time."""

    by_state: Mapping[str, int]
    oldest_arrival: float | None
    duration_seconds: float


def _names(directory: str) -> list[str]:
    try:
        return os.listdir(directory)
    except FileNotFoundError:
        return []


def _subdirectories(directory: str) -> list[str]:
    try:
        with os.scandir(directory) as it:
            return [e.path for e in it if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def count_queue(queue_directory: str | os.PathLike[str]) -> QueueCounts:
    """Count the entries of each queue state; blocking, so run it in a thread.

    Entries are the files named by a queue ID in ``incoming/``, ``deferred/``, ``hold/`` and
    every worker's ``active/<owner>/`` (queue/layout.py). The oldest arrival comes from the
    smallest queue ID outside hold (queue IDs sort by arrival time), so no file is stat'ed:
    the mtime of a deferred entry is its next attempt time, not its age.
    """
    started = time.monotonic()
    root = os.fspath(queue_directory)
    by_state: dict[str, int] = {}
    oldest_id: str | None = None
    for state in QUEUE_STATES:
        state_dir = os.path.join(root, state)
        if state == "active":
            dirs = _subdirectories(state_dir)
        else:
            dirs = [state_dir]
        count = 0
        for directory in dirs:
            ids = [name for name in _names(directory) if is_queue_id(name)]
            count += len(ids)
            if ids and state != "hold":
                first = min(ids)
                if oldest_id is None or first < oldest_id:
                    oldest_id = first
        by_state[state] = count
    oldest = None if oldest_id is None else arrival_time_of(oldest_id)
    return QueueCounts(by_state, oldest, time.monotonic() - started)


class QueueGaugeCollector(Collector):
    """Reports queue depth per state and the oldest entry's age, from a periodic count.

    A scrape only reads the cached :class:`QueueCounts`; the counting pass runs in the
    reactor's thread pool every ``interval_seconds`` (a 100k-entry queue is counted in tens
    of milliseconds, off the reactor thread).

    :param queue_directory: the ``[queue] directory``.
    :param reactor: provides the clock (age is computed at scrape time) and the thread pool.
    """

    log = Logger()

    def __init__(
        self,
        queue_directory: str | os.PathLike[str],
        reactor: IReactorTime,
        interval_seconds: float = 5.0,
    ) -> None:
        self.queue_directory = Path(queue_directory)
        self.interval_seconds = interval_seconds
        self.counts = QueueCounts(dict.fromkeys(QUEUE_STATES, 0), None, 0.0)
        self._reactor = reactor
        self._loop: LoopingCall | None = None
        self._first: Deferred[None] | None = None

    def start(self) -> Deferred[None]:
        """Count now and then every ``interval_seconds``; fires once the first count is done."""
        self._first = Deferred()
        self._loop = LoopingCall(self.count_now)
        self._loop.clock = self._reactor
        self._loop.start(self.interval_seconds, now=True).addErrback(
            lambda f: self.log.failure("queue counting stopped", f)
        )
        return self._first

    def stop(self) -> None:
        """Stop the periodic count (the last counts stay)."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def count_now(self) -> Deferred[None]:
        """Run one counting pass in a thread and cache its result; never fails."""
        reactor: Any = self._reactor  # also IReactorThreads (getThreadPool), as documented
        d: Deferred[QueueCounts] = deferToThreadPool(
            reactor, reactor.getThreadPool(), count_queue, self.queue_directory
        )

        def store(counts: QueueCounts) -> None:
            self.counts = counts

        def failed(failure: Failure) -> None:
            self.log.failure("counting the queue failed", failure)

        def done(_: None) -> None:
            first, self._first = self._first, None
            if first is not None:
                first.callback(None)

        return d.addCallbacks(store, failed).addCallback(done)

    def describe(self) -> Iterable[Metric]:
        """The metric families, without samples (for the registry's duplicate check)."""
        return [GaugeMetricFamily(s.name, s.help, labels=list(s.labels)) for s in MASTER_METRICS]

    def collect(self) -> Iterable[Metric]:
        """The cached counts; the oldest age is measured against the reactor clock now."""
        counts = self.counts
        depth = GaugeMetricFamily(QUEUE_MESSAGES.name, QUEUE_MESSAGES.help, labels=["state"])
        for state in QUEUE_STATES:
            depth.add_metric([state], counts.by_state.get(state, 0))
        oldest = counts.oldest_arrival
        age = 0.0 if oldest is None else max(0.0, self._reactor.seconds() - oldest)
        return [
            depth,
            GaugeMetricFamily(QUEUE_OLDEST_AGE.name, QUEUE_OLDEST_AGE.help, value=age),
            GaugeMetricFamily(
                QUEUE_COUNT_SECONDS.name, QUEUE_COUNT_SECONDS.help, value=counts.duration_seconds
            ),
        ]
