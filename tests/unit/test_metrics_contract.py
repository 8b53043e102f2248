"""The metric names and labels are an API: DESIGN's contract and issue 5's additions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock

from twistedrelay import metrics
from twistedrelay.metrics import QueueCounts, QueueGaugeCollector, RelayMetrics, count_queue
from twistedrelay.queue.ids import QueueIdGenerator

# name -> (type, {label: allowed values}) as a scraper sees them (counters without _total).
CONTRACT = {
    "twistedrelay_messages_received": ("counter", {}),
    "twistedrelay_deliveries": ("counter", {"result": {"delivered", "deferred", "bounced"}}),
    "twistedrelay_queue_messages": (
        "gauge",
        {"state": {"incoming", "active", "deferred", "hold"}},
    ),
    "twistedrelay_smtp_sessions": ("gauge", {}),
    "twistedrelay_delivery_seconds": ("histogram", {}),
}
ADDITIONS = {
    "twistedrelay_received_bytes": ("counter", {}),
    "twistedrelay_deferred_queue_seconds": ("histogram", {}),
    "twistedrelay_queue_oldest_age_seconds": ("gauge", {}),
    "twistedrelay_queue_count_duration_seconds": ("gauge", {}),
    "twistedrelay_smtp_sessions_opened": (
        "counter",
        {"listener": {"smtp", "submission", "submissions"}},
    ),
    "twistedrelay_smtp_replies": ("counter", {"class": {"2xx", "3xx", "4xx", "5xx"}}),
    "twistedrelay_tls_handshakes": (
        "counter",
        {"direction": {"inbound", "outbound"}, "result": {"ok", "failed"}},
    ),
    "twistedrelay_outbound_connections": ("gauge", {}),
    "twistedrelay_outbound_connections_opened": ("counter", {}),
    "twistedrelay_outbound_connection_reuses": ("counter", {}),
    "twistedrelay_dns_lookups": ("counter", {"kind": {"mx", "a", "aaaa"}}),
    "twistedrelay_dns_failures": ("counter", {"kind": {"mx", "a", "aaaa"}}),
}
# Labels prometheus_client adds itself on histogram series.
_STRUCTURAL_LABELS = {"le"}


def scrape(registry: CollectorRegistry) -> dict[str, object]:
    """Parse the text exposition of ``registry`` into families by name."""
    text = generate_latest(registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def full_registry(clock: Clock | None = None, queue_dir: Path | None = None) -> CollectorRegistry:
    """One registry holding every metric: a RelayMetrics plus the master's queue gauges."""
    relay = RelayMetrics()
    relay.registry.register(QueueGaugeCollector(queue_dir or "/nonexistent", clock or Clock()))
    return relay.registry


def test_exposition_has_exactly_the_contract_and_the_additions():
    """Every pinned metric is exposed with its type and label values, and nothing else."""
    families = scrape(full_registry())
    # prometheus_client's own per-series creation times are not part of the contract.
    ours = {
        n: f
        for n, f in families.items()
        if n.startswith("twistedrelay_") and not n.endswith("_created")
    }
    expected = CONTRACT | ADDITIONS
    assert sorted(ours) == sorted(expected)
    for name, (kind, labels) in expected.items():
        family = ours[name]
        assert family.type == kind, name
        seen: dict[str, set[str]] = {label: set() for label in labels}
        for sample in family.samples:
            keys = set(sample.labels) - _STRUCTURAL_LABELS
            assert keys == set(labels), (name, sample)
            for label in labels:
                seen[label].add(sample.labels[label])
        assert seen == labels, name


def test_metric_table_matches_the_pinned_names():
    """The METRICS table (the one definition) names exactly the pinned metrics."""
    exposed = {spec.name.removesuffix("_total") for spec in metrics.METRICS}
    assert exposed == set(CONTRACT) | set(ADDITIONS)


def test_every_labelled_series_exists_at_zero_before_any_event():
    """Pre-bound children make each labelled series visible from the first scrape."""
    families = scrape(RelayMetrics().registry)
    results = {
        s.labels["result"]: s.value
        for s in families["twistedrelay_deliveries"].samples
        if s.name == "twistedrelay_deliveries_total"
    }
    assert results == {"delivered": 0.0, "deferred": 0.0, "bounced": 0.0}


