"""The delivery engine end to end in one process: queue files → DeliveryService → sinks.

Real reactor, real queue directory, SinkServer on loopback as the receiving MTA and
DNSTestServer for MX lookups. Every wait is bounded by a deadline.
"""

from __future__ import annotations

import email
import email.policy
import errno
import gc
import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import deferLater
from twisted.logger import LogEvent, Logger, LogLevel, globalLogPublisher

from twistedrelay.bench.behaviour import Action, StageContext
from twistedrelay.config import parse_config
from twistedrelay.delivery import service as delivery_service
from twistedrelay.delivery.service import DeliveryService, build_delivery_service
from twistedrelay.eventlog import MailLog
from twistedrelay.hooks import load_plugins
from twistedrelay.metrics import RelayMetrics
from twistedrelay.queue.entry import Envelope, Recipient
from twistedrelay.queue.incoming import FileSystem
from twistedrelay.queue.store import QueueStore, read_entry_metadata
from twistedrelay.smtp.replies import Reply
from twistedrelay.testing.dns_server import DNSTestServer
from twistedrelay.testing.inbound import InboundHarness
from twistedrelay.testing.sink import SinkServer, Stage, delay_at, reply_at, tempfail_times
from twistedrelay.testing.waiting import wait_until

DEADLINE_SECONDS = 10.0
SENDER = "alice@sender.test"


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class Relay:
    """A DeliveryService over a fresh queue, with the mail log captured in memory."""

    def __init__(
        self,
        tmp_path: Path,
        delivery: dict[str, Any],
        nameservers: list[str] | None = None,
        filesystem: FileSystem | None = None,
    ) -> None:
        self.reactor = _reactor()
        queue_dir = tmp_path / "queue"
        QueueStore.create(str(queue_dir))
        settings: dict[str, Any] = {
            "hostname": "relay.example.test",
            "workers": {"count": 1},
            "queue": {"directory": str(queue_dir)},
            "delivery": {
                "minimal_backoff": 1,
                "maximal_backoff": 2,
                "idle_timeout": 1,
                "queue_scan_interval": 0.2,
                "connect_timeout": 2,
                **delivery,
            },
        }
        if nameservers is not None:
            settings["dns"] = {"nameservers": nameservers, "timeout": 2}
        self.config = parse_config(settings, "<test>")
        self.store = QueueStore(str(queue_dir), self.reactor, filesystem=filesystem)
        self.log_events: list[LogEvent] = []
        self.service: DeliveryService = build_delivery_service(
            self.config,
            1,
            self.reactor,
            store=self.store,
            metrics=RelayMetrics(),
            maillog=MailLog(Logger(namespace="twistedrelay.mail", observer=self.log_events.append)),
            hooks=load_plugins(self.config.plugins, self.reactor),
        )

    async def queue(
        self, recipients: list[str], content: bytes | None = None, sender: str = SENDER
    ) -> str:
        """Queue one message durably in incoming/ and tell the service; returns its ID."""
        message = self.store.open_message()
        message.write(content if content is not None else _content(message.queue_id))
        await message.commit(
            Envelope(
                queue_id=message.queue_id,
                sender=sender,
                recipients=tuple(Recipient(r) for r in recipients),
                arrival_time=self.reactor.seconds(),
            )
        )
        self.service.notify_queued(message.queue_id)
        return message.queue_id

    async def stop(self) -> None:
        await self.service.stopService()
        self.store.close()

    def mail_log(self) -> list[str]:
        return [e["mail_line"] for e in self.log_events if "mail_line" in e]

    def deliveries(self, queue_id: str, status: str = "") -> list[str]:
        """The mail-log delivery lines of ``queue_id`` (with ``status=...`` when given)."""
        return [
            line
            for line in self.mail_log()
            if line.startswith(f"{queue_id}: to=") and f"status={status}" in line
        ]

    def queue_empty(self) -> bool:
        return not any(self.store.counts().values()) and not self.service.active


def _content(tag: str) -> bytes:
    return f"Subject: test {tag}\r\nMessage-ID: <{tag}@sender.test>\r\n\r\nbody {tag}\r\n".encode()


