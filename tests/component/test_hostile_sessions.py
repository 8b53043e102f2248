"""Hostile clients against the real inbound adapter: no traceback, only valid replies.

Drives SMTPServerProtocol (policy, hooks, queue, AUTH and all) over an in-memory transport
with hypothesis-chosen sequences of hostile input, so every adapter decision path runs; a
logged failure or a malformed reply line fails the test.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, globalLogPublisher

from twistedrelay.app import build_relay_policy
from twistedrelay.auth import Authenticator, LoginThrottle, UsersFile, set_password
from twistedrelay.config import parse_config
from twistedrelay.eventlog import MailLog
from twistedrelay.hooks import load_plugins
from twistedrelay.metrics import RelayMetrics
from twistedrelay.queue.store import QueueStore
from twistedrelay.smtp.server import InboundParts, SMTPServerFactory

REPLY_LINE = re.compile(rb"[2-5][0-9][0-9][ -][^\r\n]*")
HOSTILE = [
    b"EHLO x\r\n",
    b"HELO \xff\xfe\r\n",
    b"MAIL FROM:<a@example.org>\r\n",
    b"MAIL FROM:<> SIZE=99999999999 BODY=8BITMIME SMTPUTF8\r\n",
    b"MAIL FROM:<a@b> AUTH=<>\r\n",
    b"RCPT TO:<d@foreign.test>\r\n",
    b"RCPT TO:<postmaster>\r\n",
    "RCPT TO:<ü@example.org>\r\n".encode(),
    b"RCPT TO:<@route:x@y>\r\n",
    b"DATA\r\n",
    b"Subject: x\r\n\r\nbody\r\n",
    b"Received: x\r\n" * 3,
    b"\r\n.\r\n",
    b"\n.\n",
    b"\r.\n",
    b"..\r\n",
    b"RSET\r\n",
    b"VRFY root\r\n",
    b"AUTH PLAIN AHVzZXIAd3Jvbmc=\r\n",
    b"AUTH LOGIN\r\n",
    b"AUTH PLAIN !!!\r\n",
    b"dXNlcg==\r\n",
    b"*\r\n",
    b"STARTTLS\r\n",
    b"BDAT 10 LAST\r\n",
    b"QUIT\r\n",
    b"\x00\x01\x02\r\n",
    b"x" * 3000 + b"\r\n",
    b"\r",
    b"\n",
]


@pytest.fixture(scope="module")
def factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SMTPServerFactory]:
    """One server factory with every feature on: relay policy, AUTH, plugins, limits."""
    from twisted.internet import reactor

    directory: Path = tmp_path_factory.mktemp("hostile")
    users = directory / "users"
    set_password(users, "user", "secret")
    config = parse_config(
        {
            "hostname": "relay.example.test",
            "smtp": {"max_errors": 8, "max_line_length": 512, "max_message_size": 4096},
            "relay": {"mynetworks": ["127.0.0.1/32"], "domains": ["example.org"]},
            "queue": {"directory": str(directory / "queue")},
            "auth": {"users_file": str(users), "allow_plaintext_on_loopback": True},
            "plugins": {"enabled": ["example"]},
        },
        "<test>",
    )
    QueueStore.create(str(config.queue.directory))
    store = QueueStore(str(config.queue.directory), reactor)
    clock = Clock()
    parts = InboundParts(
        config=config,
        reactor=clock,
        store=store,
        policy=build_relay_policy(config),
        hooks=load_plugins(config.plugins, clock),
        maillog=MailLog(),
        metrics=RelayMetrics(),
        on_queued=lambda queue_id: None,
        authenticator=Authenticator(UsersFile(users), reactor, reactor.getThreadPool()),
        throttle=LoginThrottle(),
    )
    yield SMTPServerFactory(parts, "smtp")
    store.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from(HOSTILE), max_size=25),
    st.sampled_from(["127.0.0.1", "127.0.0.2"]),
    st.integers(1, 64),
)
def test_hostile_sequences_never_log_a_traceback(
    factory: SMTPServerFactory, tokens: list[bytes], client: str, chunk: int
) -> None:
    """Any sequence, chunked any way, from trusted or stranger clients: valid replies only."""
    failures: list[LogEvent] = []

    def observe(event: LogEvent) -> None:
        if "log_failure" in event:
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        protocol: Any = factory.buildProtocol(IPv4Address("TCP", client, 40000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        data = b"".join(tokens)
        for start in range(0, len(data), chunk):
            if transport.disconnecting:
                break
            protocol.dataReceived(data[start : start + chunk])
        protocol.connectionLost(None)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert failures == [], [e.get("log_format") for e in failures]
    wire = transport.value()
    assert wire.endswith(b"\r\n")
    for line in wire[:-2].split(b"\r\n"):
        assert REPLY_LINE.fullmatch(line), line
