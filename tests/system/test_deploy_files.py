"""deploy/: the files operators install are valid, tested, and name only real metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from twistedrelay import config as config_module
from twistedrelay.config import load_config
from twistedrelay.metrics import METRICS

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboard.json"

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool comes from Debian's prometheus package"
)

# Series names a metric family exposes (histograms add _bucket/_sum/_count).
KNOWN_SERIES = {
    spec.name + suffix
    for spec in METRICS
    for suffix in (("_bucket", "_sum", "_count") if spec.kind == "histogram" else ("",))
}


def promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel of the Grafana dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def metric_names(promql: str) -> set[str]:
    return set(re.findall(r"\btwistedrelay_[a-z_]+\b", promql))


@needs_promtool
def test_prometheus_config_is_valid():
    """promtool check config accepts prometheus.yml (and the rule file it names)."""
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_alert_rules_are_valid():
    """promtool check rules accepts alerts.yml."""
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_alert_unit_tests_pass():
    """promtool test rules runs every alert's firing and not-firing cases."""
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_case():
    """Each alert in alerts.yml is expected to fire somewhere and to stay quiet somewhere."""
    alerts = set(re.findall(r"^\s*- alert: (\w+)", (PROMETHEUS / "alerts.yml").read_text(), re.M))
    assert alerts == {
        "TwistedRelayDown",
        "TwistedRelayQueueGrowing",
        "TwistedRelayDeferredBacklog",
        "TwistedRelayBounceRatioHigh",
        "TwistedRelayNoDeliveries",
    }
    cases = (PROMETHEUS / "alerts_test.yml").read_text().split("- eval_time:")[1:]
    quiet = {re.search(r"alertname: (\w+)", c)[1] for c in cases if "exp_alerts: []" in c}
    firing = {re.search(r"alertname: (\w+)", c)[1] for c in cases if "exp_labels:" in c}
    assert quiet == alerts
    assert firing == alerts


def test_alerts_name_only_metrics_the_relay_exposes():
    """A renamed metric cannot silently disarm an alert."""
    names = metric_names((PROMETHEUS / "alerts.yml").read_text())
    assert names and names <= KNOWN_SERIES


def test_dashboard_queries_name_only_metrics_the_relay_exposes():
    """Every panel queries real metrics, and the required panels are there."""
    exprs = dashboard_exprs()
    assert exprs
    for title, expr in exprs:
        assert metric_names(expr) <= KNOWN_SERIES, (title, expr)
    used = set().union(*(metric_names(e) for _, e in exprs))
    for required in (
        "twistedrelay_queue_messages",
        "twistedrelay_messages_received_total",
        "twistedrelay_deliveries_total",
        "twistedrelay_delivery_seconds_bucket",
        "twistedrelay_smtp_sessions",
        "twistedrelay_outbound_connection_reuses_total",
        "twistedrelay_dns_failures_total",
    ):
        assert required in used


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path):
    """Each dashboard expression parses: promtool checks them as recording rules."""
    rules = ["groups:", "  - name: dashboard", "    rules:"]
    for i, (_, expr) in enumerate(dashboard_exprs()):
        rules.append(f"      - record: dashboard:expr{i}")
        rules.append(f"        expr: {json.dumps(expr)}")
    (tmp_path / "dashboard_rules.yml").write_text("\n".join(rules) + "\n")
    result = promtool("check", "rules", "dashboard_rules.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_files_exist():
    """The datasource and dashboard provider are provisioned."""
    provisioning = DEPLOY / "grafana" / "provisioning"
    assert "type: prometheus" in (provisioning / "datasources" / "prometheus.yml").read_text()
    assert "type: file" in (provisioning / "dashboards" / "twistedrelay.yml").read_text()


def test_example_relay_toml_loads_and_sets_every_key():
    """The production example is a valid config that shows every key of every table."""
    config = load_config(DEPLOY / "relay.toml")
    assert config.queue.directory == Path("/var/spool/twistedrelay")
    data = tomllib.loads((DEPLOY / "relay.toml").read_text())
    assert "hostname" in data
    for table, cls in config_module._TABLES.items():
        assert set(data[table]) == {f.name for f in fields(cls)}, table
    assert {"enabled", "hook_timeout"} <= set(data["plugins"])


def test_systemd_unit_runs_twistd_hardened_and_drains_on_stop():
    """The unit has the start line, restart policy, hardening and stop/reload behaviour."""
    unit = (DEPLOY / "systemd" / "twistedrelay.service").read_text()
    settings = dict(
        line.split("=", 1)
        for line in unit.splitlines()
        if line and not line.startswith(("#", "[")) and "=" in line
    )
    assert settings["ExecStart"] == (
        "/opt/twistedrelay/bin/twistd -n --pidfile= twistedrelay "
        "--config /etc/twistedrelay/relay.toml"
    )
    expected = {
        "User": "twistedrelay",
        "Restart": "on-failure",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "ProtectSystem": "strict",
        "ReadWritePaths": "/var/spool/twistedrelay",
        "NoNewPrivileges": "true",
        "PrivateTmp": "true",
        "ProtectHome": "true",
        "KillSignal": "SIGTERM",
        "KillMode": "mixed",
        "TimeoutStopSec": "35",
        "ExecReload": "/bin/kill -HUP $MAINPID",
    }
    assert {k: settings.get(k) for k in expected} == expected


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_unit_passes_systemd_analyze(tmp_path: Path):
    """systemd-analyze verify finds nothing wrong but the not-yet-installed twistd."""
    result = subprocess.run(
        ["systemd-analyze", "verify", str(DEPLOY / "systemd" / "twistedrelay.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    problems = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if line.strip() and "/opt/twistedrelay/bin/twistd" not in line
    ]
    assert problems == []
