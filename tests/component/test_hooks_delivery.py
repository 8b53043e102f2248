"""Hook plugins on the delivery side: inbound SMTP → queue → DeliveryService → sink.

Real reactor, loopback sockets, a real queue directory, SinkServer as the receiving MTA and
DNSTestServer publishing the DKIM key. Covers the deliver hook (tempfail, reroute), header
drops honoured at delivery, hook decisions in the mail log, and issue 8's "done when":
``enabled = ["rate_limit", "dkim_sign"]`` signs what it relays and throttles a flood.
"""

from __future__ import annotations

import base64
import math
import smtplib
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dkim
import dns.resolver
import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import defer, threads

from twistedrelay.delivery.service import DeliveryService, build_delivery_service
from twistedrelay.hooks import Decision, DeliverContext, HookRunner, Plugin
from twistedrelay.smtp import replies
from twistedrelay.smtp.replies import Reply
from twistedrelay.testing.dns_server import DNSTestServer
from twistedrelay.testing.inbound import InboundHarness
from twistedrelay.testing.sink import SinkServer
from twistedrelay.testing.waiting import wait_until

DEADLINE_SECONDS = 10.0
SENDER = "alice@example.org"
MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: report\r\n"
    b"X-Originating-IP: 192.0.2.7\r\n"
    b"Message-ID: <1@example.org>\r\n"
    b"\r\n"
    b"Numbers attached.\r\n"
)


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class Relay:
    """InboundHarness and a DeliveryService sharing one queue, hooks and mail log."""

    def __init__(
        self, tmp_path: Path, route: str, plugins: dict[str, Any], hooks: HookRunner | None = None
    ) -> None:
        reactor = _reactor()
        settings = {
            "workers": {"count": 1},
            "plugins": plugins,
            "delivery": {
                "routes": {"*": route},
                "minimal_backoff": 60,
                "maximal_backoff": 120,
                "idle_timeout": 1,
                "queue_scan_interval": 0.2,
                "connect_timeout": 2,
            },
        }
        self.delivery: DeliveryService | None = None
        self.inbound = InboundHarness(
            reactor, tmp_path, settings, hooks=hooks, on_queued=self._queued
        )
        self.delivery = build_delivery_service(
            self.inbound.config,
            1,
            reactor,
            store=self.inbound.store,
            metrics=self.inbound.metrics,
            maillog=self.inbound.parts.maillog,
            hooks=self.inbound.parts.hooks,
        )
        self.port = self.inbound.start()
        self.delivery.startService()

    def _queued(self, queue_id: str) -> None:
        if self.delivery is not None:
            self.delivery.notify_queued(queue_id)

    async def send(
        self, message: bytes = MESSAGE, source: str = "127.0.0.1"
    ) -> dict[str, Any] | smtplib.SMTPException:
        """One SMTP session from ``source`` (in a thread); smtplib's refusals or its error."""

        def send() -> dict[str, Any]:
            with smtplib.SMTP(
                "127.0.0.1", self.port, timeout=10, source_address=(source, 0)
            ) as client:
                return client.sendmail(SENDER, ["bob@example.net"], message)

        try:
            return await threads.deferToThread(send)
        except smtplib.SMTPException as e:
            return e

    def mail_log(self) -> list[str]:
        return self.inbound.mail_log()

    async def stop(self) -> None:
        assert self.delivery is not None
        await self.delivery.stopService()
        hooks = self.inbound.parts.hooks
        await self.inbound.stop()
        await hooks.drain()
        hooks.close()


@pytest.fixture
def relays():
    """Relays a test started; stopped after it."""
    started: list[Relay] = []
    yield started
    for relay in started:
        pytest_twisted.blockon(defer.ensureDeferred(relay.stop()))


@pytest.fixture
def sink():
    """A SinkServer on 127.0.0.1; stopped after the test."""
    server = SinkServer(_reactor())
    server.start()
    yield server
    pytest_twisted.blockon(defer.ensureDeferred(server.stop()))


