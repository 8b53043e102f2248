"""A worker process on its own: the control pipe, SIGHUP, its exit statuses.

The test plays the master: it binds a loopback socket, passes it to
``python -m twistedrelay.process.worker`` and holds the worker's stdin pipe.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

PAYLOADS = "twistedrelay.testing.process_payloads"


class Worker:
    """A worker subprocess with its output collected by a thread."""

    def __init__(self, config: Path, payload: str = "pid_banner_payload") -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.port = self.listener.getsockname()[1]
        fd = self.listener.fileno()
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "twistedrelay.process.worker", "--config", str(config),
                "--slot", "3", "--payload", f"{PAYLOADS}:{payload}", "--fds", f"smtp={fd}",
            ],
            pass_fds=[fd],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def wait_for(self, text: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no {text!r} in the worker's log:\n" + "\n".join(self.lines))

    def banner(self) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as conn:
            return conn.recv(256)

    def close(self) -> None:
        try:
            os.kill(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(5)
        self.listener.close()


def write_config(path: Path, hostname: str = "one.example.test") -> Path:
    path.write_text(
        f'hostname = "{hostname}"\n[workers]\nshutdown_timeout = 2\n'
        f'[queue]\ndirectory = "{path.parent / "queue"}"\n'
    )
    return path


@pytest.fixture
def start_worker(tmp_path) -> Iterator:  # type: ignore[type-arg]
    workers: list[Worker] = []

    def start(payload: str = "pid_banner_payload", config: Path | None = None) -> Worker:
        workers.append(Worker(config or write_config(tmp_path / "relay.toml"), payload))
        return workers[-1]

    try:
        yield start
    finally:
        for worker in workers:
            worker.close()


def test_worker_serves_on_the_inherited_socket(start_worker) -> None:
    """The payload adopts the passed fd: a connection gets the stand-in's banner."""
    worker = start_worker()
    worker.wait_for("worker 3 started")
    assert worker.banner() == f"220 one.example.test pid={worker.proc.pid} slot=3\r\n".encode()


def test_drain_word_stops_the_worker_with_status_zero(start_worker) -> None:
    """ "drain" on stdin drains the payload and exits 0."""
    worker = start_worker()
    worker.wait_for("worker 3 started")
    worker.send(b"drain\n")
    assert worker.proc.wait(10) == 0
    worker.wait_for("stopping: drain requested")
    worker.wait_for("worker 3 stopped")


def test_end_of_stdin_means_the_master_is_gone(start_worker) -> None:
    """When the control pipe closes the worker exits by itself (no orphan)."""
    worker = start_worker()
    worker.wait_for("worker 3 started")
    assert worker.proc.stdin is not None
    worker.proc.stdin.close()
    assert worker.proc.wait(10) == 0
    worker.wait_for("master gone")


def test_sigterm_stops_the_worker_with_status_zero(start_worker) -> None:
    """SIGTERM drains the payload and exits 0."""
    worker = start_worker()
    worker.wait_for("worker 3 started")
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(10) == 0
    worker.wait_for("worker 3 stopped")


def test_reload_word_applies_a_changed_config(start_worker, tmp_path) -> None:
    """ "reload" re-reads the file and gives the payload the new config."""
    worker = start_worker()
    worker.wait_for("worker 3 started")
    write_config(tmp_path / "relay.toml", hostname="two.example.test")
    worker.send(b"reload\n")
    worker.wait_for("worker 3 reloaded")
    assert worker.banner().startswith(b"220 two.example.test ")


def test_sighup_to_a_worker_reloads_it_instead_of_killing_it(start_worker, tmp_path) -> None:
    """A stray SIGHUP (e.g. to the whole process group) is a reload, not a death."""
    worker = start_worker()
    worker.wait_for("worker 3 started")
    write_config(tmp_path / "relay.toml", hostname="two.example.test")
    worker.proc.send_signal(signal.SIGHUP)
    worker.wait_for("worker 3 reloaded")
    assert worker.proc.poll() is None


def test_reload_of_a_bad_config_keeps_the_old_one(start_worker, tmp_path) -> None:
    """A broken file is refused with a log line; the worker keeps serving the old config."""
    worker = start_worker()
    worker.wait_for("worker 3 started")
    (tmp_path / "relay.toml").write_text('hostname = "two.example.test"\n[nonsense]\n')
    worker.send(b"bogus\nreload\n")
    worker.wait_for("refusing the new config, keeping the old one")
    worker.wait_for("ignoring unknown control word b'bogus'")
    assert worker.banner().startswith(b"220 one.example.test ")


def test_payload_that_cannot_be_built_exits_one(start_worker) -> None:
    """A failing payload exits 1 with its traceback logged, for the master to back off."""
    worker = start_worker("crashing_payload")
    assert worker.proc.wait(10) == 1
    worker.wait_for("stand-in payload failing on purpose")


def test_payload_that_fails_with_threads_running_still_exits_one(start_worker) -> None:
    """Threads a half-built payload left running do not keep the worker alive."""
    worker = start_worker("half_built_payload")
    assert worker.proc.wait(10) == 1
    worker.wait_for("stand-in payload failing after starting threads")


def test_unusable_config_exits_two(start_worker, tmp_path) -> None:
    """A config the worker cannot load is reported and exits 2."""
    config = tmp_path / "broken.toml"
    config.write_text("[smtp]\nlisten = 25\n")
    worker = start_worker(config=config)
    assert worker.proc.wait(10) == 2
    worker.wait_for("smtp.listen")


def test_json_log_format_writes_one_json_object_per_line(start_worker, tmp_path) -> None:
    """With [log] format = "json" every line the worker writes is a JSON object."""
    config = write_config(tmp_path / "relay.toml")
    config.write_text(config.read_text() + '[log]\nformat = "json"\n')
    worker = start_worker(config=config)
    worker.wait_for("worker 3 started")
    records = [json.loads(line) for line in worker.lines]
    assert {"level", "namespace", "text"} <= set(records[-1])
