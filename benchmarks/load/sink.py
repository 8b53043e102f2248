"""The sink every system under test delivers to: ``twistedrelay bench sink`` as a subprocess.

One sink serves a whole harness run. It prints its JSON counters on stdout every
``REPORT_INTERVAL_SECONDS``; a reader thread stamps each line with the harness's clock on
arrival, so "the sink has every message" is known to within one interval, for the relay
and for Postfix alike. Counters are cumulative: a scenario waits for its baseline plus
what it sent.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from load.procs import start_process, stop_process, wait_until

REPORT_INTERVAL_SECONDS = 0.05
LISTENING_RE = re.compile(rb"listening on 127\.0\.0\.1:(\d+)")


class SinkRunner:
    """``twistedrelay bench sink`` on a kernel-chosen loopback port.

    :param directory: its stats file and captured stderr go here.
    :param command: the command that runs ``twistedrelay`` (default: next to this Python).
    """

    def __init__(self, directory: Path, command: list[str] | None = None) -> None:
        self.directory = directory
        self.command = command or [str(Path(sys.executable).with_name("twistedrelay"))]
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._latest: dict[str, Any] = {}
        self._latest_at = 0.0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.final: dict[str, Any] = {}

    def start(self, timeout_seconds: float = 20.0) -> None:
        """Start the sink and wait until it listens.

        :raises RuntimeError: it exited or did not listen in time.
        """
        self.stderr_path = self.directory / "sink.err"
        with open(self.stderr_path, "wb") as stderr:
            self.proc = start_process(
                [
                    *self.command,
                    "bench",
                    "sink",
                    "--listen",
                    "127.0.0.1:0",
                    "--no-address-rules",
                    "--report-interval",
                    str(REPORT_INTERVAL_SECONDS),
                    "--stats-file",
                    str(self.directory / "sink-stats.json"),
                ],
                cwd=self.directory,
                stdout=subprocess.PIPE,
                stderr=stderr,
            )
        threading.Thread(target=self._read_reports, name="sink-reader", daemon=True).start()

        def bound() -> int:
            match = LISTENING_RE.search(self.stderr_path.read_bytes())
            if match is None and self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the sink exited: {self.stderr_path.read_text()}")
            return int(match.group(1)) if match else 0

        self.port = wait_until(bound, timeout_seconds) or 0
        if not self.port:
            raise RuntimeError(f"the sink did not listen within {timeout_seconds} s")

    def _read_reports(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            arrived = time.monotonic()
            try:
                report = json.loads(line)
            except ValueError:
                continue
            with self._changed:
                self._latest, self._latest_at = report, arrived
                self._changed.notify_all()

    def counters(self) -> dict[str, Any]:
        """The latest counters the sink reported (empty before its first report)."""
        with self._lock:
            return dict(self._latest)

    def wait_for_recipients(self, count: int, timeout_seconds: float) -> float | None:
        """Wait until the sink has accepted ``count`` recipients in all.

        :returns: the monotonic time of the first report that showed them, or None on timeout.
        """
        deadline = time.monotonic() + timeout_seconds
        with self._changed:
            while self._latest.get("recipients", 0) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc is not None and self.proc.poll() is not None):
                    return None
                self._changed.wait(min(remaining, 0.5))
            return self._latest_at

    def stop(self) -> None:
        """SIGTERM by PID (bounded), keeping the final counters."""
        if self.proc is not None:
            stop_process(self.proc, 10.0)
            self.final = self.counters()
