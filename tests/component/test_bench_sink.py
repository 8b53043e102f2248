"""The bench sink (and its test wrapper SinkServer) over loopback on the real reactor."""

from __future__ import annotations

import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from twistedrelay.bench.behaviour import Faults, Stage
from twistedrelay.bench.sink_server import SinkConfig, SinkFactory
from twistedrelay.smtp.replies import Reply
from twistedrelay.testing.sink import (
    SinkServer,
    delay_at,
    first_of,
    hang_up_at,
    reply_at,
    tempfail_times,
)

TRANSACTION = (
    b"EHLO client.example.test\r\n"
    b"MAIL FROM:<sender@example.org> SIZE=100\r\n"
    b"RCPT TO:<one@example.net>\r\n"
    b"RCPT TO:<two@example.net>\r\n"
    b"DATA\r\n"
    b"Subject: hi\r\nX-Sequence: 7\r\n\r\n"
    b"..leading dot\r\nbody\r\n.\r\n"
)


@pytest.fixture
def reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class _Conversation(protocol.Protocol):
    """Writes a script of bytes and collects everything the server says until it closes."""

    def __init__(self, payload: bytes, done: defer.Deferred[bytes]) -> None:
        self.payload = payload
        self.done = done
        self.received = b""

    def connectionMade(self) -> None:
        self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(self.received)


async def converse(reactor: Any, port: int, payload: bytes, timeout: float = 10.0) -> bytes:
    """Connect, send ``payload`` in one write, and return all replies once the server closes."""
    done: defer.Deferred[bytes] = defer.Deferred()
    factory = protocol.ClientFactory()
    factory.protocol = lambda: _Conversation(payload, done)  # type: ignore[assignment]
    connector = reactor.connectTCP("127.0.0.1", port, factory)
    timer = reactor.callLater(timeout, connector.disconnect)
    received = await done
    if timer.active():
        timer.cancel()
    return received


def feed_in_pieces(payload: bytes, chunk_size: int) -> tuple[SinkFactory, StringTransport]:
    """A recording sink fed ``payload`` in reads of ``chunk_size`` bytes, without sockets."""
    factory = SinkFactory(Clock(), SinkConfig(record=True))
    sink_protocol = factory.buildProtocol(None)
    transport = StringTransport()
    sink_protocol.makeConnection(transport)
    for start in range(0, len(payload), chunk_size):
        sink_protocol.dataReceived(payload[start : start + chunk_size])
    return factory, transport


def codes(replies: bytes) -> list[int]:
    """The codes of the final lines of every reply."""
    return [int(line[:3]) for line in replies.split(b"\r\n") if line[3:4] == b" "]


@pytest_twisted.ensureDeferred
async def test_pipelined_transaction_is_recorded_dot_unstuffed(reactor):
    """A pipelined transaction gets one reply per command and is recorded dot-unstuffed."""
    sink = SinkServer(reactor)
    port = sink.start()
    try:
        replies = await converse(reactor, port, TRANSACTION + b"QUIT\r\n")
    finally:
        await sink.stop()
    assert codes(replies) == [220, 250, 250, 250, 250, 354, 250, 221]
    assert b"250-PIPELINING" in replies and b"ENHANCEDSTATUSCODES" in replies
    [message] = sink.messages
    assert message.sender == b"sender@example.org"
    assert message.recipients == (b"one@example.net", b"two@example.net")
    assert message.content == b"Subject: hi\r\nX-Sequence: 7\r\n\r\n.leading dot\r\nbody\r\n"
    assert message.helo == b"client.example.test"
    assert sink.stats.messages == 1 and sink.stats.recipients == 2
    assert sink.stats.bytes == len(b"Subject: hi\r\nX-Sequence: 7\r\n\r\n..leading dot\r\nbody\r\n")


