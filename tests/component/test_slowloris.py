"""Slowloris and connection limits: idle connections do not starve a new client.

One in-process server; 1000 connections that greet-and-idle (half of them mid-command, the
classic slowloris) from 20 loopback addresses, 50 each, exactly at the per-IP limit.
"""

from __future__ import annotations

import resource
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import threads

from twistedrelay.smtp import replies
from twistedrelay.testing.inbound import InboundHarness

IDLE_CONNECTIONS = 1000
PER_IP = 50
SOURCES = [f"127.0.0.{10 + i}" for i in range(IDLE_CONNECTIONS // PER_IP)]
GREETING_DEADLINE_SECONDS = 1.0


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@pytest.fixture
def enough_file_descriptors() -> Iterator[None]:
    """Room for both ends of every connection in this one process, restored afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * IDLE_CONNECTIONS + 512
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {wanted}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(512)
        if not chunk:
            break
        data += chunk
    return data


def _open_idle(port: int, sockets: list[socket.socket]) -> None:
    """Open the idle connections, each after reading its greeting, half left mid-command."""
    for i in range(IDLE_CONNECTIONS):
        sock = socket.create_connection(
            ("127.0.0.1", port), timeout=5, source_address=(SOURCES[i % len(SOURCES)], 0)
        )
        sockets.append(sock)
        greeting = _read_line(sock)
        assert greeting.startswith(b"220 "), (i, greeting)
        if i % 2:
            sock.sendall(b"EHLO slow")  # no line end: the server waits for the rest


def _greeting_time(port: int, source: str) -> tuple[bytes, float]:
    started = time.monotonic()
    with socket.create_connection(
        ("127.0.0.1", port), timeout=5, source_address=(source, 0)
    ) as sock:
        line = _read_line(sock)
    return line, time.monotonic() - started


@pytest_twisted.ensureDeferred
async def test_idle_connections_do_not_delay_a_new_clients_greeting(
    tmp_path: Path, enough_file_descriptors: None
) -> None:
    """1000 idle connections: a new client is still greeted within 1 s; the 51st per IP gets 421."""
    harness = InboundHarness(
        _reactor(),
        tmp_path,
        {"smtp": {"max_connections": 2000, "max_connections_per_ip": PER_IP}},
    )
    port = harness.start()
    idle: list[socket.socket] = []
    try:
        await threads.deferToThread(_open_idle, port, idle)
        assert harness.service.session_count == IDLE_CONNECTIONS
        greeting, seconds = await threads.deferToThread(_greeting_time, port, "127.0.0.1")
        assert greeting.startswith(b"220 "), greeting
        assert seconds < GREETING_DEADLINE_SECONDS, seconds
        over_limit, _ = await threads.deferToThread(_greeting_time, port, SOURCES[0])
        assert over_limit == replies.TOO_MANY_CONNECTIONS.to_bytes()
    finally:
        for sock in idle:
            sock.close()
        await harness.stop()


@pytest_twisted.ensureDeferred
async def test_max_connections_refuses_beyond_the_total(tmp_path: Path) -> None:
    """smtp.max_connections: past the total a client gets 421 4.7.0; a close frees a slot."""
    harness = InboundHarness(_reactor(), tmp_path, {"smtp": {"max_connections": 3}})
    port = harness.start()
    held: list[socket.socket] = []

    def fill_then_probe() -> tuple[bytes, bytes]:
        for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
            sock = socket.create_connection(("127.0.0.1", port), 5, (source, 0))
            held.append(sock)
            assert _read_line(sock).startswith(b"220 ")
        refused, _ = _greeting_time(port, "127.0.0.5")
        held.pop().close()
        deadline = time.monotonic() + 5
        while True:  # the server notices the close asynchronously
            again, _ = _greeting_time(port, "127.0.0.5")
            if again.startswith(b"220 ") or time.monotonic() > deadline:
                return refused, again
            time.sleep(0.05)

    try:
        refused, again = await threads.deferToThread(fill_then_probe)
    finally:
        for sock in held:
            sock.close()
        await harness.stop()
    assert refused == replies.TOO_MANY_CONNECTIONS.to_bytes()
    assert again.startswith(b"220 ")


@pytest_twisted.ensureDeferred
async def test_connection_rate_per_ip_refuses_a_flood(tmp_path: Path) -> None:
    """smtp.connection_rate_per_ip = 3: the 4th connection within a minute gets 421 4.7.0."""
    harness = InboundHarness(_reactor(), tmp_path, {"smtp": {"connection_rate_per_ip": 3}})
    port = harness.start()

    def four() -> list[bytes]:
        return [_greeting_time(port, "127.0.0.6")[0] for _ in range(4)]

    try:
        greetings = await threads.deferToThread(four)
    finally:
        await harness.stop()
    assert [g[:4] for g in greetings[:3]] == [b"220 "] * 3
    assert greetings[3] == replies.TOO_MANY_CONNECTIONS.to_bytes()
    # One mail-log line per refusal, for fail2ban and the like.
    (refusal,) = [line for line in harness.mail_log() if "reject: CONNECT" in line]
    assert "from [127.0.0.6]: 421 4.7.0" in refusal, refusal


def _trickle_until_answered(sock: socket.socket, byte: bytes) -> tuple[bytes, float]:
    """Send ``byte`` every 0.1 s (at most 5 s) until the server answers or closes; return
    the answer and the seconds it took."""
    started = time.monotonic()
    sock.settimeout(0.1)
    for _ in range(50):
        try:
            sock.sendall(byte)
            answer = sock.recv(512)
        except TimeoutError:
            continue
        except OSError:
            break
        return answer, time.monotonic() - started
    return b"", time.monotonic() - started


@pytest_twisted.ensureDeferred
async def test_data_trickled_a_byte_at_a_time_hits_data_timeout(tmp_path: Path) -> None:
    """smtp.data_timeout bounds the whole DATA phase: trickling bytes does not reset it."""
    harness = InboundHarness(
        _reactor(), tmp_path, {"smtp": {"command_timeout": 5, "data_timeout": 0.5}}
    )
    port = harness.start()

    def trickle() -> tuple[bytes, float]:
        with socket.create_connection(("127.0.0.1", port), 5, ("127.0.0.7", 0)) as sock:
            _read_line(sock)
            sock.sendall(b"HELO x\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
            replies_so_far = b""
            while not replies_so_far.endswith(replies.START_MAIL_INPUT.to_bytes()):
                chunk = sock.recv(512)
                assert chunk, replies_so_far
                replies_so_far += chunk
            return _trickle_until_answered(sock, b"x")

    try:
        answer, seconds = await threads.deferToThread(trickle)
    finally:
        await harness.stop()
    assert answer == replies.IDLE_TIMEOUT.to_bytes(), answer
    assert 0.4 <= seconds < 2.0, seconds
    assert harness.queued == []


@pytest_twisted.ensureDeferred
async def test_a_command_trickled_a_byte_at_a_time_hits_command_timeout(tmp_path: Path) -> None:
    """smtp.command_timeout counts from the last whole command: bytes that complete none do
    not reset it, so a byte every 0.1 s cannot hold the connection (slowloris)."""
    harness = InboundHarness(_reactor(), tmp_path, {"smtp": {"command_timeout": 0.5}})
    port = harness.start()

    def trickle() -> tuple[bytes, float]:
        with socket.create_connection(("127.0.0.1", port), 5, ("127.0.0.8", 0)) as sock:
            _read_line(sock)
            return _trickle_until_answered(sock, b"N")  # never a whole line

    try:
        answer, seconds = await threads.deferToThread(trickle)
    finally:
        await harness.stop()
    assert answer == replies.IDLE_TIMEOUT.to_bytes(), answer
    assert 0.4 <= seconds < 2.0, seconds
