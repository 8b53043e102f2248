"""Queue IDs with real processes: two processes never make the same ID."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# Each child waits for the same start time, then makes IDs for a fixed span, so the two
# generate at the same moments.
ID_CHILD = r"""
import sys, time
from twistedrelay.queue.ids import QueueIdGenerator
start, span = float(sys.argv[1]), float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
generator = QueueIdGenerator()
ids = []
while time.time() < start + span:
    ids.extend(generator.new_id() for _ in range(100))
sys.stdout.write("\n".join(ids))
"""


def test_queue_ids_are_unique_across_two_concurrent_processes():
    """Two processes making IDs in the same instants never produce the same ID."""
    start = time.time() + 1.0
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", ID_CHILD, repr(start), "0.3"],
            stdout=subprocess.PIPE,
            env=env,
        )
        for _ in range(2)
    ]
    outputs = []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=30)[0].decode().split())
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    first, second = outputs
    assert len(first) > 1000 and len(second) > 1000
    assert first == sorted(first) and second == sorted(second)
    assert len(set(first)) == len(first) and len(set(second)) == len(second)
    assert not set(first) & set(second)
    # They did overlap in time: each process's ID range interleaves with the other's.
    assert first[0] < second[-1] and second[0] < first[-1]
