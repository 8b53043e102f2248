"""System-test harness: the relay as operators run it, ``twistd -n twistedrelay``, and a sink.

Each relay is a real ``twistd`` subprocess in its own process group (its workers inherit
the group), configured by a relay.toml written into the test's tmp_path, logging to a file
there. Listening ports are chosen by the kernel (``127.0.0.1:0``) and read back from the
log, so two tests never race for a port. The sink is ``twistedrelay bench sink`` as a
subprocess saving every message it accepts into a directory.

Every wait is bounded by a deadline. Teardown stops what a test started by PID: SIGTERM,
a bounded wait, then SIGKILL to the whole process group, and it fails the test if any
process of the group is still running afterwards.
"""

from __future__ import annotations

import email.policy
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

from twistedrelay.testing.waiting import poll_until as wait_until  # re-exported to the tests

#: twistd is installed next to the interpreter running the tests (the project's venv).
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
QUEUED_RE = re.compile(r"queued as ([0-9A-F]{20})")
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 20.0


def closed_port() -> int:
    """A loopback port with nothing listening on it (connections to it are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def group_members(pgid: int) -> list[tuple[int, str]]:
    """(pid, state) of every process in process group ``pgid``, read from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = stat.rpartition(")")[2].split()
        # After the command name: state, ppid, pgrp (proc(5)).
        if int(fields[2]) == pgid:
            members.append((int(entry), fields[0]))
    return members


def running_members(pgid: int) -> list[int]:
    """The processes of a group that still run (zombies are waiting for a reaper, not running)."""
    return [pid for pid, state in group_members(pgid) if state not in ("Z", "X")]


def write_relay_config(
    directory: Path,
    *,
    route: str,
    queue: Path | None = None,
    workers: int = 2,
    extra: str = "",
    name: str = "relay.toml",
) -> Path:
    """Write a relay.toml for a system test: loopback listeners, every domain routed to ``route``.

    :param route: the next hop for ``"*"``, e.g. ``127.0.0.1:2600`` (a sink).
    :param queue: the queue directory (default: ``directory/queue``).
    :param extra: more TOML appended at the end (whole tables).
    """
    queue = queue or directory / "queue"
    path = directory / name
    path.write_text(
        'hostname = "relay.example.test"\n'
        "[smtp]\n"
        'listen = ["127.0.0.1:0"]\n'
        "[relay]\n"
        'mynetworks = ["127.0.0.0/8"]\n'
        "[queue]\n"
        f'directory = "{queue}"\n'
        "[workers]\n"
        f"count = {workers}\n"
        "shutdown_timeout = 5\n"
        "[metrics]\n"
        'listen = "127.0.0.1:0"\n'
        "[delivery]\n"
        f'routes = {{ "*" = "{route}" }}\n'
        "minimal_backoff = 1\n"
        "maximal_backoff = 2\n"
        "queue_scan_interval = 0.5\n"
        "connect_timeout = 5\n" + extra
    )
    return path


