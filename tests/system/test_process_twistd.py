"""The relay under twistd with two real workers: start, replace a killed worker, reload, stop.

Runs ``twistd -n twistedrelay --config relay.toml`` (the real payload from app.py) on a
kernel-chosen loopback port; the process tree is checked through /proc and cleaned up by PID.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]

TWISTD = str(Path(sys.executable).parent / "twistd")


def children_of(pid: int) -> set[int]:
    try:
        return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except FileNotFoundError:
        return set()


def is_running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def test_twistd_relay_supervises_two_workers_and_stops_cleanly(tmp_path) -> None:
    """Two workers greet over SMTP; a killed one is replaced; SIGHUP; SIGTERM exits 0, no orphan."""
    config = tmp_path / "relay.toml"
    config.write_text(
        'hostname = "relay.example.test"\n[smtp]\nlisten = ["127.0.0.1:0"]\n'
        '[queue]\ndirectory = "queue"\n[workers]\ncount = 2\nshutdown_timeout = 10\n'
        '[metrics]\nlisten = "127.0.0.1:0"\n'
    )
    lines: list[str] = []
    proc = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "twistedrelay", "--config", str(config)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    seen_pids: set[int] = set()

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    threading.Thread(target=read, daemon=True).start()

    def wait_for(pattern: str, after: int = 0, timeout: float = 20.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in lines[after:]:
                if match := re.search(pattern, line):
                    return match
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in the log:\n" + "\n".join(lines))

    def serving_workers(after: int = 0) -> dict[int, int]:
        """slot -> pid of workers started (and payload running) after line ``after``."""
        pids = {}
        for slot in (0, 1):
            pid = int(wait_for(rf"worker {slot} started as pid (\d+)", after).group(1))
            wait_for(rf"worker {slot}: .*worker {slot} started$", after)
            pids[slot] = pid
        seen_pids.update(pids.values())
        return pids

    try:
        port = int(wait_for(r"listening for smtp on 127\.0\.0\.1:(\d+)").group(1))
        workers = serving_workers()
        assert set(workers.values()) <= children_of(proc.pid)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            assert conn.recv(512).startswith(b"220 relay.example.test")

        mark = len(lines)
        os.kill(workers[1], signal.SIGKILL)
        replacement = int(wait_for(r"worker 1 started as pid (\d+)", mark).group(1))
        seen_pids.add(replacement)
        assert replacement != workers[1]
        wait_for(r"worker 1: .*worker 1 started$", mark)

        mark = len(lines)
        config.write_text(config.read_text().replace("count = 2", "count = two"))
        proc.send_signal(signal.SIGHUP)
        wait_for(r"refusing the new config, keeping the old one", mark)
        assert proc.poll() is None

        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, "\n".join(lines)
        assert time.monotonic() - started < 30
        for pid in seen_pids:
            assert not is_running(pid), f"worker {pid} outlived the master"
    finally:
        for pid in [proc.pid, *seen_pids]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(5)