async def _commit_claimed(relay: Relay, owner: str) -> Any:
    """Accept one message to a@dest.test as the inbound side does: committed claimed."""
    message = relay.store.open_message()
    message.write(_content(message.queue_id))
    envelope = Envelope(
        queue_id=message.queue_id,
        sender=SENDER,
        recipients=(Recipient("a@dest.test"),),
        arrival_time=relay.reactor.seconds(),
    )
    return await relay.store.commit_claimed(message, envelope, owner)


def _route(sink: SinkServer) -> str:
    return f"[127.0.0.1]:{sink.port}"


@pytest_twisted.ensureDeferred
async def test_each_recipient_delivered_once_over_reused_connections(tmp_path: Path) -> None:
    """20 messages × 2 recipients: 20 transactions with both over one reused connection."""
    sink = SinkServer(_reactor())
    sink.start()
    # One connection at a time and a long idle timeout, so reuse is exact whatever the
    # machine's load (with slow start, parallel connections would be legitimate).
    relay = Relay(
        tmp_path,
        {"routes": {"*": _route(sink)}, "destination_concurrency": 1, "idle_timeout": 30},
    )
    relay.service.startService()
    try:
        queued = [await relay.queue(["a@dest.test", "b@dest.test"]) for _ in range(20)]
        await sink.wait_for_messages(20, DEADLINE_SECONDS)
        await wait_until(_reactor(), relay.queue_empty, "queue empty")
        assert len(sink.messages) == 20
        assert sink.stats.transactions == 20
        for message in sink.messages:
            assert sorted(message.recipients) == [b"a@dest.test", b"b@dest.test"]
        subjects = sorted(m.content.split(b"\r\n")[0] for m in sink.messages)
        assert subjects == sorted(f"Subject: test {q}".encode() for q in queued)
        assert sink.stats.connections_total == 1
    finally:
        await relay.stop()
        await sink.stop()


@pytest_twisted.ensureDeferred
async def test_mail_committed_claimed_is_delivered_and_released_when_stopping(
    tmp_path: Path,
) -> None:
    """owner_for_new/claimed_new: an entry committed into active/w1/ is delivered and removed;
    once stopping, the service declines new claims and gives a late one back to incoming/."""
    sink = SinkServer(_reactor())
    sink.start()
    relay = Relay(tmp_path, {"routes": {"*": _route(sink)}})
    relay.service.startService()

    async def commit_claimed() -> Any:
        return await _commit_claimed(relay, relay.service.owner_for_new() or "w1")

    try:
        assert relay.service.owner_for_new() == "w1"
        entry = await commit_claimed()
        assert entry.content is not None
        relay.service.claimed_new(entry)
        assert relay.service.content_in_memory == len(entry.content)
        (message,) = await sink.wait_for_messages(1, DEADLINE_SECONDS)
        assert message.content == entry.content
        await wait_until(_reactor(), relay.queue_empty, "queue empty")
        assert relay.deliveries(entry.queue_id, "sent")
        assert relay.service.content_in_memory == 0
        await relay.service.stopService()
        assert relay.service.owner_for_new() is None
        late = await commit_claimed()
        relay.service.claimed_new(late)
        assert relay.store.scan_incoming() == [late.queue_id]
    finally:
        relay.store.close()
        await sink.stop()