def test_two_relay_metrics_in_one_process_do_not_collide():
    """Nothing registers at import time, so tests can build many RelayMetrics."""
    first, second = RelayMetrics(), RelayMetrics()
    first.message_received(10)
    assert second.registry.get_sample_value("twistedrelay_messages_received_total") == 0.0


def test_message_received_counts_messages_and_bytes():
    """message_received moves the received counter by one and bytes by the size."""
    m = RelayMetrics()
    m.message_received(1234)
    m.message_received(66)
    assert m.registry.get_sample_value("twistedrelay_messages_received_total") == 2.0
    assert m.registry.get_sample_value("twistedrelay_received_bytes_total") == 1300.0


def test_delivery_feeds_outcome_counter_and_the_matching_histogram():
    """Delivered time goes to delivery_seconds, deferred time to deferred_queue_seconds."""
    m = RelayMetrics()
    m.delivery("delivered", 0.3)
    m.delivery("deferred", 400.0)
    m.delivery("bounced", 2.0)
    get = m.registry.get_sample_value
    for result in ("delivered", "deferred", "bounced"):
        assert get("twistedrelay_deliveries_total", {"result": result}) == 1.0
    assert get("twistedrelay_delivery_seconds_count") == 1.0
    assert get("twistedrelay_delivery_seconds_sum") == pytest.approx(0.3)
    assert get("twistedrelay_delivery_seconds_bucket", {"le": "0.5"}) == 1.0
    assert get("twistedrelay_delivery_seconds_bucket", {"le": "0.25"}) == 0.0
    assert get("twistedrelay_deferred_queue_seconds_count") == 1.0
    assert get("twistedrelay_deferred_queue_seconds_sum") == 400.0


def test_sessions_gauge_follows_open_and_close_and_counts_by_listener():
    """session_opened/closed move the open gauge; opened sessions count per listener."""
    m = RelayMetrics()
    m.session_opened("smtp")
    m.session_opened("submission")
    m.session_closed()
    get = m.registry.get_sample_value
    assert get("twistedrelay_smtp_sessions") == 1.0
    assert get("twistedrelay_smtp_sessions_opened_total", {"listener": "smtp"}) == 1.0
    assert get("twistedrelay_smtp_sessions_opened_total", {"listener": "submission"}) == 1.0


@pytest.mark.parametrize(
    ("code", "klass"), [(220, "2xx"), (354, "3xx"), (451, "4xx"), (554, "5xx"), (599, "5xx")]
)
def test_reply_sent_counts_by_code_class(code: int, klass: str):
    """A reply code lands in its class."""
    m = RelayMetrics()
    m.reply_sent(code)
    assert m.registry.get_sample_value("twistedrelay_smtp_replies_total", {"class": klass}) == 1.0


def test_outbound_connections_gauge_counter_and_reuse():
    """Opened connections count and show as open until closed; reuses count separately."""
    m = RelayMetrics()
    m.outbound_connection_opened()
    m.outbound_connection_opened()
    m.outbound_connection_reused()
    m.outbound_connection_closed()
    get = m.registry.get_sample_value
    assert get("twistedrelay_outbound_connections") == 1.0
    assert get("twistedrelay_outbound_connections_opened_total") == 2.0
    assert get("twistedrelay_outbound_connection_reuses_total") == 1.0


def test_dns_lookup_counts_lookups_and_failures_by_kind():
    """A failed lookup counts as a lookup and as a failure of its kind."""
    m = RelayMetrics()
    m.dns_lookup("mx")
    m.dns_lookup("a", failed=True)
    get = m.registry.get_sample_value
    assert get("twistedrelay_dns_lookups_total", {"kind": "mx"}) == 1.0
    assert get("twistedrelay_dns_lookups_total", {"kind": "a"}) == 1.0
    assert get("twistedrelay_dns_failures_total", {"kind": "a"}) == 1.0
    assert get("twistedrelay_dns_failures_total", {"kind": "mx"}) == 0.0


