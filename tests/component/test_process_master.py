"""The master and its workers as real processes, with a stand-in payload.

Each test runs ``python -m twistedrelay.process`` (the MasterService without twistd) as a
subprocess on a loopback port chosen by the kernel, with a payload that answers each
connection with "220 <hostname> pid=<pid> slot=<slot>". Every process a test starts is
killed by PID in a finally block.
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
from collections.abc import Iterator
from pathlib import Path

import pytest

from twistedrelay.queue.ids import QueueIdGenerator
from twistedrelay.testing.waiting import poll_until as wait_until

PAYLOADS = "twistedrelay.testing.process_payloads"
BANNER_RE = re.compile(rb"^220 (\S+) pid=(\d+) slot=(\d+)\r\n$")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def write_config(
    path: Path, hostname: str = "one.example.test", count: int = 2, shutdown_timeout: float = 5
) -> Path:
    """Write a relay.toml listening on a free loopback port with its queue next to it."""
    path.write_text(
        f'hostname = "{hostname}"\n'
        '[smtp]\nlisten = ["127.0.0.1:0"]\n'
        f'[queue]\ndirectory = "{path.parent / "queue"}"\n'
        f"[workers]\ncount = {count}\nshutdown_timeout = {shutdown_timeout}\n"
        '[metrics]\nlisten = ""\n'
    )
    return path


def process_state(pid: int) -> str | None:
    """The one-letter state of a process ("R", "S", "Z", …), None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return stat.rpartition(")")[2].split()[0]


def is_running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (a reaped or exited-and-orphaned process)."""
    return process_state(pid) not in (None, "Z")


def children_of(pid: int) -> set[int]:
    """The live child processes of ``pid``, from /proc (zombies included)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return set()
    return {int(p) for p in text.split()}


