"""The bench load generator against the bench sink over loopback, in process and as commands."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import pytest
import pytest_twisted

from twistedrelay.bench.behaviour import Faults, Stage
from twistedrelay.bench.load_generator import LoadGenerator, SendOptions, SendReport
from twistedrelay.bench.messages import MessageBuilder, SizeDistribution, build_body
from twistedrelay.testing.sink import SinkServer, delay_at


@pytest.fixture
def reactor() -> Any:
    from twisted.internet import reactor

    return reactor


async def run_load(
    reactor: Any, port: int, builder: MessageBuilder | None = None, **options: Any
) -> SendReport:
    """One generator run against 127.0.0.1:port, with a short hard timeout by default."""
    options.setdefault("timeout_seconds", 30.0)
    send_options = SendOptions(host="127.0.0.1", port=port, **options)
    return await LoadGenerator(reactor, send_options, builder).run()


async def run_against(reactor: Any, sink: SinkServer, *runs: dict[str, Any]) -> list[SendReport]:
    """Start ``sink``, make one generator run per options dict against it, stop it."""
    port = sink.start()
    try:
        return [await run_load(reactor, port, **options) for options in runs]
    finally:
        await sink.stop()


@pytest_twisted.ensureDeferred
async def test_every_message_arrives_once_and_stats_agree(reactor):
    """2000 pipelined messages over 5 connections: all accepted, none lost or duplicated."""
    sink = SinkServer(reactor, sequence_header="X-Sequence")
    port = sink.start()
    try:
        report = await run_load(reactor, port, connections=5, messages=2000)
    finally:
        await sink.stop()
    assert report.messages_attempted == report.messages_accepted == 2000
    assert report.errors == {} and not report.timed_out
    assert report.pipelining_used
    assert len(report.latencies) == 2000
    stats = sink.stats.as_dict(reactor.seconds())
    assert stats["messages"] == 2000 and stats["recipients"] == 2000
    assert stats["sequence"] == {
        "unique_messages": 2000,
        "duplicate_deliveries": 0,
        "missing": 0,
        "without_value": 0,
        "lowest": 1,
        "highest": 2000,
    }
    assert stats["connections_total"] == 5
    assert stats["connections_max_concurrent"] == 5
    assert stats["bytes"] == 2000 * 1024
    assert all(len(m.content) == 1024 for m in sink.messages)


@pytest_twisted.ensureDeferred
async def test_without_pipelining_one_command_at_a_time(reactor):
    """--no-pipelining still delivers everything, with the requested number of connections."""
    sink = SinkServer(reactor)
    [report] = await run_against(reactor, sink, dict(connections=3, messages=150, pipelining=False))
    assert report.messages_accepted == 150 and not report.pipelining_used
    assert sink.stats.connections_total == 3
    assert sink.stats.connections_max_concurrent == 3


@pytest_twisted.ensureDeferred
async def test_chunking_sends_every_message_with_bdat(reactor):
    """--chunking with a sink that offers CHUNKING: MAIL/RCPT/BDAT LAST, every message once;
    a transaction whose recipient is refused is a failed message and the next one goes on."""
    sink = SinkServer(reactor, sequence_header="X-Sequence")
    rejecting = MessageBuilder(recipient_template="reject{n}@d{k}.example.test")
    report, refused = await run_against(
        reactor,
        sink,
        dict(connections=4, messages=400, chunking=True),
        dict(builder=rejecting, connections=2, messages=10, chunking=True),
    )
    assert report.messages_accepted == 400 and report.chunking_used
    assert report.errors == {} and len(report.latencies) == 400
    stats = sink.stats.as_dict(reactor.seconds())
    assert stats["messages_bdat"] == stats["messages"] == 400
    assert stats["sequence"]["unique_messages"] == 400
    assert stats["sequence"]["duplicate_deliveries"] == 0
    assert all(len(m.content) == 1024 for m in sink.messages)
    assert refused.messages_failed == 10 and refused.messages_accepted == 0
    assert refused.recipients_refused == 10 and not refused.timed_out


@pytest_twisted.ensureDeferred
async def test_without_chunking_offered_data_is_used(reactor):
    """--chunking asks, it does not force: a sink without CHUNKING gets DATA."""
    sink = SinkServer(reactor, chunking=False)
    [report] = await run_against(reactor, sink, dict(connections=2, messages=20, chunking=True))
    assert report.messages_accepted == 20 and not report.chunking_used
    assert sink.stats.messages_bdat == 0


@pytest_twisted.ensureDeferred
async def test_recipients_are_spread_over_domains(reactor):
    """10 recipients per message over 5 domains: 5 domains seen, every recipient counted."""
    sink = SinkServer(reactor)
    port = sink.start()
    builder = MessageBuilder(recipients_per_message=10, domains=5)
    try:
        report = await run_load(reactor, port, builder, connections=2, messages=20)
    finally:
        await sink.stop()
    assert report.recipients_accepted == 200
    domains = {r.split(b"@")[1] for r in sink.recipients}
    assert domains == {b"d%d.example.test" % k for k in range(1, 6)}
    assert all(len(set(m.recipients)) == 10 for m in sink.messages)


@pytest_twisted.ensureDeferred
async def test_scripted_tempfail_and_reject_show_in_error_counts(reactor):
    """Sink faults appear in the generator's report, counted by reply code."""
    sink = SinkServer(reactor, faults=Faults(tempfail_first=3))
    port = sink.start()
    try:
        tempfailed = await run_load(reactor, port, connections=2, messages=20)
        rejected = await run_load(
            reactor,
            port,
            MessageBuilder(recipient_template="reject{n}@d{k}.example.test"),
            connections=2,
            messages=10,
        )
    finally:
        await sink.stop()
    assert tempfailed.errors == {"451": 3}
    assert (tempfailed.messages_accepted, tempfailed.messages_tempfailed) == (17, 3)
    assert rejected.errors == {"550": 10}
    assert rejected.messages_failed == 10 and rejected.recipients_refused == 10
    assert rejected.messages_accepted == 0