def _closed_route() -> str:
    """A next hop on loopback where nothing listens (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"[127.0.0.1]:{sock.getsockname()[1]}"


def _deliver_hooks(name: str, hook: Callable[[DeliverContext], Any]) -> HookRunner:
    return HookRunner([Plugin(name, "test", {"deliver": hook})], _reactor())


# -- the deliver hook -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_deliver_tempfail_defers_the_batch_with_its_reply_and_names_the_plugin(
    tmp_path, relays, sink
):
    """tempfail at deliver: nothing is sent, the entry is deferred, the log names the plugin."""
    seen: list[DeliverContext] = []

    def pause(ctx: DeliverContext) -> Decision:
        seen.append(ctx)
        ctx.results.add("pause", "maintenance window")
        return Decision.tempfail(Reply(451, "4.7.0", "Delivery paused"))

    relay = Relay(tmp_path, f"[127.0.0.1]:{sink.port}", {}, _deliver_hooks("pause", pause))
    relays.append(relay)
    assert await relay.send() == {}
    store = relay.inbound.store
    await wait_until(_reactor(), lambda: store.counts()["deferred"] == 1, "the entry deferred")
    assert sink.messages == []
    (ctx,) = seen
    (queue_id,) = relay.inbound.queued
    assert (ctx.queue_id, ctx.sender, ctx.recipients) == (queue_id, SENDER, ("bob@example.net",))
    assert ctx.destination.next_hop is not None
    assert ctx.destination.next_hop.port == sink.port
    assert ctx.mail_hosts == (f"127.0.0.1[127.0.0.1]:{sink.port}",)
    (line,) = [line for line in relay.mail_log() if line.startswith(f"{queue_id}: to=")]
    assert "status=deferred (451 4.7.0 Delivery paused" in line
    assert "deliver hook pause: pause:maintenance window" in line


@pytest_twisted.ensureDeferred
async def test_a_deliver_reroute_delivers_the_batch_via_the_new_next_hop(tmp_path, relays, sink):
    """reroute at deliver: the route's host (refusing connections) is skipped for next_hop."""

    def reroute(ctx: DeliverContext) -> Decision:
        return Decision.reroute(f"[127.0.0.1]:{sink.port}")

    relay = Relay(tmp_path, _closed_route(), {}, _deliver_hooks("detour", reroute))
    relays.append(relay)
    assert await relay.send() == {}
    (message,) = await sink.wait_for_messages(1, DEADLINE_SECONDS)
    assert list(message.recipients) == [b"bob@example.net"]
    await wait_until(
        _reactor(), lambda: not any(relay.inbound.store.counts().values()), "the queue empty"
    )
    (queue_id,) = relay.inbound.queued
    assert any(
        line.startswith(f"{queue_id}: to=") and f"relay=127.0.0.1[127.0.0.1]:{sink.port}" in line
        for line in relay.mail_log()
    )


# -- header drops and the mail log ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_dropped_header_is_missing_from_the_delivered_copy_only(tmp_path, relays, sink):
    """header_checks drop: the sink gets the message without the field; the rest is intact."""
    rule = {"header": "X-Originating-IP", "pattern": r"^192\.0\.2\.", "action": "drop"}
    plugins = {"enabled": ["header_checks"], "header_checks": {"rules": [rule]}}
    relay = Relay(tmp_path, f"[127.0.0.1]:{sink.port}", plugins)
    relays.append(relay)
    assert await relay.send() == {}
    (message,) = await sink.wait_for_messages(1, DEADLINE_SECONDS)
    assert b"X-Originating-IP" not in message.content
    assert message.content.startswith(b"Received: from ")
    assert message.content.endswith(MESSAGE.replace(b"X-Originating-IP: 192.0.2.7\r\n", b""))


