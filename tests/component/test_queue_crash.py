"""Crash safety with real processes: SIGKILL right after the acknowledgement loses nothing."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
from pathlib import Path

from twistedrelay.queue.store import QueueStore, read_entry_metadata

REPO_ROOT = Path(__file__).resolve().parents[2]
MESSAGES = 20

# The child queues MESSAGES messages concurrently and prints each queue ID as soon as its
# commit Deferred fires, i.e. at the moment an SMTP server would send "250 queued as".
CHILD = r"""
import sys, time
from twisted.internet import reactor
from twistedrelay.queue.entry import Envelope, Recipient
from twistedrelay.queue.store import QueueStore

store = QueueStore(sys.argv[1], reactor)

def body(queue_id):
    line = b"Queue-ID: " + queue_id.encode() + b" " + b"x" * 60 + b"\r\n"
    return b"Subject: crash test\r\n\r\n" + line * 2000

def acknowledged(_, queue_id):
    sys.stdout.write(queue_id + "\n")
    sys.stdout.flush()

def queue_all():
    for _ in range(int(sys.argv[2])):
        message = store.open_message()
        message.write(body(message.queue_id))
        envelope = Envelope(
            message.queue_id, "sender@example.org",
            (Recipient("rcpt@example.net"),), time.time(),
        )
        message.commit(envelope).addCallback(acknowledged, message.queue_id)

reactor.callWhenRunning(queue_all)
reactor.run()
"""


def _expected_body(queue_id: str) -> bytes:
    line = b"Queue-ID: " + queue_id.encode() + b" " + b"x" * 60 + b"\r\n"
    return b"Subject: crash test\r\n\r\n" + line * 2000


def _read_first_line(process: subprocess.Popen[bytes], timeout_seconds: float) -> bytes:
    """The child's first output line, or fail after the deadline."""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout_seconds):
            raise AssertionError("the child acknowledged nothing in time")
    return process.stdout.readline()


def test_acknowledged_entries_survive_sigkill_intact(tmp_path):
    """Every ID printed after its commit fired is in incoming/ with envelope and body intact."""
    directory = str(tmp_path / "queue")
    QueueStore.create(directory)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    process = subprocess.Popen(
        [sys.executable, "-c", CHILD, directory, str(MESSAGES)],
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        first = _read_first_line(process, timeout_seconds=30)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            process.kill()
        rest = process.communicate(timeout=30)[0]
    assert process.returncode == -signal.SIGKILL
    acknowledged = (first + rest).decode().split()
    assert acknowledged, "the child printed no queue ID"

    incoming = set(os.listdir(os.path.join(directory, "incoming")))
    assert set(acknowledged) <= incoming
    # Whatever reached incoming/ is complete, acknowledged or not: no torn entry.
    for queue_id in incoming:
        path = os.path.join(directory, "incoming", queue_id)
        envelope, content_size = read_entry_metadata(path)
        assert envelope.queue_id == queue_id
        assert envelope.recipients[0].address == "rcpt@example.net"
        with open(path, "rb") as file:
            assert file.read(content_size) == _expected_body(queue_id)