@pytest_twisted.ensureDeferred
async def test_hang_up_mid_data_is_a_failed_message_and_the_run_goes_on(reactor):
    """A sink that drops drop* recipients mid-DATA: every message fails, the run still ends."""
    sink = SinkServer(reactor)
    port = sink.start()
    try:
        report = await run_load(
            reactor,
            port,
            MessageBuilder(recipient_template="drop{n}@d{k}.example.test"),
            connections=2,
            messages=6,
        )
    finally:
        await sink.stop()
    assert report.messages_failed == 6 and report.messages_accepted == 0
    # A message pipelined behind a dropped one is lost with it: fewer losses than messages.
    assert 3 <= report.errors["connection_lost"] <= 6
    assert sink.stats.hang_ups == report.errors["connection_lost"]


@pytest_twisted.ensureDeferred
async def test_messages_per_connection_reconnects(reactor):
    """With 10 messages per connection, 100 messages take 10 connections, 2 at a time."""
    sink = SinkServer(reactor)
    port = sink.start()
    try:
        report = await run_load(
            reactor, port, connections=2, messages=100, messages_per_connection=10
        )
    finally:
        await sink.stop()
    assert report.messages_accepted == 100 and report.connections_opened == 10
    assert sink.stats.connections_total == 10
    assert sink.stats.connections_max_concurrent <= 2


@pytest_twisted.ensureDeferred
async def test_idle_connections_are_held_while_the_load_runs(reactor):
    """--hold-idle 15 keeps 15 extra sessions open during the load and quits them after."""
    sink = SinkServer(reactor)
    port = sink.start()
    try:
        report = await run_load(reactor, port, connections=2, messages=50, hold_idle=15)
    finally:
        await sink.stop()
    assert report.messages_accepted == 50
    assert (report.idle_established, report.idle_lost) == (15, 0)
    assert sink.stats.connections_max_concurrent == 17


@pytest_twisted.ensureDeferred
async def test_duration_and_rate_bound_the_run(reactor):
    """--duration 1 --rate 100 sends about 100 messages in about one second."""
    sink = SinkServer(reactor)
    port = sink.start()
    try:
        report = await run_load(
            reactor, port, connections=4, messages=0, duration_seconds=1.0, rate=100.0
        )
    finally:
        await sink.stop()
    assert 80 <= report.messages_accepted <= 101
    assert 0.9 <= report.elapsed_seconds < 3.0
    assert sink.stats.connections_total == 4  # no reconnect churn at the end


