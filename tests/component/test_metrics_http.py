"""The master's /metrics endpoint over a real loopback socket: content, lint, speed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import deferLater
from twisted.web.client import Agent, readBody

from twistedrelay.config import Endpoint
from twistedrelay.metrics import (
    MULTIPROC_ENV,
    QueueGaugeCollector,
    build_master_registry,
    prepare_multiprocess_dir,
    worker_environment,
)
from twistedrelay.metrics_http import metrics_service_factory, start_metrics_server
from twistedrelay.process.sockets import bind_listener
from twistedrelay.queue.ids import QueueIdGenerator

WORKER = """
import sys
from twistedrelay.metrics import RelayMetrics
metrics = RelayMetrics.for_worker()
for _ in range(int(sys.argv[1])):
    metrics.session_opened("smtp")
    metrics.reply_sent(220)
    metrics.reply_sent(250)
    metrics.message_received(512)
    metrics.session_closed()
metrics.delivery("deferred", 300.0)
"""


def run_worker(directory: Path, count: int) -> None:
    env = {k: v for k, v in os.environ.items() if k != MULTIPROC_ENV}
    env |= worker_environment(directory)
    subprocess.run([sys.executable, "-c", WORKER, str(count)], env=env, timeout=60, check=True)


def make_queue(root: Path, incoming: int, deferred: int) -> float:
    """Create empty entries named by real queue IDs; return the oldest arrival time."""
    gen = QueueIdGenerator()
    for state, count in (("incoming", incoming), ("deferred", deferred)):
        (root / state).mkdir(parents=True)
        for _ in range(count):
            (root / state / gen.new_id()).touch()
    (root / "active" / "w0").mkdir(parents=True)
    (root / "hold").mkdir()
    oldest = min(os.listdir(root / "incoming"))
    return int(oldest[:13], 16) / 1e6


async def fetch(url: bytes, accept: bytes | None = None) -> tuple[int, dict, bytes]:
    from twisted.internet import reactor
    from twisted.web.http_headers import Headers

    headers = Headers({b"Accept": [accept]}) if accept else None
    response = await Agent(reactor).request(b"GET", url, headers)
    body = await readBody(response)
    return response.code, dict(response.headers.getAllRawHeaders()), body


@pytest.fixture(scope="module")
def workers_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A multiprocess directory written by two finished workers (7 sessions in all)."""
    directory = prepare_multiprocess_dir(tmp_path_factory.mktemp("metrics") / "mp")
    run_worker(directory, 3)
    run_worker(directory, 4)
    return directory


@pytest.fixture
def master(tmp_path: Path, workers_dir: Path):
    """A master registry (the two workers, a 400-entry queue) served on loopback."""
    from twisted.internet import reactor

    directory = workers_dir
    oldest = make_queue(tmp_path / "queue", incoming=300, deferred=100)
    collector = QueueGaugeCollector(tmp_path / "queue", reactor, interval_seconds=5.0)
    registry = build_master_registry(directory, collector)
    port = start_metrics_server(reactor, Endpoint("127.0.0.1", 0), registry)
    yield collector, port, oldest
    collector.stop()
    port.stopListening()


@pytest_twisted.ensureDeferred
async def test_scrape_sums_workers_and_reports_queue_counts(master):
    """One scrape shows the workers' sums and the master's queue gauges."""
    collector, port, oldest = master
    await collector.start()
    url = f"http://127.0.0.1:{port.getHost().port}/metrics".encode()
    code, headers, body = await fetch(url)
    assert code == 200
    assert headers[b"Content-Type"][0].startswith(b"text/plain; version=0.0.4")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }
    assert samples[("twistedrelay_messages_received_total", ())] == 7.0
    assert samples[("twistedrelay_received_bytes_total", ())] == 7 * 512.0
    assert samples[("twistedrelay_smtp_sessions", ())] == 0.0
    assert samples[("twistedrelay_smtp_replies_total", (("class", "2xx"),))] == 14.0
    assert samples[("twistedrelay_deliveries_total", (("result", "deferred"),))] == 2.0
    assert samples[("twistedrelay_deferred_queue_seconds_count", ())] == 2.0
    queue = {
        state: samples[("twistedrelay_queue_messages", (("state", state),))]
        for state in ("incoming", "active", "deferred", "hold")
    }
    assert queue == {"incoming": 300.0, "active": 0.0, "deferred": 100.0, "hold": 0.0}
    age = samples[("twistedrelay_queue_oldest_age_seconds", ())]
    assert 0.0 <= (time.time() - oldest) - age < 60.0


