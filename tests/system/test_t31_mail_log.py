"""t31: the mail log of a relay under twistd tells a message's story, in text and JSON lines.

A relay (one worker, every domain routed to a sink, only 127.0.0.1 in mynetworks) logs to a
file with ``twistd --logfile``. ``grep QUEUEID`` on it must give the ``queued`` line, one
``to=<…>, relay=…, delay=…, dsn=…, status=sent (…)`` line per recipient, and ``removed``; a
stranger (127.0.0.2) relaying to a foreign domain gives Postfix's ``NOQUEUE: reject:`` line.
With ``[log] format = "json"`` the file holds one JSON object per line (the master re-emits
the worker's events with their fields) and the mail events carry the queue ID.
"""

from __future__ import annotations

import json
import re
import smtplib
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.system.harness import (
    RelayProcess,
    Sent,
    SinkProcess,
    send_message,
    write_relay_config,
)

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]

SENDER = "alice@example.org"
RECIPIENTS = ("bob@example.net", "carol@example.net")
STRANGER = "127.0.0.2"
FOREIGN_RECIPIENT = "victim@elsewhere.example"


def _start(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    log_format: str,
) -> RelayProcess:
    """A one-worker relay with mynetworks = 127.0.0.1/32 and the given log format."""
    start_sink: Callable[[Path], SinkProcess] = request.getfixturevalue("start_sink")
    start_relay: Callable[..., RelayProcess] = request.getfixturevalue("start_relay")
    sink = start_sink(tmp_path / "sink")
    config = write_relay_config(
        tmp_path,
        route=f"127.0.0.1:{sink.port}",
        workers=1,
        extra=f'[log]\nformat = "{log_format}"\n',
    )
    text = config.read_text()
    default_networks = 'mynetworks = ["127.0.0.0/8"]'
    assert default_networks in text
    config.write_text(text.replace(default_networks, 'mynetworks = ["127.0.0.1/32"]'))
    if log_format == "text":
        return start_relay(config, tmp_path / "run", workers=1)
    # The harness waits for text lines ("worker 0: … worker 0 started"); JSON says it so.
    relay = RelayProcess(config, tmp_path / "run")
    request.addfinalizer(relay.cleanup)
    relay.smtp_port = int(relay.wait_for_log(r"listening for smtp on 127\.0\.0\.1:(\d+)", 30)[1])
    relay.wait_for_log(r'"worker": 0, "text": "worker 0 started"', 30)
    return relay


def _send_and_wait_removed(relay: RelayProcess) -> Sent:
    """Send one message to two recipients and wait until the log says it left the queue."""
    sent = send_message(
        relay.smtp_port,
        sender=SENDER,
        recipients=RECIPIENTS,
        message_id=f"<{uuid.uuid4().hex}@client.example.org>",
    )
    # The same text in both formats (JSON: the "text" field).
    relay.wait_for_log(rf"{sent.queue_id}: removed", timeout=20)
    return sent


def _relay_as_stranger(relay: RelayProcess) -> tuple[int, str]:
    """From 127.0.0.2 (outside mynetworks), try to relay to a foreign domain: the RCPT reply."""
    with smtplib.SMTP(timeout=15, source_address=(STRANGER, 0)) as client:
        client.connect("127.0.0.1", relay.smtp_port)
        client.ehlo("stranger.example")
        code, _ = client.mail("spammer@stranger.example")
        assert code == 250
        code, text = client.rcpt(FOREIGN_RECIPIENT)
        client.rset()
    return code, text.decode()


