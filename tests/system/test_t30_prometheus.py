"""t30: a real Prometheus on loopback scrapes a two-worker relay under load.

One module-scoped setup: a sink, a relay (two workers, every domain routed to the sink), and
Debian's ``prometheus`` scraping the relay's master every second into a temporary TSDB.
``twistedrelay bench send`` puts N messages through; once the sink has them all, the tests
ask Prometheus' HTTP API every query of the Grafana dashboard and the numbers the issue
promises (received == delivered == N, summed over both workers; the queue drains to 0), and
check a live scrape with ``promtool check metrics`` and against docs/operations.md.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from tests.system.harness import (
    RelayProcess,
    SinkProcess,
    closed_port,
    stop_process,
    wait_until,
    write_relay_config,
)
from tests.system.test_deploy_files import DEPLOY, dashboard_exprs, metric_names

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
    pytest.mark.skipif(
        shutil.which("prometheus") is None or shutil.which("promtool") is None,
        reason="Debian's prometheus package (make test installs it)",
    ),
]

MESSAGES = 300
CONNECTIONS = 10
SCRAPE_INTERVAL_SECONDS = 1
DELIVERY_TIMEOUT_SECONDS = 40.0
#: The project's command, installed next to the interpreter running the tests (as twistd is).
TWISTEDRELAY = os.path.join(os.path.dirname(sys.executable), "twistedrelay")
DOCS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


@dataclass
class Stack:
    """The running processes of this module and what the load generator reported."""

    relay: RelayProcess
    sink: SinkProcess
    prometheus_url: str
    load_report: dict[str, Any]

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.relay.metrics_port}/metrics"

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The result vector of an instant PromQL query (at the current time)."""
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        """The single value of ``expr``, or None when Prometheus has no sample for it."""
        result = self.query(expr)
        assert len(result) <= 1, (expr, result)
        return float(result[0]["value"][1]) if result else None