def test_data_is_found_whatever_the_chunk_boundaries():
    """Two messages arrive identical however the bytes are split (1 byte up to all at once)."""
    payload = (
        TRANSACTION
        + b"MAIL FROM:<>\r\nRCPT TO:<x@example.net>\r\nDATA\r\n.\r\n"
        + b"MAIL FROM:<a@b>\r\nRCPT TO:<y@example.net>\r\nDATA\r\n\r\n.x\r\n.\r\nQUIT\r\n"
    )
    expected = None
    for chunk_size in (*range(1, 12), 17, 64, len(payload)):
        factory, transport = feed_in_pieces(payload, chunk_size)
        got = [(m.sender, m.recipients, m.content) for m in factory.messages]
        assert codes(transport.value())[-1] == 221, chunk_size
        if expected is None:
            expected = got
        assert got == expected, chunk_size
    assert expected is not None and len(expected) == 3
    assert expected[1][2] == b""
    assert expected[2][2] == b"\r\nx\r\n"


BDAT_SESSION = (
    b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n"
    b"BDAT 12\r\n.dot\r\nline\r\n"  # two chunks: the octets as they are
    b"BDAT 8 LAST\r\n.\r\nend\r\n"
    b"MAIL FROM:<e@f>\r\nBDAT 5 LAST\r\nhello"  # no RCPT: refused, octets skipped
    b"RCPT TO:<g@h>\r\nMAIL FROM:<i@j>\r\nRCPT TO:<k@l>\r\nBDAT 0 LAST\r\n"
    b"BDAT x\r\nQUIT\r\n"
)


def test_bdat_chunks_are_recorded_as_sent_whatever_the_read_boundaries():
    """CHUNKING (RFC 3030): chunks are joined without dot-unstuffing; a BDAT without RCPT is
    refused after its octets; a chunk's bytes never read as commands."""
    expected_codes = [220, 250, 250, 250, 250, 250, 250, 503, 503, 250, 250, 250, 501, 221]
    for chunk_size in (*range(1, 12), 64, len(BDAT_SESSION)):
        factory, transport = feed_in_pieces(BDAT_SESSION, chunk_size)
        assert b"CHUNKING\r\n" in transport.value()
        assert codes(transport.value()) == expected_codes, chunk_size
        assert [(m.sender, m.content) for m in factory.messages] == [
            (b"a@b", b".dot\r\nline\r\n.\r\nend\r\n"),
            (b"i@j", b""),
        ], chunk_size
        assert factory.stats.messages_bdat == 2


def test_no_chunking_offers_none_and_bdat_is_unknown():
    """SinkConfig(chunking=False), ``--no-chunking``: no CHUNKING keyword, BDAT gets 500."""
    factory = SinkFactory(Clock(), SinkConfig(chunking=False))
    sink_protocol = factory.buildProtocol(None)
    transport = StringTransport()
    sink_protocol.makeConnection(transport)
    sink_protocol.dataReceived(b"EHLO x\r\nBDAT 0 LAST\r\n")
    assert b"CHUNKING" not in transport.value()
    assert codes(transport.value()) == [220, 250, 500]


def test_commands_out_of_sequence_get_bad_sequence():
    """MAIL before EHLO, RCPT before MAIL and DATA without recipients get 503."""
    factory = SinkFactory(Clock(), SinkConfig())
    sink_protocol = factory.buildProtocol(None)
    transport = StringTransport()
    sink_protocol.makeConnection(transport)
    sink_protocol.dataReceived(
        b"MAIL FROM:<a@b>\r\nEHLO x\r\nRCPT TO:<c@d>\r\nMAIL FROM:<a@b>\r\nDATA\r\nBOGUS\r\n"
    )
    assert codes(transport.value()) == [220, 503, 250, 503, 250, 503, 500]
    assert factory.stats.refusals == {503: 3, 500: 1}


@pytest_twisted.ensureDeferred
async def test_address_rules_reject_tempfail_and_drop(reactor):
    """reject*/tempfail* recipients are refused at RCPT; drop* hangs up mid-DATA."""
    sink = SinkServer(reactor)
    port = sink.start()
    try:
        refused = await converse(
            reactor,
            port,
            b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<reject1@d>\r\nRCPT TO:<tempfail@d>\r\n"
            b"RCPT TO:<ok@d>\r\nDATA\r\nhello\r\n.\r\nQUIT\r\n",
        )
        dropped = await converse(
            reactor,
            port,
            b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<drop@d>\r\nDATA\r\nhello\r\n.\r\nQUIT\r\n",
        )
    finally:
        await sink.stop()
    assert codes(refused) == [220, 250, 250, 550, 450, 250, 354, 250, 221]
    assert codes(dropped) == [220, 250, 250, 250, 354]
    assert [m.recipients for m in sink.messages] == [(b"ok@d",)]
    assert sink.stats.hang_ups == 1
    assert sink.stats.refusals == {450: 1, 550: 1}