def test_tls_handshake_counts_by_direction_and_result():
    """Handshakes are counted per direction and result."""
    m = RelayMetrics()
    m.tls_handshake("inbound", True)
    m.tls_handshake("outbound", False)
    get = m.registry.get_sample_value
    labels = {"direction": "inbound", "result": "ok"}
    assert get("twistedrelay_tls_handshakes_total", labels) == 1.0
    labels = {"direction": "outbound", "result": "failed"}
    assert get("twistedrelay_tls_handshakes_total", labels) == 1.0


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.delivery("sent", 1.0),
        lambda m: m.session_opened("198.51.100.7:25"),
        lambda m: m.reply_sent(199),
        lambda m: m.reply_sent(600),
        lambda m: m.dns_lookup("example.com"),
        lambda m: m.tls_handshake("sideways", True),
    ],
)
def test_unknown_label_values_are_refused(call):
    """A label value outside its fixed set raises instead of creating an unbounded series."""
    with pytest.raises(ValueError):
        call(RelayMetrics())


def test_queue_collector_reports_cached_counts_and_age_from_the_clock():
    """A scrape reports the last count; the oldest age grows with the clock, not the count."""
    clock = Clock()
    clock.advance(1000.0)
    collector = QueueGaugeCollector("/nonexistent", clock)
    collector.counts = QueueCounts(
        {"incoming": 3, "active": 2, "deferred": 7, "hold": 1}, 900.0, 0.01
    )
    registry = CollectorRegistry()
    registry.register(collector)
    get = registry.get_sample_value
    assert get("twistedrelay_queue_messages", {"state": "deferred"}) == 7.0
    assert get("twistedrelay_queue_messages", {"state": "hold"}) == 1.0
    assert get("twistedrelay_queue_oldest_age_seconds") == 100.0
    clock.advance(50.0)
    assert get("twistedrelay_queue_oldest_age_seconds") == 150.0


def test_queue_collector_reports_zero_age_for_an_empty_queue():
    """No entry means age 0, not a stale or negative value."""
    registry = CollectorRegistry()
    registry.register(QueueGaugeCollector("/nonexistent", Clock()))
    assert registry.get_sample_value("twistedrelay_queue_oldest_age_seconds") == 0.0


def _make_entries(directory: Path, ids: list[str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for queue_id in ids:
        (directory / queue_id).touch()


def test_count_queue_counts_each_state_and_finds_the_oldest_outside_hold(tmp_path: Path):
    """incoming, active/<owner>/ (summed), deferred and hold are counted; foreign names skipped."""
    now_ns = [1_700_000_000_000_000_000]

    def clock_ns() -> int:
        now_ns[0] += 1_000_000_000
        return now_ns[0]

    gen = QueueIdGenerator(clock_ns=clock_ns, getpid=lambda: 4242)
    held, oldest, *rest = [gen.new_id() for _ in range(9)]
    _make_entries(tmp_path / "hold", [held])
    _make_entries(tmp_path / "deferred", [oldest, rest[0]])
    _make_entries(tmp_path / "active" / "w0", rest[1:3])
    _make_entries(tmp_path / "active" / "w1", rest[3:4])
    _make_entries(tmp_path / "incoming", rest[4:])
    (tmp_path / "incoming" / ".hidden").touch()
    (tmp_path / "incoming" / "not-a-queue-id").touch()
    (tmp_path / "status").mkdir()
    _make_entries(tmp_path / "status", [oldest])

    counts = count_queue(tmp_path)

    assert counts.by_state == {"incoming": 3, "active": 3, "deferred": 2, "hold": 1}
    assert counts.oldest_arrival == 1_700_000_002.0


def test_count_queue_of_a_missing_directory_is_all_zero(tmp_path: Path):
    """A queue that does not exist yet counts as empty rather than failing."""
    counts = count_queue(tmp_path / "missing")
    assert counts.by_state == {"incoming": 0, "active": 0, "deferred": 0, "hold": 0}
    assert counts.oldest_arrival is None


def test_prepare_multiprocess_dir_empties_files_of_an_earlier_run(tmp_path: Path):
    """Files left by a previous run would add old counters to the sums; they are removed."""
    directory = tmp_path / "metrics"
    directory.mkdir()
    (directory / "counter_123.db").write_bytes(b"old")
    (directory / "gauge_livesum_123.db").write_bytes(b"old")
    (directory / "not-ours").write_bytes(b"keep")
    assert metrics.prepare_multiprocess_dir(directory) == directory
    assert os.listdir(directory) == ["not-ours"]


def test_worker_environment_names_the_directory(tmp_path: Path):
    """Workers get PROMETHEUS_MULTIPROC_DIR pointing at the master's directory."""
    assert metrics.worker_environment(tmp_path) == {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
