"""Worker metrics from real processes are summed by the master's registry."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from twistedrelay import metrics as metrics_module
from twistedrelay.metrics import (
    MULTIPROC_ENV,
    build_master_registry,
    mark_worker_dead,
    prepare_multiprocess_dir,
    worker_environment,
)

# A stand-in worker: counts N received messages and delivered recipients, opens one
# session and one outbound connection, prints its PID and exits.
WORKER = """
import os, sys
if sys.argv[3] == "early-import":
    import prometheus_client  # noqa: F401  (chooses its value class before the env var)
from twistedrelay.metrics import RelayMetrics
metrics = RelayMetrics.for_worker(sys.argv[1])
for _ in range(int(sys.argv[2])):
    metrics.message_received(100)
    metrics.delivery("delivered", 0.2)
metrics.session_opened("smtp")
metrics.outbound_connection_opened()
print(os.getpid())
"""


def run_worker(directory: Path, count: int, mode: str) -> int:
    """Run one worker process to completion; return its PID."""
    env = {k: v for k, v in os.environ.items() if k != MULTIPROC_ENV}
    if mode == "environment":
        env |= worker_environment(directory)
    done = subprocess.run(
        [sys.executable, "-c", WORKER, str(directory), str(count), mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return int(done.stdout.strip())


def test_two_worker_processes_are_summed_and_a_dead_ones_live_gauges_vanish(tmp_path: Path):
    """received_total is the sum over both workers; mark_worker_dead drops only live gauges."""
    directory = prepare_multiprocess_dir(tmp_path / "metrics")
    first = run_worker(directory, 7, "environment")
    second = run_worker(directory, 5, "early-import")
    assert first != second
    registry = build_master_registry(directory)
    get = registry.get_sample_value

    assert get("twistedrelay_messages_received_total") == 12.0
    assert get("twistedrelay_received_bytes_total") == 1200.0
    assert get("twistedrelay_deliveries_total", {"result": "delivered"}) == 12.0
    assert get("twistedrelay_delivery_seconds_count") == 12.0
    assert get("twistedrelay_delivery_seconds_bucket", {"le": "0.25"}) == 12.0
    assert get("twistedrelay_smtp_sessions") == 2.0
    assert get("twistedrelay_outbound_connections") == 2.0

    mark_worker_dead(first, directory)

    assert get("twistedrelay_smtp_sessions") == 1.0
    assert get("twistedrelay_outbound_connections") == 1.0
    assert get("twistedrelay_messages_received_total") == 12.0
    assert get("twistedrelay_smtp_sessions_opened_total", {"listener": "smtp"}) == 2.0


def test_a_forked_child_writes_its_values_under_its_own_pid() -> None:
    """The cached PID (no getpid per update) still follows a fork, as prometheus_client's did."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child reports through the pipe)
        os.write(write_end, str(metrics_module._process_id()).encode())
        os._exit(0)
    os.close(write_end)
    try:
        reported = int(os.read(read_end, 64))
    finally:
        os.close(read_end)
        os.waitpid(child, 0)
    assert reported == child
    assert metrics_module._process_id() == os.getpid()