class RelayProcess:
    """One ``twistd -n twistedrelay --config FILE`` in its own process group.

    :param config: the relay.toml to run.
    :param run_directory: cwd of twistd; its log, pid file and captured output go here.
    :param twistd: the command that runs twistd (default: the project venv's script).
    :param environment: the relay's environment (default: this process's).
    """

    def __init__(
        self,
        config: Path,
        run_directory: Path,
        twistd: Sequence[str] = (TWISTD,),
        environment: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        run_directory.mkdir(parents=True, exist_ok=True)
        self.log_path = run_directory / "twistd.log"
        self.output_path = run_directory / "twistd.out"
        with open(self.output_path, "wb") as output:
            self.proc = subprocess.Popen(
                [
                    *twistd,
                    "--nodaemon",
                    "--pidfile",
                    str(run_directory / "twistd.pid"),
                    "--logfile",
                    str(self.log_path),
                    "twistedrelay",
                    "--config",
                    str(config),
                ],
                cwd=run_directory,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pgid = self.proc.pid  # a new session makes the master its group's leader
        self.smtp_port = 0
        self.metrics_port = 0

    def log(self) -> str:
        """Everything twistd logged so far, plus what it wrote to stdout/stderr."""
        # twistd rotates its log file every 1 MB: twistd.log.N (the highest N is the oldest).
        rotated = sorted(
            (
                p
                for p in self.log_path.parent.glob(self.log_path.name + ".*")
                if p.suffix[1:].isdigit()
            ),
            key=lambda path: -int(path.suffix[1:]),
        )
        parts = [path.read_text("utf-8", "replace") for path in rotated]
        if self.log_path.exists():
            parts.append(self.log_path.read_text("utf-8", "replace"))
        text = "".join(parts)
        output = self.output_path.read_text("utf-8", "replace")
        return text + ("\n--- stdout/stderr ---\n" + output if output else "")

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """The first match of ``pattern`` in the log; fails if the master exits first."""
        regex = re.compile(pattern)

        def find() -> re.Match[str] | None:
            match = regex.search(self.log())
            if match is None and self.proc.poll() is not None:
                raise AssertionError(f"the relay exited ({self.proc.returncode}):\n{self.log()}")
            return match

        try:
            return wait_until(find, timeout, f"{pattern!r} in the relay's log")  # type: ignore[no-any-return]
        except AssertionError as error:
            if "timed out" in str(error):
                raise AssertionError(f"{error}; log:\n{self.log()}") from None
            raise

    def wait_ready(self, workers: int, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Wait until the ports are bound, ``workers`` workers started and SMTP says 220."""
        deadline = time.monotonic() + timeout
        self.smtp_port = int(
            self.wait_for_log(r"listening for smtp on 127\.0\.0\.1:(\d+)", timeout).group(1)
        )
        metrics = re.search(r"listening for metrics on 127\.0\.0\.1:(\d+)", self.log())
        self.metrics_port = int(metrics.group(1)) if metrics else 0
        for slot in range(workers):
            remaining = max(0.1, deadline - time.monotonic())
            # Text log: "worker N: … worker N started"; [log] format = "json": the master's
            # re-emitted object carries "worker": N, "text": "worker N started".
            text_form = rf"worker {slot}: .*worker {slot} started"
            json_form = rf'"worker": {slot}, "text": "worker {slot} started"'
            self.wait_for_log(f"{text_form}|{json_form}", remaining)

        def greets() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.smtp_port), timeout=2) as conn:
                    return conn.recv(512).startswith(b"220 ")
            except OSError:
                return False

        wait_until(greets, max(0.1, deadline - time.monotonic()), "an SMTP greeting")

    def terminate(self, timeout: float = STOP_TIMEOUT_SECONDS) -> int | None:
        """SIGTERM the master by PID and wait (bounded) for it to exit; its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill_group(self) -> None:
        """SIGKILL the master and every worker at once (the whole process group)."""
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(STOP_TIMEOUT_SECONDS)

    def wait_group_gone(self, timeout: float = 10.0) -> None:
        """Fail unless every process of the group has stopped running within ``timeout``."""
        wait_until(
            lambda: not running_members(self.pgid),
            timeout,
            f"processes {running_members(self.pgid)} of group {self.pgid} to exit",
        )

    def cleanup(self) -> None:
        """Stop by PID: SIGTERM, bounded wait, then SIGKILL of the group; nothing may be left."""
        if self.proc.poll() is None and self.terminate() is None:
            self.kill_group()
        if running_members(self.pgid):
            # The master is gone but a worker outlived it: an orphan. Kill it, then report.
            left = running_members(self.pgid)
            self.kill_group()
            raise AssertionError(f"processes {left} outlived the relay's master")
        self.wait_group_gone()


class SinkProcess:
    """``python -m twistedrelay.bench.sink`` on a kernel-chosen loopback port, saving messages.

    :param directory: the save directory and the sink's captured output live here.
    """

    def __init__(self, directory: Path) -> None:
        self.save_dir = directory / "received"
        self.save_dir.mkdir(parents=True, exist_ok=True)
        self.output_path = directory / "sink.out"
        with open(self.output_path, "wb") as output:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "twistedrelay.bench.sink",
                    "--listen",
                    "127.0.0.1:0",
                    "--save-dir",
                    str(self.save_dir),
                    "--no-address-rules",
                ],
                cwd=directory,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.port = 0

    def wait_bound(self) -> None:
        """Wait until the sink listens and learn its port."""

        def bound() -> re.Match[str] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"the sink exited: {self.output_path.read_text()}")
            text = self.output_path.read_text("utf-8", "replace")
            return re.search(r"listening on 127\.0\.0\.1:(\d+)", text)

        self.port = int(wait_until(bound, START_TIMEOUT_SECONDS, "the sink to listen").group(1))

    def messages(self) -> list[bytes]:
        """Every message saved so far: X-Sink-Mail-From/X-Sink-Rcpt-To lines, then the content."""
        return [path.read_bytes() for path in sorted(self.save_dir.glob("*.eml"))]

    def cleanup(self) -> None:
        """SIGTERM by PID, bounded wait, SIGKILL if it did not stop."""
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Stop a helper started with ``start_new_session``: SIGTERM by PID, a bounded wait,
    then SIGKILL of its process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@dataclass(frozen=True)
class Sent:
    """One message the relay acknowledged: its queue ID, envelope and Message-ID."""

    queue_id: str
    sender: str
    recipients: tuple[str, ...]
    message_id: str
    reply: str


def send_message(
    port: int,
    *,
    sender: str = "alice@example.org",
    recipients: tuple[str, ...] = ("bob@example.net",),
    message_id: str,
    body: str = "Hello from a system test.\n",
    connection: smtplib.SMTP | None = None,
) -> Sent:
    """Send one message with smtplib (MAIL, RCPT, DATA) and return what the relay queued.

    :param connection: reuse an open session (the caller closes it); a new one otherwise.
    :raises AssertionError: the relay did not answer DATA with ``250 … queued as ID``.
    """
    message = EmailMessage()
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Subject"] = f"system test {message_id}"
    message["Message-ID"] = message_id
    message.set_content(body)
    client = connection or smtplib.SMTP("127.0.0.1", port, "client.example.org", timeout=15)
    try:
        if connection is None:
            client.ehlo()
        code, text = client.mail(sender)
        assert code == 250, (code, text)
        for recipient in recipients:
            code, text = client.rcpt(recipient)
            assert code == 250, (recipient, code, text)
        code, raw_reply = client.data(message.as_bytes(policy=email.policy.SMTP))
        reply = raw_reply.decode()
        match = QUEUED_RE.search(reply)
        assert code == 250 and match, (code, reply)
    finally:
        if connection is None:
            client.quit()
    return Sent(match.group(1), sender, recipients, message_id, f"{code} {reply}")