@pytest_twisted.ensureDeferred
async def test_hard_timeout_cuts_a_stuck_run_short(reactor):
    """A sink that takes 10 s per message cannot hold the generator past its hard timeout."""
    sink = SinkServer(reactor, script=delay_at(Stage.MESSAGE, 10.0))
    port = sink.start()
    try:
        report = await run_load(reactor, port, connections=2, messages=10, timeout_seconds=0.5)
    finally:
        await sink.stop()
    assert report.timed_out
    assert report.messages_accepted == 0
    assert report.elapsed_seconds < 2.0


def test_size_distribution_and_bodies():
    """Sizes parse with weights; bodies are exact, CRLF-only and never start a line with '.'."""
    distribution = SizeDistribution.parse("1024:3,32768:1")
    assert distribution.sizes == (1024, 32768) and distribution.weights == (3.0, 1.0)
    for size in (2, 3, 79, 80, 81, 82, 160, 161, 1000):
        body = build_body(size)
        assert len(body) == size, size
        assert body.endswith(b"\r\n")
        assert body.replace(b"\r\n", b"").isalpha() or body == b"\r\n"
    with pytest.raises(ValueError):
        SizeDistribution.parse("0")


# -- the commands, as subprocesses ----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _read_listening_port(process: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    """The port from the sink's 'listening on HOST:PORT' line on stderr, within a deadline."""
    assert process.stderr is not None
    deadline = time.monotonic() + timeout
    line = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stderr], [], [], 0.1)
        if ready:
            line += os.read(process.stderr.fileno(), 4096)
            if b"\n" in line:
                break
        if process.poll() is not None:
            break
    assert b"listening on 127.0.0.1:" in line, line
    return int(line.split(b"\n")[0].rsplit(b":", 1)[1])


def test_sink_and_send_commands_agree_and_sink_prints_final_json_on_sigterm(tmp_path):
    """python -m sink + python -m send --json: 500 messages counted; SIGTERM gives final JSON."""
    stats_file = tmp_path / "stats.json"
    sink = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "twistedrelay.bench.sink",
            "--listen",
            "127.0.0.1:0",
            "--check-sequence",
            "X-Sequence",
            "--stats-file",
            str(stats_file),
            "--max-runtime",
            "60",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        port = _read_listening_port(sink)
        sent = subprocess.run(
            [
                sys.executable,
                "-m",
                "twistedrelay.bench.send",
                "--target",
                f"127.0.0.1:{port}",
                "--connections",
                "4",
                "--messages",
                "500",
                "--size",
                "2048",
                "--json",
                "--timeout",
                "30",
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )
        os.kill(sink.pid, signal.SIGTERM)
        out, _ = sink.communicate(timeout=15)
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait(timeout=10)
    assert sent.returncode == 0, sent.stderr
    report = json.loads(sent.stdout)
    assert report["messages_accepted"] == 500 and report["errors"] == {}
    assert set(report["latency_ms"]) >= {"p50", "p90", "p99"}
    assert b"bench send:" in sent.stderr  # the progress line
    assert sink.returncode == 0
    final = json.loads(out.strip().splitlines()[-1])
    assert final["messages"] == 500 and final["bytes"] == 500 * 2048
    assert final["connections_total"] == 4
    assert final["sequence"]["unique_messages"] == 500
    assert final["sequence"]["duplicate_deliveries"] == final["sequence"]["missing"] == 0
    assert json.loads(stats_file.read_text())["messages"] == 500


def test_send_command_fails_when_nothing_listens():
    """bench send exits 1, with connect_failed counted, when the target refuses connections."""
    port = _free_port()
    sent = subprocess.run(
        [
            sys.executable,
            "-m",
            "twistedrelay.bench.send",
            "--target",
            f"127.0.0.1:{port}",
            "--connections",
            "2",
            "--messages",
            "10",
            "--json",
            "--quiet",
            "--timeout",
            "20",
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert sent.returncode == 1
    report = json.loads(sent.stdout)
    assert report["errors"] == {"connect_failed": 2}
    assert report["messages_accepted"] == 0
