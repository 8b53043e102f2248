"""The load harness benchmarks/run.py, in a tiny run: one scenario, the relay only, 50 messages.

Checks that a run measures what the README promises (acceptance, end to end, delivery
delay from the relay's Postfix-style log, CPU, per-process RSS), writes its outputs, and
leaves no process behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.system.harness import wait_until

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]

ROOT = Path(__file__).resolve().parents[2]
HARNESS = ROOT / "benchmarks" / "run.py"
MESSAGES = 50
RUN_TIMEOUT_SECONDS = 40.0


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            command = Path(f"/proc/{entry}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if text.encode() in command:
            found.append(int(entry))
    return found


@pytest.mark.timeout(RUN_TIMEOUT_SECONDS + 20)
def test_harness_measures_a_small_relay_run_and_cleans_up(tmp_path: Path) -> None:
    """A 1k run against one relay worker reports complete figures and stops every process."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(HARNESS),
            "--scenarios",
            "1k",
            "--messages",
            str(MESSAGES),
            "--workers",
            "1",
            "--no-postfix",
            "--keep",
            "--send-timeout",
            "20",
            "--drain-timeout",
            "15",
            "--out",
            str(out),
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        # SIGTERM lets the harness stop what it started; then nothing of it may remain.
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=10)
        pytest.fail(f"the harness took more than {RUN_TIMEOUT_SECONDS} s")
    errors = stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, errors

    kept = re.search(r"run directory kept: (\S+)", errors)
    assert kept, errors
    run_directory = kept.group(1)
    try:
        # Every process the harness started names its run directory on its command line.
        wait_until(
            lambda: not processes_mentioning(run_directory), 10.0, f"no process of {run_directory}"
        )
    finally:
        for pid in processes_mentioning(run_directory):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(run_directory, ignore_errors=True)

    document = json.loads((out / "results.json").read_text())
    [result] = document["results"]
    assert (result["scenario"], result["system"]) == ("1k", "relay-1w")
    acceptance, e2e = result["acceptance"], result["end_to_end"]
    assert acceptance["messages_accepted"] == MESSAGES
    assert acceptance["messages_per_second"] > 0
    assert 0 < acceptance["latency_ms"]["p50"] <= acceptance["latency_ms"]["p99"]
    assert e2e["complete"] and e2e["recipients_delivered"] == MESSAGES
    # The end-to-end window starts with the load, so it cannot beat acceptance (the slack
    # is the sink's 50 ms reporting interval on a run this short).
    assert 0 < e2e["messages_per_second"] <= acceptance["messages_per_second"] * 1.5
    # One delay per delivered recipient, parsed from the relay's Postfix-style log lines.
    assert result["delivery_delay"]["count"] == MESSAGES
    assert result["relay_metrics"]["deliveries"]["delivered"] == MESSAGES
    assert result["cpu"]["seconds"] > 0
    roles = result["memory"]["peak_rss_mb_by_role"]
    assert set(roles) == {"master", "worker 0"} and all(mb > 5 for mb in roles.values())

    table = (out / "results.md").read_text()
    assert "| 1k | twistedrelay, 1 worker |" in table
    assert stdout.decode().startswith("## Machine")