class MasterProcess:
    """A running ``python -m twistedrelay.process``, with its log collected by a thread."""

    def __init__(self, config: Path, payload: str = "pid_banner_payload") -> None:
        self.config = config
        self.lines: list[str] = []
        self.known_pids: set[int] = set()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "twistedrelay.process",
                "--config",
                str(config),
                "--payload",
                f"{PAYLOADS}:{payload}",
            ],
            cwd=config.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def log(self) -> str:
        """Everything logged so far (for assertion messages)."""
        return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = 10.0, after: int = 0) -> re.Match[str]:
        """The first log line (from index ``after``) matching ``pattern``."""
        regex = re.compile(pattern)

        def find() -> re.Match[str] | None:
            for line in self.lines[after:]:
                match = regex.search(line)
                if match:
                    return match
            if self.proc.poll() is not None and not self._reader.is_alive():
                raise AssertionError(f"master exited; log:\n{self.log()}")
            return None

        try:
            return wait_until(find, timeout, f"a log line matching {pattern!r}")  # type: ignore[no-any-return]
        except AssertionError as e:
            raise AssertionError(f"{e}; log:\n{self.log()}") from None

    def port(self) -> int:
        """The SMTP port the master bound (it logs it)."""
        return int(self.wait_for_line(r"listening for smtp on 127\.0\.0\.1:(\d+)").group(1))

    def workers(self, count: int, timeout: float = 10.0) -> dict[int, int]:
        """Wait until ``count`` workers run their payload; return slot -> pid."""

        def ready() -> dict[int, int] | None:
            spawned: dict[int, tuple[int, int]] = {}  # slot -> (pid, line index)
            serving: dict[int, int] = {}
            for index, line in enumerate(list(self.lines)):
                if match := re.search(r"worker (\d+) started as pid (\d+)", line):
                    spawned[int(match.group(1))] = (int(match.group(2)), index)
                elif match := re.search(r"worker (\d+): .*worker \1 started$", line):
                    slot = int(match.group(1))
                    if slot in spawned and spawned[slot][1] < index:
                        serving[slot] = spawned[slot][0]
            self.known_pids.update(pid for pid, _ in spawned.values())
            children = children_of(self.proc.pid)
            live = {
                slot: pid
                for slot, pid in serving.items()
                if pid in children and spawned[slot][0] == pid
            }
            return live if len(live) == count else None

        return wait_until(ready, timeout, f"{count} workers")  # type: ignore[no-any-return]

    def kill_all(self) -> None:
        """SIGKILL the master and every worker it ever reported (cleanup by PID)."""
        for pid in [self.proc.pid, *self.known_pids, *children_of(self.proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(5)


@pytest.fixture
def start_master() -> Iterator:  # type: ignore[type-arg]
    """Start masters for a test and kill whatever is left of them afterwards."""
    masters: list[MasterProcess] = []

    def start(config: Path, payload: str = "pid_banner_payload") -> MasterProcess:
        masters.append(MasterProcess(config, payload))
        return masters[-1]

    try:
        yield start
    finally:
        for master in masters:
            master.kill_all()


def read_banner(port: int) -> tuple[str, int, int]:
    """Connect, read the stand-in's banner; return (hostname, pid, slot)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        data = b""
        while chunk := conn.recv(256):
            data += chunk
    match = BANNER_RE.match(data)
    assert match, f"unexpected banner {data!r}"
    return match.group(1).decode(), int(match.group(2)), int(match.group(3))


def test_both_workers_accept_connections_on_the_shared_socket(tmp_path, start_master) -> None:
    """Two workers share one listening socket and the kernel hands connections to both."""
    master = start_master(write_config(tmp_path / "relay.toml"))
    port = master.port()
    workers = master.workers(2)
    seen: set[int] = set()
    for _ in range(400):
        seen.add(read_banner(port)[1])
        if seen == set(workers.values()):
            break
    assert seen == set(workers.values())


def test_killed_worker_is_replaced_and_its_claims_are_returned(tmp_path, start_master) -> None:
    """SIGKILL of a worker: its active/ entries go back to incoming, its spare files are
    removed, and a new pid takes the slot."""
    master = start_master(write_config(tmp_path / "relay.toml"))
    port = master.port()
    old = master.workers(2)
    active = tmp_path / "queue" / "active" / "w0"
    active.mkdir(parents=True, exist_ok=True)
    ids = QueueIdGenerator()
    claimed = [ids.new_id() for _ in range(3)]
    for queue_id in claimed:
        (active / queue_id).write_bytes(b"stand-in entry")
    tmp = tmp_path / "queue" / "tmp"
    dead_spare, live_spare = tmp / f"spare.{claimed[0]}.w0", tmp / f"spare.{claimed[1]}.w1"
    dead_spare.write_bytes(b"delivered")
    live_spare.write_bytes(b"delivered")

    os.kill(old[0], signal.SIGKILL)
    new = wait_until(
        lambda: (w := master.workers(2)) and w[0] != old[0] and w, 10, "a replacement worker"
    )

    assert new[1] == old[1]
    assert sorted(p.name for p in (tmp_path / "queue" / "incoming").iterdir()) == claimed
    assert list(active.iterdir()) == []
    assert not dead_spare.exists(), "a dead worker's spare files are removed"
    assert live_spare.exists(), "a live worker's spare files are its own"
    assert process_state(old[0]) is None, "the master must reap its dead worker (no zombie)"
    assert read_banner(port)[1] in new.values()


def test_start_up_removes_every_spare_file_but_not_a_fresh_tmp_file(tmp_path, start_master) -> None:
    """No worker runs before start-up: every spare is unused, a fresh tmp file may not be."""
    config = write_config(tmp_path / "relay.toml")
    tmp = tmp_path / "queue" / "tmp"
    tmp.mkdir(parents=True)
    queue_id = QueueIdGenerator().new_id()
    spares = [tmp / f"spare.{queue_id}.w0", tmp / f"spare.{queue_id}.w7"]
    for spare in spares:
        spare.write_bytes(b"delivered")
    fresh = tmp / queue_id
    fresh.write_bytes(b"a session's file")

    master = start_master(config)
    master.workers(2)

    assert not any(spare.exists() for spare in spares)
    assert fresh.exists()


def test_sigterm_stops_master_and_workers_with_status_zero(tmp_path, start_master) -> None:
    """SIGTERM to the master drains the workers and exits 0 quickly, leaving no process."""
    master = start_master(write_config(tmp_path / "relay.toml"))
    master.port()
    workers = master.workers(2)
    started = time.monotonic()

    master.proc.send_signal(signal.SIGTERM)
    status = master.proc.wait(30)

    assert status == 0, master.log()
    assert time.monotonic() - started < 10
    for pid in workers.values():
        assert not is_running(pid), f"worker {pid} outlived the master"
    assert "worker 0 stopped" in master.log() and "worker 1 stopped" in master.log()


def test_worker_stuck_in_its_drain_is_killed_within_the_bound(tmp_path, start_master) -> None:
    """A worker that blocks while draining is SIGKILLed after shutdown_timeout plus a grace."""
    master = start_master(
        write_config(tmp_path / "relay.toml", count=1, shutdown_timeout=1), "blocking_payload"
    )
    master.port()
    (pid,) = master.workers(1).values()
    started = time.monotonic()

    master.proc.send_signal(signal.SIGTERM)
    status = master.proc.wait(30)

    assert status == 0, master.log()
    assert 1 <= time.monotonic() - started < 8
    assert not is_running(pid)
    assert "SIGKILL" in master.log()


def test_drain_that_never_finishes_is_cut_short_by_the_worker(tmp_path, start_master) -> None:
    """A payload whose stopService never fires: the worker gives up after shutdown_timeout."""
    master = start_master(
        write_config(tmp_path / "relay.toml", count=1, shutdown_timeout=1), "stubborn_payload"
    )
    master.port()
    master.workers(1)

    master.proc.send_signal(signal.SIGTERM)

    assert master.proc.wait(30) == 0
    assert "drain did not finish within 1.0 s" in master.log()
    assert "SIGKILL" not in master.log()


def test_killed_master_leaves_no_orphan_workers(tmp_path, start_master) -> None:
    """kill -9 of the master: its workers notice and exit by themselves within seconds."""
    master = start_master(write_config(tmp_path / "relay.toml"))
    master.port()
    workers = master.workers(2)

    master.proc.kill()
    master.proc.wait(5)

    wait_until(
        lambda: not any(is_running(p) for p in workers.values()), 5, "the orphaned workers to exit"
    )


def test_sighup_with_a_bad_config_is_refused_and_the_relay_keeps_serving(
    tmp_path, start_master
) -> None:
    """A SIGHUP after a broken edit logs a refusal; workers keep the old config and serve."""
    config = write_config(tmp_path / "relay.toml")
    master = start_master(config)
    port = master.port()
    workers = master.workers(2)
    config.write_text(config.read_text() + "[smtp.oops]\n")

    mark = len(master.lines)
    master.proc.send_signal(signal.SIGHUP)

    master.wait_for_line(r"refusing the new config, keeping the old one: .*relay\.toml", after=mark)
    assert master.proc.poll() is None
    assert master.workers(2) == workers
    assert read_banner(port)[0] == "one.example.test"


def test_sighup_with_a_good_config_reloads_every_worker(tmp_path, start_master) -> None:
    """A SIGHUP after a valid edit reaches every worker, which applies the new config."""
    config = write_config(tmp_path / "relay.toml")
    master = start_master(config)
    port = master.port()
    workers = master.workers(2)
    write_config(config, hostname="two.example.test")

    mark = len(master.lines)
    master.proc.send_signal(signal.SIGHUP)

    for slot in workers:
        master.wait_for_line(rf"worker {slot}: .*worker {slot} reloaded", after=mark)
    assert master.workers(2) == workers, "a reload must not restart workers"
    assert {read_banner(port)[0] for _ in range(10)} == {"two.example.test"}


def test_crash_looping_worker_is_restarted_with_growing_delays(tmp_path, start_master) -> None:
    """A worker that dies at once is restarted after 1 s, then 2 s, …: logged, not spun."""
    master = start_master(write_config(tmp_path / "relay.toml", count=1), "crashing_payload")
    master.wait_for_line(r"crash-looping: next restart in 2 s", timeout=15)
    starts = sum("worker 0 started as pid" in line for line in master.lines)
    assert 2 <= starts <= 3, master.log()
    assert "stand-in payload failing on purpose" in master.log()


def test_address_in_use_is_a_startup_error_naming_it(tmp_path) -> None:
    """A listener that cannot be bound stops start-up with a message naming the address."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path / "relay.toml")
        config.write_text(config.read_text().replace("127.0.0.1:0", f"127.0.0.1:{port}"))
        result = subprocess.run(
            [sys.executable, "-m", "twistedrelay.process", "--config", str(config)],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=30,
        )
    output = result.stdout.decode()
    assert result.returncode == 2
    assert f"cannot start: cannot listen for smtp on 127.0.0.1:{port}" in output
    assert "Traceback" not in output
