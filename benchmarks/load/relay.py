"""The relay under test: ``twistd -n twistedrelay --config relay.toml`` in its own directory.

The generated relay.toml listens on kernel-chosen loopback ports (read back from the log),
keeps its queue in the run's directory, routes every domain to the sink, and otherwise
keeps the defaults an operator gets, fsync included (the queue has no switch to turn it off).
The per-IP session cap is raised because every benchmark client is 127.0.0.1 and the idle
scenario holds 1,000 sessions from it.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from load.procs import ProcStat, start_process, stop_process, wait_until

START_TIMEOUT_SECONDS = 60.0


def relay_config(directory: Path, *, sink_port: int, workers: int) -> str:
    """The relay.toml of one benchmark run."""
    return (
        'hostname = "relay.bench.test"\n'
        "[smtp]\n"
        'listen = ["127.0.0.1:0"]\n'
        "max_connections = 4000\n"
        "max_connections_per_ip = 4000\n"
        "[relay]\n"
        'mynetworks = ["127.0.0.0/8"]\n'
        "[queue]\n"
        f'directory = "{directory / "queue"}"\n'
        "[workers]\n"
        f"count = {workers}\n"
        "shutdown_timeout = 10\n"
        "[metrics]\n"
        'listen = "127.0.0.1:0"\n'
        "[delivery]\n"
        f'routes = {{ "*" = "127.0.0.1:{sink_port}" }}\n'
    )


def relay_role(stat: ProcStat, argv: list[str]) -> str:
    """ "master" or "worker N" (the worker's --slot), for the per-process RSS peaks."""
    if "--slot" in argv:
        index = argv.index("--slot")
        return f"worker {argv[index + 1]}" if index + 1 < len(argv) else "worker"
    return "master"


class RelayInstance:
    """One relay (master + workers) for one scenario.

    :param directory: an empty directory for its config, queue and log.
    :param twistd: the command that runs twistd (default: next to this Python).
    """

    def __init__(
        self, directory: Path, *, sink_port: int, workers: int, twistd: list[str] | None = None
    ) -> None:
        self.directory = directory
        self.workers = workers
        self.config_path = directory / "relay.toml"
        self.config_path.write_text(relay_config(directory, sink_port=sink_port, workers=workers))
        self.log_path = directory / "twistd.log"
        self.twistd = twistd or [str(Path(sys.executable).with_name("twistd"))]
        self.proc: subprocess.Popen[bytes] | None = None
        self.smtp_port = 0
        self.metrics_port = 0

    @property
    def pid(self) -> int:
        """The master's PID (0 before start)."""
        return self.proc.pid if self.proc is not None else 0

    def log(self) -> str:
        """What twistd logged so far."""
        return self.log_path.read_text("utf-8", "replace") if self.log_path.exists() else ""

    def start(self) -> None:
        """Start twistd and wait until every worker runs and SMTP greets.

        :raises RuntimeError: it exited or was not ready within START_TIMEOUT_SECONDS.
        """
        with open(self.directory / "twistd.out", "wb") as output:
            self.proc = start_process(
                [
                    *self.twistd,
                    "--nodaemon",
                    "--pidfile",
                    str(self.directory / "twistd.pid"),
                    "--logfile",
                    str(self.log_path),
                    "twistedrelay",
                    "--config",
                    str(self.config_path),
                ],
                cwd=self.directory,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the relay exited ({self.proc.returncode}):\n{self.log()}")
            text = self.log()
            smtp = re.search(r"listening for smtp on 127\.0\.0\.1:(\d+)", text)
            metrics = re.search(r"listening for metrics on 127\.0\.0\.1:(\d+)", text)
            started = all(
                re.search(rf"worker {slot} started", text) for slot in range(self.workers)
            )
            if smtp and metrics and started:
                self.smtp_port, self.metrics_port = int(smtp.group(1)), int(metrics.group(1))
                return self._greets()
            return False

        if not wait_until(ready, max(0.0, deadline - time.monotonic()), 0.1):
            raise RuntimeError(
                f"the relay was not ready in {START_TIMEOUT_SECONDS} s:\n{self.log()}"
            )

    def _greets(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.smtp_port), timeout=2) as conn:
                return conn.recv(512).startswith(b"220 ")
        except OSError:
            return False

    def metrics_text(self) -> str:
        """The relay's /metrics page ("" when it cannot be fetched)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        # No proxy: the relay is on loopback, whatever http_proxy says.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(url, timeout=10) as response:
                return str(response.read().decode("utf-8", "replace"))
        except OSError:
            return ""

    def stop(self) -> int | None:
        """SIGTERM the master by PID (bounded wait), then SIGKILL whatever is left of its group."""
        if self.proc is None:
            return None
        return stop_process(self.proc, 30.0)