@pytest_twisted.ensureDeferred
async def test_tempfail_first_then_accept(reactor):
    """Faults(tempfail_first=2): the first two ends of data get 451, the third is accepted."""
    sink = SinkServer(reactor, faults=Faults(tempfail_first=2))
    port = sink.start()
    one = b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nx\r\n.\r\n"
    try:
        replies = await converse(reactor, port, b"EHLO x\r\n" + one * 3 + b"QUIT\r\n")
    finally:
        await sink.stop()
    assert codes(replies)[-4:] == [250, 354, 250, 221]
    assert codes(replies).count(451) == 2
    assert len(sink.messages) == 1 and sink.stats.transactions == 3


@pytest_twisted.ensureDeferred
async def test_scripts_take_over_stages(reactor):
    """Scripts decide first (a rejection at RCPT, a hang-up mid-DATA), each as often as told."""
    sink = SinkServer(
        reactor,
        script=first_of(
            reply_at(Stage.RCPT, Reply(550, "5.7.1", "No thanks"), times=1),
            hang_up_at(Stage.DATA, times=1),
        ),
    )
    port = sink.start()
    txn = b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nx\r\n.\r\n"
    try:
        first = await converse(reactor, port, b"EHLO x\r\n" + txn + b"QUIT\r\n")
        second = await converse(reactor, port, b"EHLO x\r\n" + txn + b"QUIT\r\n")
        third = await converse(reactor, port, b"EHLO x\r\n" + txn + b"QUIT\r\n")
        sink.script = tempfail_times(1)
        fourth = await converse(reactor, port, b"EHLO x\r\n" + txn + txn + b"QUIT\r\n")
    finally:
        await sink.stop()
    assert codes(first) == [220, 250, 250, 550, 503, 500, 500, 221]
    assert codes(second) == [220, 250, 250, 250, 354]
    assert codes(third) == [220, 250, 250, 250, 354, 250, 221]
    assert codes(fourth) == [220, 250, 250, 250, 354, 451, 250, 250, 354, 250, 221]
    assert len(sink.messages) == 2
    assert sink.stats.connections_total == 4


@pytest_twisted.ensureDeferred
async def test_delayed_reply_holds_back_later_replies(reactor):
    """A slow stage delays its reply, and pipelined commands behind it wait for it."""
    sink = SinkServer(reactor, script=delay_at(Stage.MAIL, 0.3))
    port = sink.start()
    started = time.monotonic()
    try:
        replies = await converse(
            reactor,
            port,
            b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n",
        )
    finally:
        await sink.stop()
    assert time.monotonic() - started >= 0.3
    assert codes(replies) == [220, 250, 250, 250, 354, 250, 221]


@pytest_twisted.ensureDeferred
async def test_max_connections_refuses_beyond_the_cap_and_tracks_concurrency(reactor):
    """With max_connections=2, a third concurrent connection gets 421; peaks are counted."""
    sink = SinkServer(reactor, max_connections=2)
    port = sink.start()
    holders: list[Any] = []
    try:
        opened = []
        for _ in range(2):
            done: defer.Deferred[bytes] = defer.Deferred()
            endpoint_factory = protocol.ClientFactory()
            endpoint_factory.protocol = lambda d=done: _Conversation(b"EHLO x\r\n", d)
            holders.append(reactor.connectTCP("127.0.0.1", port, endpoint_factory))
            opened.append(done)
        deadline = time.monotonic() + 5
        while sink.stats.connections_current < 2 and time.monotonic() < deadline:
            await _sleep(reactor, 0.01)
        refused = await converse(reactor, port, b"")
    finally:
        await sink.stop()
    assert refused.startswith(b"421 4.7.0")
    assert sink.stats.connections_refused == 1
    assert sink.stats.connections_max_concurrent == 2
    assert sink.stats.connections_total == 3
    assert sink.stats.connections_current == 0