@pytest_twisted.ensureDeferred
async def test_content_in_memory_is_bounded_by_its_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past CONTENT_IN_MEMORY_BUDGET a new claim keeps no content: delivery reads the file."""
    monkeypatch.setattr(delivery_service, "CONTENT_IN_MEMORY_BUDGET", 1)
    sink = SinkServer(_reactor())
    sink.start()
    relay = Relay(tmp_path, {"routes": {"*": _route(sink)}})
    relay.service.startService()
    try:
        entry = await _commit_claimed(relay, "w1")
        relay.service.claimed_new(entry)
        assert relay.service.content_in_memory == 0
        assert relay.service.active[entry.queue_id].claimed.content is None
        (received,) = await sink.wait_for_messages(1, DEADLINE_SECONDS)
        assert received.content == entry.content
        await wait_until(_reactor(), relay.queue_empty, "queue empty")
    finally:
        await relay.stop()
        await sink.stop()


@pytest_twisted.ensureDeferred
async def test_destination_concurrency_caps_connections(tmp_path: Path) -> None:
    """destination_concurrency=2 with a slow sink: never more than 2 connections at once."""
    sink = SinkServer(_reactor(), script=delay_at(Stage.MESSAGE, 0.2))
    sink.start()
    relay = Relay(tmp_path, {"routes": {"*": _route(sink)}, "destination_concurrency": 2})
    relay.service.startService()
    try:
        for _ in range(10):
            await relay.queue(["a@dest.test"])
        await sink.wait_for_messages(10, DEADLINE_SECONDS)
        await wait_until(_reactor(), relay.queue_empty, "queue empty")
        # The window grew to the cap (slow start) and never beyond it.
        assert sink.stats.connections_max_concurrent == 2
        assert len(sink.messages) == 10
    finally:
        await relay.stop()
        await sink.stop()


@pytest_twisted.ensureDeferred
async def test_tempfail_is_deferred_then_delivered_once(tmp_path: Path) -> None:
    """A 451 at end of data defers the entry with a next attempt; a later scan delivers it."""
    sink = SinkServer(_reactor(), script=tempfail_times(1))
    sink.start()
    relay = Relay(tmp_path, {"routes": {"*": _route(sink)}})
    relay.service.startService()
    try:
        queue_id = await relay.queue(["a@dest.test"])
        await wait_until(
            _reactor(), lambda: relay.store.counts()["deferred"] == 1, "entry deferred"
        )
        ((deferred_id, next_attempt_at),) = relay.store.scan_deferred()
        assert deferred_id == queue_id
        assert next_attempt_at > relay.reactor.seconds()
        assert sink.messages == []
        await sink.wait_for_messages(1, DEADLINE_SECONDS)
        await wait_until(_reactor(), relay.queue_empty, "queue empty")
        assert len(sink.messages) == 1
        assert sink.stats.refusals.get(451) == 1
        log = relay.mail_log()
        assert any(f"{queue_id}: " in line and "status=deferred" in line for line in log)
        assert any(f"{queue_id}: " in line and "status=sent" in line for line in log)
    finally:
        await relay.stop()
        await sink.stop()


class FullDiskSyncs(FileSystem):
    """fsync fails with ENOSPC ``failures`` times once armed (the seam of the store's writes)."""

    def __init__(self) -> None:
        self.failures = 0

    def sync_file(self, fd: int) -> None:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        super().sync_file(fd)


@pytest_twisted.ensureDeferred
async def test_a_deferral_that_cannot_be_recorded_is_recorded_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk when the deferral is written leaves the entry claimed, not stuck: the
    record is tried again, and once it is written the entry is deferred and then delivered
    (exactly once: the round is not delivered again)."""
    monkeypatch.setattr(delivery_service, "RECORD_RETRY_SECONDS", 0.2)
    filesystem = FullDiskSyncs()
    sink = SinkServer(_reactor(), script=tempfail_times(1))
    sink.start()
    relay = Relay(tmp_path, {"routes": {"*": _route(sink)}}, filesystem=filesystem)
    relay.service.startService()
    try:
        message = relay.store.open_message()
        message.write(_content(message.queue_id))
        await message.commit(
            Envelope(message.queue_id, SENDER, (Recipient("a@dest.test"),), relay.reactor.seconds())
        )
        filesystem.failures = 2  # the first two status writes of the deferral
        relay.service.notify_queued(message.queue_id)
        await sink.wait_for_messages(1, DEADLINE_SECONDS)
        await wait_until(_reactor(), relay.queue_empty, "queue empty")
        assert filesystem.failures == 0
        assert len(sink.messages) == 1 and sink.stats.refusals.get(451) == 1
        assert len(relay.deliveries(message.queue_id, "deferred")) == 1
    finally:
        await relay.stop()
        await sink.stop()


@pytest_twisted.ensureDeferred
async def test_a_bounce_whose_dsn_cannot_be_queued_yet_gets_one_dsn_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk when the DSN is queued: the entry stays claimed, the DSN is queued on
    the next try, once, and the entry is removed."""
    monkeypatch.setattr(delivery_service, "RECORD_RETRY_SECONDS", 0.2)
    filesystem = FullDiskSyncs()
    sink = SinkServer(_reactor())
    sink.start()
    relay = Relay(tmp_path, {"routes": {"*": _route(sink)}}, filesystem=filesystem)
    relay.service.startService()
    try:
        queue_id = await relay.queue(["reject-me@dest.test"])
        filesystem.failures = 1  # the DSN's commit
        await wait_until(_reactor(), relay.queue_empty, "queue empty")
        (dsn,) = await sink.wait_for_messages(1, DEADLINE_SECONDS)
        await deferLater(relay.reactor, 0.3, lambda: None)
        assert filesystem.failures == 0
        assert dsn.sender == b"" and len(sink.messages) == 1
        assert len(relay.deliveries(queue_id, "bounced")) == 1
    finally:
        await relay.stop()
        await sink.stop()


@pytest_twisted.ensureDeferred
async def test_a_destination_back_up_gets_its_mail_within_maximal_backoff(tmp_path: Path) -> None:
    """A refused connection marks the destination dead, but for no longer than the retry
    backoff (here 1 s growing to 2 s): once it listens again the mail goes out in seconds,
    not after the scheduler's 60 s default."""
    reactor = _reactor()
    probe = SinkServer(reactor)
    port = probe.start()
    await probe.stop()  # nothing listens on the port now: connections are refused
    relay = Relay(tmp_path, {"routes": {"*": f"[127.0.0.1]:{port}"}})
    relay.service.startService()
    sink = SinkServer(reactor)
    try:
        queue_id = await relay.queue(["a@dest.test"])
        await wait_until(reactor, lambda: relay.deliveries(queue_id, "deferred"), "refused")
        destination = relay.service.routes.destination_for("dest.test").name
        assert relay.service.scheduler.is_dead(destination, reactor.seconds())
        # Mail for it meanwhile is deferred untried, and the log says so.
        untried = await relay.queue(["b@dest.test"])
        await wait_until(reactor, lambda: relay.deliveries(untried, "deferred"), "deferred")
        (line,) = relay.deliveries(untried)
        assert "relay=none" in line and "(delivery temporarily suspended: " in line, line
        sink.start(port=port)
        await sink.wait_for_messages(2, DEADLINE_SECONDS)
        await wait_until(reactor, relay.queue_empty, "queue empty")
    finally:
        await relay.stop()
        await sink.stop()


@pytest_twisted.ensureDeferred
async def test_a_250_to_data_is_not_taken_for_a_delivery(tmp_path: Path) -> None:
    """A host that answers DATA with 250 got no content: the message is deferred (not
    removed as delivered, which would lose it) and delivered on the next try."""
    sink = SinkServer(
        _reactor(), chunking=False, script=reply_at(Stage.DATA, Reply(250, "2.0.0", "ok"), 1)
    )
    sink.start()
    relay = Relay(tmp_path, {"routes": {"*": _route(sink)}})
    relay.service.startService()
    try:
        queue_id = await relay.queue(["a@dest.test"])
        (message,) = await sink.wait_for_messages(1, DEADLINE_SECONDS)
        assert message.recipients == (b"a@dest.test",)
        await wait_until(_reactor(), relay.queue_empty, "queue empty")
        (deferred,) = relay.deliveries(queue_id, "deferred")
        assert "Unexpected reply from mail host: 250 2.0.0 ok" in deferred, deferred
        assert len(relay.deliveries(queue_id, "sent")) == 1
    finally:
        await relay.stop()
        await sink.stop()


@pytest_twisted.ensureDeferred
async def test_a_host_that_closes_mid_transaction_is_not_reset_for_reuse(tmp_path: Path) -> None:
    """A 421 to RCPT and a close: the recipient is deferred and the connection dropped, with
    no error logged (no RSET tried on a session that failed before its close was seen)."""

    def busy_once(ctx: StageContext) -> Action | None:
        if ctx.stage is Stage.RCPT and ctx.transaction_number == 1:
            return Action(Reply(421, "4.3.2", "busy"), close_after=True)
        return None

    errors: list[LogEvent] = []

    def observe(event: LogEvent) -> None:
        if event.get("log_level") in (LogLevel.error, LogLevel.critical):
            errors.append(event)

    globalLogPublisher.addObserver(observe)
    sink = SinkServer(_reactor(), script=busy_once)
    sink.start()
    relay = Relay(tmp_path, {"routes": {"*": _route(sink)}})
    relay.service.startService()
    try:
        queue_id = await relay.queue(["a@dest.test"])
        await sink.wait_for_messages(1, DEADLINE_SECONDS)
        await wait_until(_reactor(), relay.queue_empty, "queue empty")
        (deferred,) = relay.deliveries(queue_id, "deferred")
        assert "421 4.3.2 busy" in deferred
        gc.collect()  # an orphaned failed Deferred would be reported now
        await deferLater(relay.reactor, 0, lambda: None)
    finally:
        globalLogPublisher.removeObserver(observe)
        await relay.stop()
        await sink.stop()
    assert errors == []


@pytest_twisted.ensureDeferred
async def test_rejected_recipient_gets_dsn_and_bounce_gets_none(tmp_path: Path) -> None:
    """A 5xx recipient produces a multipart/report DSN to the sender; a null-sender bounce none."""
    sink = SinkServer(_reactor())
    sink.start()
    relay = Relay(tmp_path, {"routes": {"*": _route(sink)}})
    relay.service.startService()
    try:
        queue_id = await relay.queue(["ok@dest.test", "reject-me@dest.test"])
        messages = await sink.wait_for_messages(2, DEADLINE_SECONDS)
        await wait_until(_reactor(), relay.queue_empty, "queue empty")
        original, dsn = sorted(messages, key=lambda m: m.sender == b"")
        assert original.recipients == (b"ok@dest.test",)
        assert dsn.sender == b""
        assert dsn.recipients == (SENDER.encode(),)
        report = email.message_from_bytes(dsn.content, policy=email.policy.compat32)
        assert report.get_content_type() == "multipart/report"
        assert report.get_param("report-type") == "delivery-status"
        (status_part,) = [
            p for p in report.walk() if p.get_content_type() == "message/delivery-status"
        ]
        fields = _status_fields(status_part)
        assert fields["final-recipient"].lower() == "rfc822; reject-me@dest.test"
        assert fields["action"] == "failed"
        assert fields["status"].startswith("5.")
        assert fields["diagnostic-code"].lower().startswith("smtp; 5")
        assert any(f"{queue_id}: " in line and "non-delivery" in line for line in relay.mail_log())

        # The null sender: bounced, no DSN (RFC 5321 §4.5.5).
        before = len(sink.messages)
        bounce_id = await relay.queue(["reject-again@dest.test"], sender="")
        await wait_until(
            _reactor(),
            lambda: any(
                f"{bounce_id}: " in line and "status=bounced" in line for line in relay.mail_log()
            ),
            "null-sender message bounced",
        )
        await wait_until(_reactor(), relay.queue_empty, "queue empty")
        await deferLater(relay.reactor, 0.3, lambda: None)
        assert len(sink.messages) == before
        assert not any(
            f"{bounce_id}: " in line and "non-delivery" in line for line in relay.mail_log()
        )
        assert relay.queue_empty()
    finally:
        await relay.stop()
        await sink.stop()


def _status_fields(part: Any) -> dict[str, str]:
    """The per-recipient fields of a message/delivery-status part (RFC 3464 §2.3)."""
    blocks = part.get_payload()
    per_recipient = blocks[1] if len(blocks) > 1 else blocks[0]
    return {k.lower(): " ".join(v.split()) for k, v in per_recipient.items()}


@pytest_twisted.ensureDeferred
async def test_null_mx_and_nxdomain_bounce_and_mx_failover(tmp_path: Path) -> None:
    """Null MX bounces 5.1.10 unconnected, NXDOMAIN 5.1.2 with a DSN, a refused MX fails over."""
    reactor = _reactor()
    sink = SinkServer(reactor)
    port = sink.start()
    dns = DNSTestServer(
        {
            "nullmx.test": {"MX": [[0, "."]]},
            "failover.test": {"MX": [[10, "mx1.failover.test"], [20, "mx2.failover.test"]]},
            "mx1.failover.test": {"A": ["127.0.0.2"]},
            "mx2.failover.test": {"A": ["127.0.0.1"]},
        }
    )
    dns_port = dns.start(reactor)
    relay = Relay(
        tmp_path,
        {"smtp_port": port, "routes": {"sender.test": _route(sink)}},
        nameservers=[f"127.0.0.1:{dns_port}"],
    )
    relay.service.startService()
    try:
        null_id = await relay.queue(["x@nullmx.test"])
        await wait_until(
            _reactor(),
            lambda: relay.deliveries(null_id, "bounced"),
            "null MX bounced",
        )
        (line,) = relay.deliveries(null_id)
        assert "relay=none" in line and "dsn=5.1.10" in line
        # The only connection is the one that delivers the DSN to the sender's route.
        dsn = (await sink.wait_for_messages(1, DEADLINE_SECONDS))[0]
        assert dsn.sender == b"" and dsn.recipients == (SENDER.encode(),)
        assert b"5.1.10" in dsn.content
        assert sink.stats.connections_total == 1

        nx_id = await relay.queue(["x@nowhere.test"])
        await wait_until(
            _reactor(),
            lambda: relay.deliveries(nx_id, "bounced"),
            "NXDOMAIN bounced",
        )
        (line,) = relay.deliveries(nx_id)
        assert "dsn=5.1.2" in line
        messages = await sink.wait_for_messages(2, DEADLINE_SECONDS)
        assert messages[1].sender == b"" and b"5.1.2" in messages[1].content

        failover_id = await relay.queue(["x@failover.test"])
        messages = await sink.wait_for_messages(3, DEADLINE_SECONDS)
        assert messages[2].recipients == (b"x@failover.test",)
        await wait_until(
            _reactor(),
            lambda: relay.deliveries(failover_id),
            "failover delivery logged",
        )
        (line,) = relay.deliveries(failover_id)
        assert "status=sent" in line and "mx2.failover.test" in line
        await wait_until(_reactor(), relay.queue_empty, "queue empty")
    finally:
        await relay.stop()
        await dns.stop()
        await sink.stop()


@pytest_twisted.ensureDeferred
async def test_reload_with_new_nameservers_resolves_with_them(tmp_path: Path) -> None:
    """SIGHUP's new [dns] nameservers answer the next lookup; the old ones' cache is gone."""
    reactor = _reactor()
    sink = SinkServer(reactor)
    port = sink.start()
    old_dns = DNSTestServer({"moved.test": {"MX": [[0, "."]]}})  # null MX: would bounce
    new_dns = DNSTestServer({"moved.test": {"A": ["127.0.0.1"]}})
    old_port, new_port = old_dns.start(reactor), new_dns.start(reactor)
    relay = Relay(
        tmp_path,
        {"smtp_port": port, "routes": {"sender.test": _route(sink)}},
        nameservers=[f"127.0.0.1:{old_port}"],
    )
    relay.service.startService()
    try:
        bounced = await relay.queue(["x@moved.test"])
        await wait_until(reactor, lambda: relay.deliveries(bounced, "bounced"), "null MX bounced")
        relay.service.reload_config(
            parse_config(
                {
                    "hostname": relay.config.hostname,
                    "queue": {"directory": str(relay.config.queue.directory)},
                    "delivery": {"smtp_port": port, "routes": {"sender.test": _route(sink)}},
                    "dns": {"nameservers": [f"127.0.0.1:{new_port}"], "timeout": 2},
                },
                "<test>",
            )
        )
        sent = await relay.queue(["y@moved.test"])
        await wait_until(reactor, lambda: relay.deliveries(sent, "sent"), "delivered by A")
        assert new_dns.queries_for("moved.test", "MX") == 1
        assert old_dns.queries_for("moved.test", "MX") == 1
    finally:
        await relay.stop()
        await old_dns.stop()
        await new_dns.stop()
        await sink.stop()


@pytest_twisted.ensureDeferred
async def test_a_host_that_greets_with_554_is_skipped_for_the_next_mx(tmp_path: Path) -> None:
    """As Postfix's smtp_skip_5xx_greeting: the next MX gets the mail; with none left the
    mail would be deferred, never bounced for a host that would not talk."""
    reactor = _reactor()
    refusing = SinkServer(
        reactor, script=reply_at(Stage.CONNECT, Reply(554, "5.7.1", "not talking to you"))
    )
    port = refusing.start(interface="127.0.0.2")
    sink = SinkServer(reactor)
    sink.start(interface="127.0.0.1", port=port)
    dns = DNSTestServer(
        {
            "skip.test": {"MX": [[10, "mx1.skip.test"], [20, "mx2.skip.test"]]},
            "mx1.skip.test": {"A": ["127.0.0.2"]},
            "mx2.skip.test": {"A": ["127.0.0.1"]},
        }
    )
    dns_port = dns.start(reactor)
    relay = Relay(tmp_path, {"smtp_port": port}, nameservers=[f"127.0.0.1:{dns_port}"])
    relay.service.startService()
    try:
        queue_id = await relay.queue(["x@skip.test"])
        (message,) = await sink.wait_for_messages(1, DEADLINE_SECONDS)
        assert message.recipients == (b"x@skip.test",)
        await wait_until(reactor, lambda: relay.deliveries(queue_id, "sent"), "sent")
        (line,) = relay.deliveries(queue_id)
        assert "mx2.skip.test" in line
        assert refusing.messages == []
    finally:
        await relay.stop()
        await dns.stop()
        await sink.stop()
        await refusing.stop()


@pytest_twisted.ensureDeferred
async def test_a_reused_connection_lost_before_any_answer_is_replaced_at_once(
    tmp_path: Path,
) -> None:
    """The host hangs up at the second message's MAIL on a reused connection: the message
    goes on a new connection straight away, not deferred for a backoff."""

    def hang_up_at_second_mail(ctx: StageContext) -> Action | None:
        if ctx.stage is Stage.MAIL and ctx.transaction_number == 2:
            return Action(hang_up=True)
        return None

    sink = SinkServer(_reactor(), script=hang_up_at_second_mail)
    sink.start()
    relay = Relay(tmp_path, {"routes": {"*": _route(sink)}, "idle_timeout": 30})
    relay.service.startService()
    try:
        first = await relay.queue(["a@dest.test"])
        await sink.wait_for_messages(1, DEADLINE_SECONDS)
        await wait_until(_reactor(), lambda: relay.deliveries(first, "sent"), "first sent")
        second = await relay.queue(["b@dest.test"])
        await sink.wait_for_messages(2, DEADLINE_SECONDS)
        await wait_until(_reactor(), lambda: relay.deliveries(second, "sent"), "second sent")
        assert relay.deliveries(second, "deferred") == []
        assert sink.stats.connections_total == 2
    finally:
        await relay.stop()
        await sink.stop()


@pytest_twisted.ensureDeferred
async def test_three_domains_share_one_entry(tmp_path: Path) -> None:
    """One message to three routed domains: each sink gets it once; one file, removed at the end."""
    reactor = _reactor()
    sinks = [SinkServer(reactor, script=delay_at(Stage.MESSAGE, 0.3)) for _ in range(3)]
    for sink in sinks:
        sink.start()
    routes = {f"d{i}.test": _route(sink) for i, sink in enumerate(sinks, 1)}
    relay = Relay(tmp_path, {"routes": routes})
    relay.service.startService()
    try:
        queue_id = await relay.queue(["a@d1.test", "b@d2.test", "c@d3.test"])
        await wait_until(
            _reactor(), lambda: all(s.stats.transactions for s in sinks), "three transactions"
        )
        # While the three jobs run, the body is stored once.
        entry_files = [f for _, _, files in os.walk(relay.config.queue.directory) for f in files]
        assert [f for f in entry_files if queue_id in f] == [queue_id]
        for sink, address in zip(sinks, [b"a@d1.test", b"b@d2.test", b"c@d3.test"], strict=True):
            (message,) = await sink.wait_for_messages(1, DEADLINE_SECONDS)
            assert message.recipients == (address,)
        await wait_until(_reactor(), relay.queue_empty, "queue empty")
        await deferLater(reactor, 0.3, lambda: None)
        assert [len(s.messages) for s in sinks] == [1, 1, 1]
    finally:
        await relay.stop()
        for sink in sinks:
            await sink.stop()


def _pad_to(content: bytearray, offset: int) -> None:
    """Append short 'x' lines so that the next line starts exactly at ``offset``."""
    while len(content) < offset:
        room = offset - len(content)
        length = min(room, 500) if room - 500 >= 3 or room <= 500 else room - 3
        content += b"x" * (length - 2) + b"\r\n"
    assert len(content) == offset


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    ("offered", "enabled"),
    [(False, True), (True, True), (True, False)],
    ids=["DATA", "BDAT", "BDAT turned off"],
)
async def test_leading_dots_at_chunk_boundaries_arrive_intact(
    tmp_path: Path, offered: bool, enabled: bool
) -> None:
    """Lines starting with '.' at 16 KiB, 64 KiB and after a CR|LF split arrive unchanged,
    dot-stuffed with DATA, as they are with BDAT (a host offering CHUNKING, and
    delivery.chunking on)."""
    content = bytearray(b"Subject: dots\r\n\r\n")
    _pad_to(content, 16 * 1024)
    content += b".dot at 16 KiB\r\n"
    _pad_to(content, 64 * 1024)
    content += b".\r\n"  # a lone dot: unstuffed it would end DATA early
    _pad_to(content, 128 * 1024 + 1)  # the 64 KiB chunk ends between CR and LF
    content += b"..two dots after a split CRLF\r\n"
    content += b"last line\r\n"
    sink = SinkServer(_reactor(), chunking=offered)
    sink.start()
    relay = Relay(tmp_path, {"routes": {"*": _route(sink)}, "chunking": enabled})
    relay.service.startService()
    try:
        await relay.queue(["a@dest.test"], bytes(content))
        (message,) = await sink.wait_for_messages(1, DEADLINE_SECONDS)
        assert message.content == bytes(content)
        assert sink.stats.messages_bdat == (1 if offered and enabled else 0)
        await wait_until(_reactor(), relay.queue_empty, "queue empty")
    finally:
        await relay.stop()
        await sink.stop()