def test_grep_queue_id_tells_the_message_story(request, tmp_path) -> None:
    """The queue ID greps to queued (client, from=), one status=sent line per rcpt, removed."""
    relay = _start(request, tmp_path, "text")
    sent = _send_and_wait_removed(relay)

    story = [line for line in relay.log_path.read_text().splitlines() if sent.queue_id in line]
    queued = [i for i, line in enumerate(story) if f"{sent.queue_id}: client=" in line]
    assert len(queued) == 1, story
    assert re.search(
        rf"{sent.queue_id}: client=\[127\.0\.0\.1\](:\d+)?, from=<{re.escape(SENDER)}>, "
        rf"size=\d+, nrcpt=2 \(queue active\)",
        story[queued[0]],
    ), story
    sink_port = int(re.search(r'"\*" = "127\.0\.0\.1:(\d+)"', relay.config.read_text()).group(1))
    delivered = {}
    for recipient in RECIPIENTS:
        lines = [i for i, line in enumerate(story) if f"to=<{recipient}>" in line]
        assert len(lines) == 1, story
        assert re.search(
            rf"{sent.queue_id}: to=<{re.escape(recipient)}>, "
            rf"relay=\S+\[127\.0\.0\.1\]:{sink_port}, delay=\d+\.\d\d, dsn=2\.0\.0, "
            r"(tls=[^,]+, )?status=sent \(250 [^)]*\)",
            story[lines[0]],
        ), story[lines[0]]
        delivered[recipient] = lines[0]
    removed = [i for i, line in enumerate(story) if line.endswith(f"{sent.queue_id}: removed")]
    assert len(removed) == 1, story
    assert queued[0] < min(delivered.values()) and max(delivered.values()) < removed[0]
    # The session around it: connect and disconnect lines with the client address.
    log = relay.log()
    assert re.search(r"connect from \[127\.0\.0\.1\]:\d+ listener=smtp", log)
    assert re.search(r"disconnect from \[127\.0\.0\.1\] .*messages=1", log)


def test_stranger_relaying_logs_noqueue_reject(request, tmp_path) -> None:
    """A client outside mynetworks relaying to a foreign domain gets a NOQUEUE: reject line."""
    relay = _start(request, tmp_path, "text")
    code, text = _relay_as_stranger(relay)

    assert code == 554 and text.startswith("5.7.1"), (code, text)
    line = relay.wait_for_log(
        r"NOQUEUE: reject: RCPT from \[127\.0\.0\.2\]: 554 5\.7\.1 [^;\n]*; "
        rf"from=<spammer@stranger\.example> to=<{re.escape(FOREIGN_RECIPIENT)}>"
    )
    assert line


def _json_records(relay: RelayProcess) -> list[dict[str, Any]]:
    """Every line of the log file as a JSON object; fails on a line that is not one."""
    records = []
    for number, line in enumerate(relay.log_path.read_text().splitlines(), 1):
        record = json.loads(line)
        assert isinstance(record, dict), (number, line)
        records.append(record)
    return records


def test_json_log_is_one_object_per_line_with_queue_ids(request, tmp_path) -> None:
    """With format = "json" every log line is a JSON object; mail events carry queue_id."""
    relay = _start(request, tmp_path, "json")
    sent = _send_and_wait_removed(relay)
    code, _ = _relay_as_stranger(relay)
    assert code == 554
    relay.wait_for_log(r'"event": "reject"')

    records = _json_records(relay)
    assert all({"time", "level", "namespace", "text"} <= set(r) for r in records), records
    story = [r for r in records if r.get("queue_id") == sent.queue_id]
    assert [r["event"] for r in story if r["event"] != "delivery"] == ["queued", "removed"]
    queued = story[0]
    assert queued["namespace"] == "twistedrelay.mail" and queued["worker"] == 0
    assert queued["sender"] == SENDER and queued["nrcpt"] == 2
    assert queued["client_address"] == "127.0.0.1"
    assert queued["text"].startswith(f"{sent.queue_id}: client=[127.0.0.1]")
    deliveries = [r for r in story if r["event"] == "delivery"]
    assert sorted(r["recipient"] for r in deliveries) == sorted(RECIPIENTS)
    for record in deliveries:
        assert (record["status"], record["dsn"]) == ("sent", "2.0.0"), record
        assert record["reply"].startswith("250")
        assert re.fullmatch(r"\S+\[127\.0\.0\.1\]:\d+", record["relay"]), record
        assert "status=sent (250" in record["text"]
    (reject,) = [r for r in records if r.get("event") == "reject"]
    assert reject["queue_id"] == "NOQUEUE" and reject["client_address"] == STRANGER
    assert reject["recipient"] == FOREIGN_RECIPIENT and reject["reply"].startswith("554 5.7.1")
    assert reject["text"].startswith("NOQUEUE: reject: RCPT from [127.0.0.2]: 554 5.7.1")
    # The master's own events are JSON lines too (not only the re-emitted mail events).
    assert any(r["namespace"].startswith("twistedrelay.process") for r in records)