@pytest_twisted.ensureDeferred
async def test_sequence_header_counts_duplicates_per_recipient_and_gaps(reactor):
    """The same X-Sequence to the same recipient twice is a duplicate; gaps are missing."""
    sink = SinkServer(reactor, sequence_header="X-Sequence")
    port = sink.start()

    def txn(sequence: int, recipient: bytes) -> bytes:
        return (
            b"MAIL FROM:<a@b>\r\nRCPT TO:<" + recipient + b">\r\nDATA\r\n"
            b"X-Sequence: %d\r\n\r\nbody\r\n.\r\n" % sequence
        )

    try:
        payload = txn(1, b"r@d1") + txn(1, b"r@d2") + txn(1, b"r@d1") + txn(4, b"r@d1")
        await converse(reactor, port, b"EHLO x\r\n" + payload + b"QUIT\r\n")
    finally:
        await sink.stop()
    report = sink.stats.as_dict(reactor.seconds())["sequence"]
    assert report["unique_messages"] == 2
    assert report["duplicate_deliveries"] == 1
    assert report["missing"] == 2
    assert (report["lowest"], report["highest"]) == (1, 4)


@pytest_twisted.ensureDeferred
async def test_wait_for_messages_times_out_with_a_clear_error(reactor):
    """wait_for_messages fails after its deadline when too few messages arrived."""
    sink = SinkServer(reactor)
    sink.start()
    try:
        with pytest.raises(defer.TimeoutError, match="0 of 1 messages"):
            await sink.wait_for_messages(1, timeout_seconds=0.05)
    finally:
        await sink.stop()


@pytest_twisted.ensureDeferred
async def test_starttls_offered_and_state_reset(reactor, tmp_path):
    """With TLS options the sink offers STARTTLS, upgrades, and forgets the EHLO before it."""
    from twisted.internet import ssl

    from twistedrelay.testing.certs import make_test_certificates
    from twistedrelay.testing.sink import load_tls_options

    certificates = make_test_certificates(tmp_path)
    options = load_tls_options(certificates.server_certificate, certificates.server_key)
    sink = SinkServer(reactor, tls_options=options)
    port = sink.start()
    done: defer.Deferred[bytes] = defer.Deferred()

    class StartTLSClient(_Conversation):
        def dataReceived(self, data: bytes) -> None:
            super().dataReceived(data)
            if self.received.endswith(b"220 2.0.0 Ready to start TLS\r\n"):
                self.transport.startTLS(ssl.CertificateOptions())
                self.transport.write(
                    b"MAIL FROM:<a@b>\r\nEHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n"
                    b"DATA\r\nsecret\r\n.\r\nQUIT\r\n"
                )

    factory = protocol.ClientFactory()
    factory.protocol = lambda: StartTLSClient(b"EHLO x\r\nSTARTTLS\r\n", done)
    reactor.connectTCP("127.0.0.1", port, factory)
    try:
        replies = await done
    finally:
        await sink.stop()
    before, _, after = replies.partition(b"220 2.0.0 Ready to start TLS\r\n")
    assert b"250 STARTTLS" in before
    assert codes(after) == [503, 250, 250, 250, 354, 250, 221]
    assert b"STARTTLS" not in after
    assert sink.messages[0].content == b"secret\r\n"


async def _sleep(reactor: Any, seconds: float) -> None:
    from twisted.internet import task

    await task.deferLater(reactor, seconds, lambda: None)


def test_save_dir_writes_envelope_and_content(tmp_path):
    """--save-dir writes one file per accepted message: envelope headers, then the content."""
    factory = SinkFactory(Clock(), SinkConfig(save_dir=tmp_path))
    sink_protocol = factory.buildProtocol(None)
    sink_protocol.makeConnection(StringTransport())
    sink_protocol.dataReceived(TRANSACTION + b"QUIT\r\n")
    [saved] = list(tmp_path.iterdir())
    assert saved.suffix == ".eml"
    assert saved.read_bytes() == (
        b"X-Sink-Mail-From: <sender@example.org>\r\n"
        b"X-Sink-Rcpt-To: <one@example.net>\r\n"
        b"X-Sink-Rcpt-To: <two@example.net>\r\n"
        b"Subject: hi\r\nX-Sequence: 7\r\n\r\n.leading dot\r\nbody\r\n"
    )
    assert factory.messages == []  # saving does not mean recording