class PrometheusProcess:
    """``prometheus`` on a free loopback port scraping one target, with deploy/'s alert rules.

    Its TSDB lives in ``directory`` (never /var/lib/prometheus).
    """

    def __init__(self, directory: Path, target: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "prometheus.yml"
        config.write_text(
            "global:\n"
            f"  scrape_interval: {SCRAPE_INTERVAL_SECONDS}s\n"
            f"  scrape_timeout: {SCRAPE_INTERVAL_SECONDS}s\n"
            f"  evaluation_interval: {SCRAPE_INTERVAL_SECONDS}s\n"
            "rule_files:\n"
            f'  - "{DEPLOY / "prometheus" / "alerts.yml"}"\n'
            "scrape_configs:\n"
            "  - job_name: twistedrelay\n"
            "    static_configs:\n"
            f'      - targets: ["{target}"]\n'
        )
        self.port = closed_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output_path = directory / "prometheus.out"
        with open(self.output_path, "wb") as output:
            self.proc = subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={config}",
                    f"--storage.tsdb.path={directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                cwd=directory,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until Prometheus answers /-/ready."""

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited: {self.output_path.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_until(ready, timeout, "prometheus to be ready")

    def cleanup(self) -> None:
        """SIGTERM by PID, bounded wait, SIGKILL if it did not stop."""
        stop_process(self.proc)


def _scrapes(stack: Stack) -> float:
    """How many times Prometheus has scraped the relay so far (samples of ``up``)."""
    result = stack.query('count_over_time(up{job="twistedrelay"}[5m])')
    return float(result[0]["value"][1]) if result else 0.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    """Sink, two-worker relay and Prometheus, with MESSAGES sent through and delivered."""
    directory = tmp_path_factory.mktemp("t30")
    sink = SinkProcess(directory / "sink")
    relay = prometheus = None
    try:
        sink.wait_bound()
        config = write_relay_config(directory, route=f"127.0.0.1:{sink.port}", workers=2)
        relay = RelayProcess(config, directory / "run")
        relay.wait_ready(workers=2)
        assert relay.metrics_port, relay.log()
        prometheus = PrometheusProcess(directory / "prometheus", f"127.0.0.1:{relay.metrics_port}")
        prometheus.wait_ready()
        stack = Stack(relay, sink, prometheus.url, {})
        # A scrape before the load, so every counter's rate has a starting point.
        wait_until(lambda: _scrapes(stack) >= 1, 15, "a first scrape of the relay")

        load = subprocess.run(
            [
                TWISTEDRELAY,
                "bench",
                "send",
                "--target",
                f"127.0.0.1:{relay.smtp_port}",
                "--messages",
                str(MESSAGES),
                "--connections",
                str(CONNECTIONS),
                "--timeout",
                "30",
                "--json",
                "--quiet",
            ],
            capture_output=True,
            text=True,
            timeout=45,
            check=False,
        )
        assert load.returncode == 0, load.stdout + load.stderr
        stack.load_report = json.loads(load.stdout.strip().splitlines()[-1])
        assert stack.load_report["messages_accepted"] == MESSAGES, stack.load_report

        wait_until(
            lambda: len(list(sink.save_dir.glob("*.eml"))) >= MESSAGES,
            DELIVERY_TIMEOUT_SECONDS,
            f"the sink to receive {MESSAGES} messages",
        )
        # Two more scrapes after the last delivery, so the counters' final values are stored.
        after = _scrapes(stack)
        wait_until(lambda: _scrapes(stack) >= after + 2, 15, "two scrapes after the load")
        yield stack
    finally:
        try:
            if prometheus is not None:
                prometheus.cleanup()
        finally:
            try:
                if relay is not None:
                    relay.cleanup()
            finally:
                sink.cleanup()


def _scrape_text(stack: Stack) -> str:
    with urllib.request.urlopen(stack.metrics_url, timeout=5) as response:
        return response.read().decode()


def _families(text: str) -> dict[str, Metric]:
    """The metric families of a text exposition, parsed by prometheus_client, by name.

    The parser names a counter family without its ``_total`` suffix; its samples keep it.
    """
    return {family.name: family for family in text_string_to_metric_families(text)}


def test_every_dashboard_query_returns_data(stack: Stack) -> None:
    """Each PromQL expression of the Grafana dashboard answers with at least one series."""
    empty = [(title, expr) for title, expr in dashboard_exprs() if not stack.query(expr)]
    assert empty == []


def test_dashboard_latency_and_rates_are_numbers_after_load(stack: Stack) -> None:
    """The throughput and latency panels show real numbers, not NaN, once mail flowed."""
    received = stack.value("sum(rate(twistedrelay_messages_received_total[5m]))")
    p99 = stack.value(
        "histogram_quantile(0.99, sum by (le) (rate(twistedrelay_delivery_seconds_bucket[5m])))"
    )
    assert received is not None and received > 0
    assert p99 is not None and math.isfinite(p99) and p99 > 0


def test_prometheus_sums_over_workers_match_what_the_sink_received(stack: Stack) -> None:
    """received_total and delivered, summed over both workers, equal N = what the sink got."""
    delivered_by_sink = len(list(stack.sink.save_dir.glob("*.eml")))
    assert delivered_by_sink == MESSAGES
    assert stack.value("sum(twistedrelay_messages_received_total)") == MESSAGES
    assert stack.value('sum(twistedrelay_deliveries_total{result="delivered"})') == MESSAGES
    assert stack.value('sum(twistedrelay_deliveries_total{result!="delivered"})') == 0
    assert stack.value("sum(twistedrelay_smtp_sessions_opened_total)") >= CONNECTIONS
    # Both workers took part: the sum is not one process's count.
    log = stack.relay.log()
    assert re.search(r"worker 0: .*status=sent", log) and re.search(r"worker 1: .*status=sent", log)


def test_queue_gauges_in_prometheus_show_the_queue_drained(stack: Stack) -> None:
    """After the load the queue gauges (recounted every 5 s) reach 0 in every state."""

    def drained() -> bool:
        by_state = {
            r["metric"]["state"]: float(r["value"][1])
            for r in stack.query("twistedrelay_queue_messages")
        }
        oldest = stack.value("max(twistedrelay_queue_oldest_age_seconds)")
        return set(by_state) == {"incoming", "active", "deferred", "hold"} and (
            sum(by_state.values()) == 0 and oldest == 0
        )

    wait_until(drained, 15, "the queue gauges in Prometheus to show an empty queue")


def test_live_scrape_passes_promtool_check_metrics(stack: Stack) -> None:
    """promtool check metrics finds no problem in the running master's exposition."""
    result = subprocess.run(
        ["promtool", "check", "metrics"],
        input=_scrape_text(stack),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""


def test_scrape_answers_fast(stack: Stack) -> None:
    """A GET /metrics of the master answers in well under 100 ms (median of 5, after load).

    Under load the master also relays every worker log line, so single scrapes then can be
    slower on a busy 2-core machine; Prometheus' own figures are printed for the record.
    """
    durations = []
    for _ in range(5):
        started = time.monotonic()
        _scrape_text(stack)
        durations.append(time.monotonic() - started)
    slowest = stack.value('max_over_time(scrape_duration_seconds{job="twistedrelay"}[5m])')
    average = stack.value('avg_over_time(scrape_duration_seconds{job="twistedrelay"}[5m])')
    print(  # shown by pytest -rP
        f"GET /metrics after load: median {statistics.median(durations) * 1000:.1f} ms; "
        f"Prometheus scrape_duration_seconds over the run: max {slowest}, average {average}"
    )
    assert statistics.median(durations) < 0.1


def test_direct_scrape_parsed_by_prometheus_client_sums_both_workers(stack: Stack) -> None:
    """The master's own /metrics, parsed by prometheus_client, counts N received, N delivered."""
    families = _families(_scrape_text(stack))
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in families.values()
        for sample in family.samples
    }
    assert samples[("twistedrelay_messages_received_total", ())] == MESSAGES
    assert samples[("twistedrelay_deliveries_total", (("result", "delivered"),))] == MESSAGES
    assert samples[("twistedrelay_delivery_seconds_count", ())] == MESSAGES
    assert samples[("twistedrelay_received_bytes_total", ())] >= MESSAGES * 1024


def test_operations_doc_lists_exactly_the_exported_metrics(stack: Stack) -> None:
    """docs/operations.md's metrics table names each exported family, with its type."""
    # The docs name a counter by its series ("…_total"), like the PromQL that reads it.
    exported = {
        (f"{name}_total" if family.type == "counter" else name): family.type
        for name, family in _families(_scrape_text(stack)).items()
        if name.startswith("twistedrelay_")
    }
    documented = dict(
        re.findall(
            r"^\| `(twistedrelay_\w+)` \| (counter|gauge|histogram) \|", DOCS.read_text(), re.M
        )
    )
    assert documented == exported


def test_alert_rules_name_only_exported_series(stack: Stack) -> None:
    """Every metric an alert rule reads is in the running relay's exposition."""
    text = _scrape_text(stack)
    series = set(re.findall(r"^(twistedrelay_\w+)", text, re.M))
    used = metric_names((DEPLOY / "prometheus" / "alerts.yml").read_text())
    assert used and used <= series
    # The renamed counters are the names the relay exports.
    assert "twistedrelay_smtp_sessions_opened_total" in series
    assert "twistedrelay_outbound_connections_opened_total" in series


def test_alert_rules_evaluate_cleanly_and_stay_quiet(stack: Stack) -> None:
    """Prometheus evaluates each rule of alerts.yml without error; none fires on a healthy relay."""

    def rules() -> list[dict[str, Any]] | None:
        with urllib.request.urlopen(f"{stack.prometheus_url}/api/v1/rules", timeout=5) as response:
            groups = json.loads(response.read())["data"]["groups"]
        found = [rule for group in groups for rule in group["rules"]]
        return (
            found
            if found and all(r.get("lastEvaluation", "").startswith("2") for r in found)
            else None
        )

    evaluated = wait_until(rules, 10, "the alert rules to be evaluated")
    assert {r["name"] for r in evaluated} == {
        "TwistedRelayDown",
        "TwistedRelayQueueGrowing",
        "TwistedRelayDeferredBacklog",
        "TwistedRelayBounceRatioHigh",
        "TwistedRelayNoDeliveries",
    }
    assert [(r["name"], r["health"], r.get("lastError", "")) for r in evaluated] == [
        (r["name"], "ok", "") for r in evaluated
    ]
    assert [r["name"] for r in evaluated if r["state"] != "inactive"] == []