@pytest_twisted.ensureDeferred
async def test_relay_to_relay_hands_each_message_over_with_bdat(tmp_path: Path) -> None:
    """Our delivery client and our inbound server agree on CHUNKING (RFC 3030): a receiving
    twistedrelay gets every message with BDAT (it never says 354) and stores the content
    byte for byte after its own Received header."""
    receiver = InboundHarness(_reactor(), tmp_path / "receiver")
    port = receiver.start()
    relay = Relay(tmp_path, {"routes": {"*": f"[127.0.0.1]:{port}"}})
    relay.service.startService()
    try:
        sent = set()
        for number in range(5):
            # The last line has 1,000 octets with its CRLF: the most RFC 5321 allows.
            content = b"Subject: relayed %d\r\n\r\n.dot line\r\n" % number + b"x" * 998 + b"\r\n"
            await relay.queue(["a@dest.test"], content)
            sent.add(content)
        await wait_until(_reactor(), lambda: len(receiver.queued) == 5, "5 messages received")
        await wait_until(_reactor(), relay.queue_empty, "queue empty")
        stored = set()
        for queue_id in receiver.queued:
            path = receiver.store.layout.entry_path("incoming", queue_id)
            _, content_size = read_entry_metadata(path)
            with open(path, "rb") as file:
                content = file.read(content_size)
            assert content.startswith(b"Received: from relay.example.test")
            stored.add(content[content.index(b"Subject: ") :])
        assert stored == sent
        replies_by_class = {
            reply_class: receiver.metrics.registry.get_sample_value(
                "twistedrelay_smtp_replies_total", {"class": reply_class}
            )
            for reply_class in ("2xx", "3xx")
        }
        assert replies_by_class["3xx"] == 0 and replies_by_class["2xx"] > 0, replies_by_class
    finally:
        await relay.stop()
        await receiver.stop()
