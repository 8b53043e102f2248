"""One bounded run of the load generator, ``twistedrelay bench send --json``, as a subprocess.

Besides the generator's own report, the harness needs the moment the load began on its own
clock (the start of the end-to-end window). The generator prints a last progress line on
stderr at the instant it finishes; its arrival time minus the report's ``elapsed_seconds``
is when the load began, without counting the generator's start-up (importing Twisted) or
the idle connections it opened first.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from load.procs import start_process, stop_process


@dataclass(frozen=True)
class Scenario:
    """One load shape: message size, recipients over domains, idle connections, rate."""

    name: str
    size_bytes: int
    recipients: int = 1
    domains: int = 1
    hold_idle: int = 0
    #: a fraction of the same system's maximum 1 KiB acceptance rate (0: as fast as it goes)
    rate_fraction: float = 0.0
    description: str = ""


@dataclass
class SendResult:
    """The generator's JSON report, the load's start on the harness's monotonic clock."""

    report: dict[str, Any]
    started_at: float
    exit_status: int | None


def run_send(
    target_port: int,
    scenario: Scenario,
    *,
    directory: Path,
    messages: int,
    duration_seconds: float,
    connections: int,
    rate: float,
    timeout_seconds: float,
    chunking: bool = False,
    command: list[str] | None = None,
) -> SendResult:
    """Run the generator against 127.0.0.1:``target_port`` until done or the hard timeout.

    :param messages: messages in all (ignored when ``duration_seconds`` is set).
    :param rate: messages/s in all (0: as fast as the server accepts).
    :param chunking: send with BDAT where the server offers CHUNKING (``--chunking``).
    :raises RuntimeError: the generator printed no report.
    """
    command = command or [str(Path(sys.executable).with_name("twistedrelay"))]
    bound = (
        ["--duration", str(duration_seconds)] if duration_seconds else ["--messages", str(messages)]
    )
    argv = [
        *command,
        "bench",
        "send",
        "--json",
        "--target",
        f"127.0.0.1:{target_port}",
        "--connections",
        str(connections),
        *bound,
        "--size",
        str(scenario.size_bytes),
        "--recipients",
        str(scenario.recipients),
        "--domains",
        str(scenario.domains),
        "--hold-idle",
        str(scenario.hold_idle),
        "--rate",
        str(rate),
        "--timeout",
        str(timeout_seconds),
        *(["--chunking"] if chunking else []),
    ]
    progress_arrivals: list[float] = []
    stderr_path = directory / f"send-{scenario.name}.err"
    proc = start_process(argv, cwd=directory, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def read_progress() -> None:
        assert proc.stderr is not None
        with open(stderr_path, "wb") as copy:
            for line in proc.stderr:
                progress_arrivals.append(time.monotonic())
                copy.write(line)

    stdout_chunks: list[bytes] = []

    def read_report() -> None:
        assert proc.stdout is not None
        stdout_chunks.append(proc.stdout.read())

    readers = [
        threading.Thread(target=read_progress, name="send-progress", daemon=True),
        threading.Thread(target=read_report, name="send-report", daemon=True),
    ]
    for reader in readers:
        reader.start()
    try:
        # The generator stops itself at its hard timeout; allow it time to start and report.
        proc.wait(timeout_seconds + 60.0)
        exited_at = time.monotonic()
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"bench send did not stop after {timeout_seconds + 60} s") from None
    finally:
        if proc.poll() is None:
            stop_process(proc, 5.0)
    for reader in readers:
        reader.join(5.0)
    stdout = b"".join(stdout_chunks)
    lines = [line for line in stdout.decode().splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"bench send printed no report: {stderr_path.read_text()[-2000:]}")
    report = json.loads(lines[-1])
    finished_at = progress_arrivals[-1] if progress_arrivals else exited_at
    return SendResult(report, finished_at - report["elapsed_seconds"], proc.returncode)
