"""Hook plugins in real SMTP sessions: real reactor, loopback sockets, real queue files."""

from __future__ import annotations

import base64
import functools
import smtplib
from pathlib import Path
from typing import Any

import dkim
import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import defer, threads

from twistedrelay.config import parse_config
from twistedrelay.hooks import Decision, HookRunner, Plugin, load_plugins
from twistedrelay.queue.store import read_entry_metadata
from twistedrelay.smtp import replies
from twistedrelay.testing.inbound import InboundHarness

MESSAGE = (
    b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: report\r\n"
    b"Message-ID: <1@example.org>\r\n\r\nNumbers attached.\r\n"
)


def txt_record(key: rsa.RSAPrivateKey) -> bytes:
    """The DKIM key record (RFC 6376 §3.6.1) publishing ``key``'s public half."""
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


def dns(records: dict[str, bytes]):
    """A dnsfunc for dkim.verify answering TXT queries from a dict."""

    def lookup(name: bytes, timeout: float = 5) -> bytes | None:
        return records.get(name.decode("ascii").rstrip("."))

    return lookup


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def _send(port: int, sender: str, recipients: list[str], message: bytes = MESSAGE) -> Any:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        return client.sendmail(sender, recipients, message)


async def send(port: int, sender: str, recipients: list[str]) -> Any:
    """Send one message from a thread; returns smtplib's refusals or the exception raised."""
    try:
        return await threads.deferToThread(_send, port, sender, recipients)
    except smtplib.SMTPException as e:
        return e


@pytest.fixture
def start(tmp_path: Path):
    """Start an InboundHarness with the given settings and hooks; stopped after the test."""
    started: list[InboundHarness] = []

    def start(settings: dict[str, Any], hooks: HookRunner | None = None) -> InboundHarness:
        harness = InboundHarness(_reactor(), tmp_path, settings, hooks=hooks)
        harness.port = harness.start()
        started.append(harness)
        return harness

    yield start
    for harness in started:
        pytest_twisted.blockon(defer.ensureDeferred(harness.stop()))
        harness.parts.hooks.close()


def stored(harness: InboundHarness, state: str, queue_id: str) -> bytes:
    """The message as delivery would send it: the added headers, then the stored content."""
    path = harness.store.layout.entry_path(state, queue_id)
    envelope, content_size = read_entry_metadata(path)
    with open(path, "rb") as f:
        content = f.read(content_size)
    return "".join(envelope.prepend_headers).encode("ascii") + content


@pytest_twisted.ensureDeferred
async def test_a_raising_and_a_slow_plugin_give_451_and_the_next_session_is_served(start):
    """A plugin that raises or hangs gets 451 4.3.0 at MAIL; other senders still get through."""

    def broken(ctx):
        if ctx.sender == "boom@example.org":
            raise RuntimeError("plugin bug")
        return Decision.proceed()

    async def slow(ctx):
        if ctx.sender == "slow@example.org":
            await defer.Deferred()
        return Decision.proceed()

    hooks = HookRunner(
        [Plugin("broken", "test", {"mail": broken}), Plugin("slow", "test", {"mail": slow})],
        _reactor(),
        timeout_seconds=0.3,
    )
    harness = start({}, hooks)
    boom = await send(harness.port, "boom@example.org", ["bob@example.net"])
    assert isinstance(boom, smtplib.SMTPSenderRefused) and boom.smtp_code == 451
    hung = await send(harness.port, "slow@example.org", ["bob@example.net"])
    assert isinstance(hung, smtplib.SMTPSenderRefused) and hung.smtp_code == 451
    assert hung.smtp_error.startswith(b"4.3.0")
    assert await send(harness.port, "alice@example.org", ["bob@example.net"]) == {}
    assert len(harness.queued) == 1


@pytest_twisted.ensureDeferred
async def test_an_accept_all_plugin_does_not_open_the_relay(start):
    """With a plugin accepting every recipient, a stranger still gets 554 5.7.1 elsewhere."""
    seen: list[str] = []

    def accept_all(ctx):
        seen.append(ctx.recipient)
        return Decision.accept()

    hooks = HookRunner([Plugin("open_relay", "test", {"rcpt": accept_all})], _reactor())
    harness = start({"relay": {"mynetworks": [], "domains": ["example.org"]}}, hooks)
    refused = await send(harness.port, "a@example.com", ["victim@elsewhere.example"])
    assert isinstance(refused, smtplib.SMTPRecipientsRefused)
    ((code, text),) = refused.recipients.values()
    assert (code, text.decode()) == (
        554,
        f"{replies.RELAY_DENIED.enhanced} {replies.RELAY_DENIED.text}",
    )
    assert await send(harness.port, "a@example.com", ["user@example.org"]) == {}
    assert seen == ["user@example.org"]


@pytest_twisted.ensureDeferred
async def test_rate_limit_and_dkim_sign_throttle_a_flood_and_sign_what_they_queue(start, tmp_path):
    """enabled = [rate_limit, dkim_sign]: the 4th message gets 450 4.7.1; queued ones verify."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_file = tmp_path / "dkim.pem"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    settings = {
        "plugins": {
            "enabled": ["rate_limit", "dkim_sign"],
            "rate_limit": {
                "state_file": str(tmp_path / "rate.sqlite"),
                "per_client": {"messages": 3, "window_seconds": 3600},
            },
            "dkim_sign": {"domain": "example.org", "selector": "s1", "private_key": str(key_file)},
        }
    }
    reactor = _reactor()
    config = parse_config({"hostname": "relay.example.test", **settings}, "relay.toml")
    hooks = load_plugins(
        config.plugins,
        reactor,
        config.source,
        run_in_thread=functools.partial(
            threads.deferToThreadPool, reactor, reactor.getThreadPool()
        ),
    )
    harness = start(settings, hooks)
    outcomes = [
        await send(harness.port, "alice@example.org", ["bob@example.net"]) for _ in range(4)
    ]
    assert outcomes[:3] == [{}, {}, {}]
    assert isinstance(outcomes[3], smtplib.SMTPSenderRefused)
    assert (outcomes[3].smtp_code, outcomes[3].smtp_error.decode()) == (
        450,
        f"{replies.RATE_LIMITED.enhanced} {replies.RATE_LIMITED.text}",
    )
    assert len(harness.queued) == 3
    records = dns({"s1._domainkey.example.org": txt_record(key)})
    for queue_id in harness.queued:
        message = stored(harness, "incoming", queue_id)
        assert message.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")
        assert dkim.verify(message, dnsfunc=records)


@pytest_twisted.ensureDeferred
async def test_headers_accumulate_in_order_and_hold_puts_the_message_in_hold(start):
    """example adds X-Example, header_checks holds: the entry is in hold/ with the header."""
    settings = {
        "plugins": {
            "enabled": ["example", "header_checks"],
            "example": {"add_header": True},
            "header_checks": {
                "rules": [{"header": "Subject", "pattern": "^report$", "action": "hold"}]
            },
        }
    }
    harness = start(settings)
    assert await send(harness.port, "alice@example.org", ["bob@example.net"]) == {}
    assert harness.queued == []
    (queue_id,) = [p.name for p in Path(harness.store.layout.state_directory("hold")).iterdir()]
    assert stored(harness, "hold", queue_id).startswith(b"X-Example: yes\r\nReceived: from ")
