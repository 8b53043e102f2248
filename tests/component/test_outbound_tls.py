"""Outbound TLS policy end to end: DeliveryService → SinkServer with or without STARTTLS.

``delivery.tls`` at ``may``, ``encrypt`` and ``verify`` against sinks serving the test PKI's
chain, a self-signed certificate, or no TLS at all; the delivery log's ``tls=`` says what
was used. The route ``[127.0.0.1]:PORT`` makes the MX host name 127.0.0.1, which the test
certificates name as an IP SAN.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from OpenSSL import SSL
from twisted.logger import LogEvent, Logger

from twistedrelay.bench.sink_server import SinkTLS
from twistedrelay.config import parse_config
from twistedrelay.delivery.service import DeliveryService, build_delivery_service
from twistedrelay.eventlog import MailLog
from twistedrelay.hooks import load_plugins
from twistedrelay.metrics import RelayMetrics
from twistedrelay.queue.entry import Envelope, Recipient
from twistedrelay.queue.store import QueueStore
from twistedrelay.testing.certs import TestCertificates, make_test_certificates
from twistedrelay.testing.sink import SinkServer, load_tls_options
from twistedrelay.testing.waiting import wait_until

DEADLINE_SECONDS = 10.0


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TestCertificates:
    return make_test_certificates(tmp_path_factory.mktemp("certs"))


class Relay:
    """A DeliveryService routing every domain to one sink, with the mail log in memory."""

    def __init__(self, tmp_path: Path, sink: SinkServer, delivery: dict[str, Any]) -> None:
        self.reactor = _reactor()
        queue_dir = tmp_path / "queue"
        QueueStore.create(str(queue_dir))
        config = parse_config(
            {
                "hostname": "relay.example.test",
                "queue": {"directory": str(queue_dir)},
                "delivery": {
                    "routes": {"*": f"[127.0.0.1]:{sink.port}"},
                    "minimal_backoff": 60,
                    "maximal_backoff": 60,
                    "queue_scan_interval": 60,
                    "connect_timeout": 2,
                    "command_timeout": 5,
                    **delivery,
                },
            },
            "<test>",
        )
        self.store = QueueStore(str(queue_dir), self.reactor)
        self.log_events: list[LogEvent] = []
        self.service: DeliveryService = build_delivery_service(
            config,
            1,
            self.reactor,
            store=self.store,
            metrics=RelayMetrics(),
            maillog=MailLog(Logger(namespace="twistedrelay.mail", observer=self.log_events.append)),
            hooks=load_plugins(config.plugins, self.reactor),
        )
        self.service.startService()

    async def queue(self) -> str:
        message = self.store.open_message()
        message.write(b"Subject: outbound tls\r\n\r\nbody\r\n")
        await message.commit(
            Envelope(
                queue_id=message.queue_id,
                sender="alice@sender.test",
                recipients=(Recipient("bob@dest.test"),),
                arrival_time=self.reactor.seconds(),
            )
        )
        self.service.notify_queued(message.queue_id)
        return message.queue_id

    async def delivery_line(self, queue_id: str) -> str:
        """The first mail-log delivery line of ``queue_id``, waiting for it (bounded)."""

        def line() -> str | None:
            lines = [
                e["mail_line"]
                for e in self.log_events
                if e.get("mail_line", "").startswith(f"{queue_id}: to=")
            ]
            return lines[0] if lines else None

        await wait_until(_reactor(), lambda: line() is not None, f"a delivery line for {queue_id}")
        found = line()
        assert found is not None
        return found

    async def stop(self) -> None:
        await self.service.stopService()
        self.store.close()


async def _deliver_once(
    tmp_path: Path, sink: SinkServer, delivery: dict[str, Any]
) -> tuple[str, SinkServer]:
    """Start the sink and a relay, queue one message, return its first delivery line."""
    sink.start()
    relay = Relay(tmp_path, sink, delivery)
    try:
        queue_id = await relay.queue()
        return await relay.delivery_line(queue_id), sink
    finally:
        await relay.stop()
        await sink.stop()


def _self_signed_sink(certs: TestCertificates) -> SinkServer:
    """A sink offering STARTTLS with a certificate no CA issued."""
    return SinkServer(
        _reactor(),
        tls_options=load_tls_options(certs.self_signed_certificate, certs.self_signed_key),
    )


@pytest_twisted.ensureDeferred
async def test_verify_defers_against_a_self_signed_certificate(
    tmp_path: Path, certs: TestCertificates
) -> None:
    """delivery.tls = "verify": a certificate no trusted CA issued defers; nothing is sent."""
    sink = _self_signed_sink(certs)
    line, sink = await _deliver_once(
        tmp_path, sink, {"tls": "verify", "ca_file": str(certs.ca_certificate)}
    )
    assert "status=deferred" in line, line
    assert "dsn=4.7.5" in line
    assert "TLS handshake with mail host failed: certificate verify failed" in line
    assert sink.messages == []


@pytest_twisted.ensureDeferred
async def test_verify_delivers_with_the_trusted_ca_and_logs_verified(
    tmp_path: Path, certs: TestCertificates
) -> None:
    """delivery.tls = "verify" with delivery.ca_file = the test CA: delivered, tls verified."""
    sink = SinkServer(
        _reactor(), tls_options=load_tls_options(certs.server_certificate, certs.server_key)
    )
    line, sink = await _deliver_once(
        tmp_path, sink, {"tls": "verify", "ca_file": str(certs.ca_certificate)}
    )
    assert "status=sent" in line, line
    assert ", tls=TLSv1.3 verified, " in line
    assert len(sink.messages) == 1


@pytest_twisted.ensureDeferred
async def test_verify_through_tls_policy_for_the_destination(
    tmp_path: Path, certs: TestCertificates
) -> None:
    """delivery.tls_policy raises one destination to "verify" over a "may" default."""
    sink = _self_signed_sink(certs)
    line, sink = await _deliver_once(
        tmp_path,
        sink,
        {
            "tls": "may",
            "tls_policy": {"127.0.0.1": "verify"},
            "ca_file": str(certs.ca_certificate),
        },
    )
    assert "status=deferred" in line, line
    assert sink.messages == []


@pytest_twisted.ensureDeferred
async def test_encrypt_defers_when_starttls_is_not_offered(tmp_path: Path) -> None:
    """delivery.tls = "encrypt" against a sink without STARTTLS: deferred with 4.7.4."""
    line, sink = await _deliver_once(tmp_path, SinkServer(_reactor()), {"tls": "encrypt"})
    assert "status=deferred" in line, line
    assert "dsn=4.7.4" in line
    assert sink.messages == []


@pytest_twisted.ensureDeferred
async def test_encrypt_accepts_any_certificate_and_logs_not_verified(
    tmp_path: Path, certs: TestCertificates
) -> None:
    """delivery.tls = "encrypt" takes a self-signed certificate: delivered, tls not verified."""
    sink = _self_signed_sink(certs)
    line, sink = await _deliver_once(tmp_path, sink, {"tls": "encrypt"})
    assert "status=sent" in line, line
    assert ", tls=TLSv1.3 not verified, " in line
    assert len(sink.messages) == 1


@pytest_twisted.ensureDeferred
async def test_may_delivers_in_clear_without_starttls(tmp_path: Path) -> None:
    """delivery.tls = "may" against a sink without STARTTLS: delivered in clear, tls=none."""
    line, sink = await _deliver_once(tmp_path, SinkServer(_reactor()), {"tls": "may"})
    assert "status=sent" in line, line
    assert ", tls=none, " in line
    assert len(sink.messages) == 1


@pytest_twisted.ensureDeferred
async def test_may_falls_back_to_clear_when_the_handshake_fails(
    tmp_path: Path, certs: TestCertificates
) -> None:
    """delivery.tls = "may": a host whose TLS handshake fails gets the message in clear text."""
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    # Offers STARTTLS but speaks only TLS 1.1, which the relay's client refuses.
    context.set_max_proto_version(SSL.TLS1_1_VERSION)
    context.use_certificate_chain_file(str(certs.server_certificate))
    context.use_privatekey_file(str(certs.server_key))
    sink = SinkServer(_reactor(), tls_options=SinkTLS(context))
    line, sink = await _deliver_once(tmp_path, sink, {"tls": "may"})
    assert "status=sent" in line, line
    assert ", tls=none, " in line
    assert len(sink.messages) == 1
