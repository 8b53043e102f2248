"""t02: every acknowledged message survives SIGKILL of the whole relay and is delivered once.

The relay first routes every domain to a closed loopback port, so nothing can leave the
queue. Right after the last ``250 … queued as ID`` the master and its workers are killed
at once (SIGKILL to the process group: no drain, no requeue). Every acknowledged ID must
then be on disk with its envelope and content intact. A relay restarted on the same queue,
now routed to a sink, must deliver each message exactly once.
"""

from __future__ import annotations

import os
import smtplib
import sys
import time
import uuid
from collections import Counter

import pytest

from tests.system.harness import (
    closed_port,
    send_message,
    wait_until,
    write_relay_config,
)
from twistedrelay.queue.layout import QueueLayout
from twistedrelay.queue.store import read_entry_metadata

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]

MESSAGES = 20
CONNECTIONS = 2  # two sessions, so the kernel can hand them to both workers
DELIVERY_TIMEOUT_SECONDS = 30.0


def _find_entry(layout: QueueLayout, queue_id: str) -> list[str]:
    """Paths of ``queue_id`` in incoming/, active/*/, deferred/ and hold/."""
    candidates = [layout.entry_path(s, queue_id) for s in ("incoming", "deferred", "hold")]
    candidates += [
        layout.active_path(owner, queue_id)
        for owner in os.listdir(layout.active)
        if os.path.isdir(os.path.join(layout.active, owner))
    ]
    return [path for path in candidates if os.path.exists(path)]


def test_acknowledged_messages_survive_sigkill_and_are_delivered_once_after_restart(
    tmp_path, start_relay, start_sink
) -> None:
    """SIGKILL of the whole relay right after the last 250 loses nothing; a restart delivers all."""
    queue = tmp_path / "queue"
    config = write_relay_config(tmp_path, route=f"127.0.0.1:{closed_port()}", queue=queue)
    relay = start_relay(config, tmp_path / "run1")

    sent = []
    sessions = [
        smtplib.SMTP("127.0.0.1", relay.smtp_port, "client.example.org", timeout=15)
        for _ in range(CONNECTIONS)
    ]
    try:
        for session in sessions:
            session.ehlo()
        for number in range(MESSAGES):
            sent.append(
                send_message(
                    relay.smtp_port,
                    recipients=(f"first{number}@example.net", f"second{number}@example.net"),
                    message_id=f"<{number}.{uuid.uuid4().hex}@client.example.org>",
                    connection=sessions[number % CONNECTIONS],
                )
            )
        relay.kill_group()  # right after the last 250: nothing gets to drain or requeue
    finally:
        for session in sessions:
            session.close()
    relay.wait_group_gone()

    assert len({s.queue_id for s in sent}) == MESSAGES
    layout = QueueLayout(str(queue))
    for message in sent:
        paths = _find_entry(layout, message.queue_id)
        assert len(paths) == 1, f"{message.queue_id} is in {paths or 'no state'}"
        envelope, content_size = read_entry_metadata(paths[0])
        assert envelope.queue_id == message.queue_id
        assert envelope.sender == message.sender
        assert tuple(r.address for r in envelope.recipients) == message.recipients
        with open(paths[0], "rb") as file:
            content = file.read(content_size)
        assert f"Message-ID: {message.message_id}\r\n".encode() in content

    sink = start_sink(tmp_path / "sink")
    write_relay_config(tmp_path, route=f"127.0.0.1:{sink.port}", queue=queue)
    start_relay(config, tmp_path / "run2")

    expected = {m.message_id for m in sent}

    def delivered_ids() -> Counter[str]:
        found: Counter[str] = Counter()
        for raw in sink.messages():
            for message_id in expected:
                if f"Message-ID: {message_id}\r\n".encode() in raw:
                    found[message_id] += 1
        return found

    wait_until(
        lambda: set(delivered_ids()) == expected,
        DELIVERY_TIMEOUT_SECONDS,
        f"all {MESSAGES} messages at the sink",
    )
    wait_until(lambda: not any(_find_entry(layout, m.queue_id) for m in sent), 10, "an empty queue")
    time.sleep(0.5)  # a late duplicate would arrive now
    counts = delivered_ids()
    assert all(count == 1 for count in counts.values()), counts
    # Both recipients of a message share a destination: one transaction carries both.
    assert len(sink.messages()) == MESSAGES


def test_unreachable_destination_defers_mail_without_a_traceback(tmp_path, start_relay) -> None:
    """Mail to a refusing next hop is deferred, logged per recipient, with no traceback."""
    config = write_relay_config(tmp_path, route=f"127.0.0.1:{closed_port()}", workers=1)
    relay = start_relay(config, tmp_path / "run", workers=1)
    sent = [
        send_message(relay.smtp_port, message_id=f"<{n}.{uuid.uuid4().hex}@client.example.org>")
        for n in range(3)
    ]
    for message in sent:
        relay.wait_for_log(rf"{message.queue_id}: to=<bob@example\.net>, .*status=deferred")
    time.sleep(0.5)  # let the deferral be recorded
    assert "Traceback" not in relay.log(), relay.log()