@pytest_twisted.ensureDeferred
async def test_a_hook_hold_names_the_plugin_and_its_results_in_the_mail_log(tmp_path, relays, sink):
    """A data-hook hold is logged with the reason, the deciding plugin and its results."""
    rule = {"header": "Subject", "pattern": "report", "action": "hold", "reason": "review"}
    plugins = {"enabled": ["header_checks"], "header_checks": {"rules": [rule]}}
    relay = Relay(tmp_path, f"[127.0.0.1]:{sink.port}", plugins)
    relays.append(relay)
    assert await relay.send() == {}
    assert relay.inbound.queued == []  # held: not handed to delivery
    assert relay.inbound.store.counts()["hold"] == 1
    held = [line.partition(": ")[2] for line in relay.mail_log() if ": hold: " in line]
    assert held == [
        "hold: review; plugin=header_checks results=(header_checks:rule 0 hold subject)"
    ]


# -- issue 8 done-when: rate_limit + dkim_sign ------------------------------------------------


def _dkim_plugins(tmp_path: Path, key: rsa.RSAPrivateKey) -> dict[str, Any]:
    key_file = tmp_path / "dkim.pem"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return {
        "enabled": ["rate_limit", "dkim_sign"],
        "rate_limit": {
            "state_file": str(tmp_path / "rate_limit.sqlite"),
            "per_client": {"messages": 3, "window_seconds": 60},
        },
        "dkim_sign": {"domain": "example.org", "selector": "s1", "private_key": str(key_file)},
    }


def _txt_record(key: rsa.RSAPrivateKey) -> str:
    """The DKIM key record (RFC 6376 §3.6.1) publishing ``key``'s public half."""
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode("ascii")


def _dnsfunc(port: int) -> Callable[..., bytes]:
    """dkim.verify's TXT lookup, asking the DNS test server with dnspython."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = port

    def lookup(name: bytes, timeout: float = 5) -> bytes:
        answer = resolver.resolve(name.decode("ascii"), "TXT", lifetime=timeout)
        return b"".join(b"".join(rdata.strings) for rdata in answer)

    return lookup


@pytest_twisted.ensureDeferred
async def test_rate_limit_and_dkim_sign_sign_relayed_mail_and_throttle_a_flood(
    tmp_path, relays, sink
):
    """The delivered copies verify against the DNS TXT record; messages 4 and 5 get 450 4.7.1."""
    reactor = _reactor()
    # 1024 bits: the test DNS server serves a TXT value as one string (at most 255 bytes).
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    dns_server = DNSTestServer({"s1._domainkey.example.org": {"TXT": [_txt_record(key)]}})
    dns_port = dns_server.start(reactor)
    try:
        relay = Relay(tmp_path, f"[127.0.0.1]:{sink.port}", _dkim_plugins(tmp_path, key))
        relays.append(relay)
        # Fixed 60 s windows: a flood that straddles a window boundary is sent again from
        # another client address (that one starts just after the boundary).
        for source in ("127.0.0.2", "127.0.0.3"):
            window = math.floor(time.time() / 60)
            outcomes = [await relay.send(source=source) for _ in range(5)]
            if math.floor(time.time() / 60) == window:
                break
        assert outcomes[:3] == [{}, {}, {}]
        for refused in outcomes[3:]:
            assert isinstance(refused, smtplib.SMTPSenderRefused)
            assert (refused.smtp_code, refused.smtp_error.decode()) == (
                450,
                f"{replies.RATE_LIMITED.enhanced} {replies.RATE_LIMITED.text}",
            )
        assert any(
            f"reject: MAIL from [{source}]: 450 4.7.1" in line
            and "plugin=rate_limit results=(rate_limit:limit reached per_client:" in line
            for line in relay.mail_log()
        )
        messages = await sink.wait_for_messages(len(relay.inbound.queued), DEADLINE_SECONDS)
        assert len(messages) >= 3
        lookup = _dnsfunc(dns_port)
        for message in messages:
            assert message.content.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")
            # In a thread: the DNS server answers on this reactor.
            assert await threads.deferToThread(dkim.verify, message.content, dnsfunc=lookup)
        tampered = messages[0].content.replace(b"Numbers attached.", b"Numbers changed.")
        assert not await threads.deferToThread(dkim.verify, tampered, dnsfunc=lookup)
        assert dns_server.queries_for("s1._domainkey.example.org", "TXT") >= 1
    finally:
        await dns_server.stop()