@pytest_twisted.ensureDeferred
async def test_scrape_follows_the_queue_after_the_next_count(master, tmp_path: Path):
    """Entries moved between states show up after the next counting pass, not before."""
    collector, port, _ = master
    await collector.start()
    incoming = tmp_path / "queue" / "incoming"
    for name in sorted(os.listdir(incoming))[:100]:
        os.rename(incoming / name, tmp_path / "queue" / "active" / "w0" / name)
    registry_value = collector.counts.by_state["active"]
    assert registry_value == 0
    await collector.count_now()
    assert collector.counts.by_state == {
        "incoming": 200,
        "active": 100,
        "deferred": 100,
        "hold": 0,
    }


@pytest_twisted.ensureDeferred
async def test_openmetrics_is_served_when_asked(master):
    """A scraper that asks for OpenMetrics gets it (with the # EOF terminator)."""
    _, port, _ = master
    url = f"http://127.0.0.1:{port.getHost().port}/metrics".encode()
    code, headers, body = await fetch(url, b"application/openmetrics-text; version=1.0.0")
    assert code == 200
    assert headers[b"Content-Type"][0].startswith(b"application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


@pytest_twisted.ensureDeferred
async def test_other_paths_are_not_found(master):
    """Only /metrics is served."""
    _, port, _ = master
    code, _, _ = await fetch(f"http://127.0.0.1:{port.getHost().port}/secret".encode())
    assert code == 404


@pytest_twisted.ensureDeferred
async def test_scrape_answers_fast_with_a_counted_queue(master):
    """Rendering does not walk the queue: well under the 100 ms budget."""
    collector, port, _ = master
    await collector.start()
    url = f"http://127.0.0.1:{port.getHost().port}/metrics".encode()
    await fetch(url)
    started = time.monotonic()
    for _ in range(5):
        await fetch(url)
    assert (time.monotonic() - started) / 5 < 0.1


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian prometheus)")
@pytest_twisted.ensureDeferred
async def test_promtool_accepts_a_real_scrape(master):
    """promtool check metrics finds no problem in what /metrics serves."""
    collector, port, _ = master
    await collector.start()
    _, _, body = await fetch(f"http://127.0.0.1:{port.getHost().port}/metrics".encode())
    result = subprocess.run(
        ["promtool", "check", "metrics"],
        input=body.decode(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""


@pytest_twisted.ensureDeferred
async def test_metrics_service_serves_on_the_masters_bound_socket(tmp_path: Path, workers_dir):
    """The master's service adopts its bound socket, counts the queue and stops cleanly."""
    from twisted.internet import reactor

    make_queue(tmp_path / "queue", incoming=3, deferred=2)
    bound = bind_listener("metrics", Endpoint("127.0.0.1", 0))
    try:
        service = metrics_service_factory(reactor, tmp_path / "queue")(bound, str(workers_dir))
        service.startService()
        try:
            url = f"http://127.0.0.1:{bound.port}/metrics".encode()
            deadline = time.monotonic() + 10
            while True:
                _, _, body = await fetch(url)
                if b'twistedrelay_queue_messages{state="incoming"} 3.0' in body:
                    break
                assert time.monotonic() < deadline, body
                await deferLater(reactor, 0.05)
            assert b"twistedrelay_messages_received_total 7.0" in body
        finally:
            await service.stopService()
    finally:
        bound.sock.close()
