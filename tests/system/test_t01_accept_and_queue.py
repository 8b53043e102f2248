"""t01: a relay under twistd accepts mail from smtplib and swaks, logs it, and delivers it once.

One relay (two workers, every domain routed to a sink on loopback) serves the module's
tests; each test sends with its own Message-ID and looks only for its own messages.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.harness import (
    QUEUED_RE,
    RelayProcess,
    SinkProcess,
    send_message,
    wait_until,
    write_relay_config,
)

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]

DELIVERY_TIMEOUT_SECONDS = 20.0


@pytest.fixture(scope="module")
def relay_and_sink(tmp_path_factory) -> Iterator[tuple[RelayProcess, SinkProcess]]:
    """A sink and a two-worker relay routing every domain to it, shared by this module."""
    directory = tmp_path_factory.mktemp("t01")
    sink = SinkProcess(directory / "sink")
    relay = None
    try:
        sink.wait_bound()
        config = write_relay_config(directory, route=f"127.0.0.1:{sink.port}")
        relay = RelayProcess(config, directory / "run")
        relay.wait_ready(workers=2)
        yield relay, sink
    finally:
        try:
            if relay is not None:
                relay.cleanup()
        finally:
            sink.cleanup()


def _new_message_id() -> str:
    return f"<{uuid.uuid4().hex}@client.example.org>"


def _received_with(sink: SinkProcess, message_id: str) -> list[bytes]:
    """The sink's saved messages that carry ``message_id``."""
    needle = f"Message-ID: {message_id}".encode()
    return [raw for raw in sink.messages() if needle in raw]


def _wait_delivered(sink: SinkProcess, message_id: str) -> bytes:
    """Wait until the sink has the message, then make sure it stays the only copy."""
    wait_until(
        lambda: _received_with(sink, message_id),
        DELIVERY_TIMEOUT_SECONDS,
        f"the sink to receive {message_id}",
    )
    time.sleep(0.5)  # a duplicate delivery right behind the first would show up by now
    copies = _received_with(sink, message_id)
    assert len(copies) == 1, f"{len(copies)} copies of {message_id} delivered"
    return copies[0]


def test_smtplib_message_is_queued_logged_and_delivered_once(relay_and_sink) -> None:
    """smtplib gets ``250 2.0.0 … queued as ID``; the ID is logged; the sink gets it once."""
    relay, sink = relay_and_sink
    message_id = _new_message_id()

    sent = send_message(
        relay.smtp_port,
        sender="alice@example.org",
        recipients=("bob@example.net", "carol@example.net"),
        message_id=message_id,
        body="first line\n.leading dot survives\n",
    )

    assert sent.reply.startswith("250 2.0.0")
    relay.wait_for_log(rf"{sent.queue_id}: client=\[127\.0\.0\.1\], from=<alice@example\.org>")
    raw = _wait_delivered(sink, message_id)
    relay.wait_for_log(rf"{sent.queue_id}: to=<carol@example\.net>, .*status=sent")
    relay.wait_for_log(rf"{sent.queue_id}: removed")
    head, _, content = raw.partition(b"\r\n\r\n")
    assert b"X-Sink-Mail-From: <alice@example.org>\r\n" in head
    assert b"X-Sink-Rcpt-To: <bob@example.net>\r\n" in head
    assert b"X-Sink-Rcpt-To: <carol@example.net>\r\n" in head
    # The relay prepends a Received header naming the queue ID (RFC 5321 §4.4).
    received = re.search(rb"Received: .*?(?=\r\n\S)", raw, re.S)
    assert received and sent.queue_id.encode() in received.group(0)
    assert content == b"first line\r\n.leading dot survives\r\n"


@pytest.mark.skipif(shutil.which("swaks") is None, reason="make test installs swaks")
def test_swaks_message_is_queued_logged_and_delivered_once(relay_and_sink) -> None:
    """swaks, a client operators use to test relays, gets a queue ID and the sink gets it once."""
    relay, sink = relay_and_sink
    message_id = _new_message_id()
    result = subprocess.run(
        [
            "swaks",
            "--server",
            f"127.0.0.1:{relay.smtp_port}",
            "--helo",
            "client.example.org",
            "--from",
            "dave@example.org",
            "--to",
            "erin@example.net",
            "--header",
            f"Message-ID: {message_id}",
            "--body",
            "sent by swaks",
            "--timeout",
            "15",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    match = QUEUED_RE.search(result.stdout)
    assert match, result.stdout
    relay.wait_for_log(rf"{match.group(1)}: client=\[127\.0\.0\.1\], from=<dave@example\.org>")
    raw = _wait_delivered(sink, message_id)
    assert raw.startswith(
        b"X-Sink-Mail-From: <dave@example.org>\r\nX-Sink-Rcpt-To: <erin@example.net>"
    )
    assert b"sent by swaks" in raw


def test_metrics_count_received_and_delivered_messages(relay_and_sink) -> None:
    """/metrics, summed over both workers, counts a message received and delivered."""
    relay, sink = relay_and_sink
    message_id = _new_message_id()
    send_message(relay.smtp_port, message_id=message_id)
    _wait_delivered(sink, message_id)

    def scrape() -> dict[str, float]:
        url = f"http://127.0.0.1:{relay.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def counted() -> dict[str, float] | None:
        samples = scrape()
        delivered = samples.get('twistedrelay_deliveries_total{result="delivered"}', 0)
        received = samples.get("twistedrelay_messages_received_total", 0)
        return samples if received >= 1 and delivered >= 1 else None

    assert relay.metrics_port
    wait_until(counted, 10, "received and delivered counts in /metrics")


def test_sigterm_stops_master_and_workers_with_exit_status_zero(tmp_path, start_sink) -> None:
    """SIGTERM to the master ends it with status 0 within the bound, leaving no worker behind."""
    sink = start_sink(tmp_path / "sink")
    relay = RelayProcess(write_relay_config(tmp_path, route=f"127.0.0.1:{sink.port}"), tmp_path)
    try:
        relay.wait_ready(workers=2)
        started = time.monotonic()
        assert relay.terminate() == 0, relay.log()
        assert time.monotonic() - started < 15
        relay.wait_group_gone()
    finally:
        relay.cleanup()


def test_relay_log_is_one_file_without_tracebacks(relay_and_sink) -> None:
    """twistd's --logfile holds the master's and both workers' lines, and no traceback."""
    relay, _ = relay_and_sink
    log = Path(relay.log_path).read_text()
    assert "listening for smtp on 127.0.0.1:" in log
    assert re.search(r"worker 0: .*worker 0 started", log)
    assert re.search(r"worker 1: .*worker 1 started", log)
    assert "Traceback" not in log
