"""The inbound server end to end in one process: real reactor, loopback, real queue files."""

from __future__ import annotations

import os
import smtplib
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, threads

from twistedrelay.queue.store import read_entry_metadata
from twistedrelay.smtp import replies
from twistedrelay.testing.inbound import InboundHarness


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def _send(port: int, sender: str, recipients: list[str], message: bytes, **kw: Any) -> Any:
    with smtplib.SMTP("127.0.0.1", port, timeout=10, **kw) as client:
        return client.sendmail(sender, recipients, message)


def _chat(port: int, lines: list[bytes], source: str = "127.0.0.1") -> bytes:
    """Send raw lines in one write, then read until the server closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0)) as s:
        s.recv(1024)
        s.sendall(b"".join(lines))
        s.settimeout(1.0)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except TimeoutError:
            pass
        return out


def _chat_then_shut(port: int, data: bytes) -> bytes:
    """Send ``data``, shut the sending side (as ``nc -N`` does), read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


@pytest.fixture
def harness(tmp_path: Path) -> Any:
    h = InboundHarness(_reactor(), tmp_path, {"relay": {"domains": ["example.org"]}})
    h.port = h.start()
    yield h
    pytest_twisted.blockon(defer.ensureDeferred(h.stop()))


@pytest_twisted.ensureDeferred
async def test_smtplib_message_is_queued_with_envelope(harness: Any) -> None:
    """A message from smtplib lands in incoming/ with its envelope and a Received header."""
    message = b"Subject: hello\r\n\r\nbody line\r\n.leading dot\r\n"
    refused = await threads.deferToThread(
        _send, harness.port, "alice@example.org", ["bob@example.net"], message
    )
    assert refused == {}
    (queue_id,) = harness.queued
    path = harness.store.layout.entry_path("incoming", queue_id)
    envelope, content_size = read_entry_metadata(path)
    assert envelope.sender == "alice@example.org"
    assert [r.address for r in envelope.recipients] == ["bob@example.net"]
    assert envelope.client_address == "127.0.0.1"
    with open(path, "rb") as f:
        content = f.read(content_size)
    assert content.startswith(b"Received: from ")
    assert f"id {queue_id}".encode() in content
    assert content.endswith(b"Subject: hello\r\n\r\nbody line\r\n.leading dot\r\n")
    assert any(
        line.startswith(f"{queue_id}: ") and "from=<alice@example.org>" in line
        for line in harness.mail_log()
    )


class _Claims:
    """A delivery side that takes new mail claimed at commit (as DeliveryService does)."""

    def __init__(self, owner: str | None) -> None:
        self.owner = owner
        self.claimed: list[Any] = []

    def owner_for_new(self) -> str | None:
        return self.owner

    def claimed_new(self, claimed: Any) -> None:
        self.claimed.append(claimed)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("owner", ["w0", None])
async def test_new_mail_is_committed_claimed_when_delivery_takes_it(
    harness: Any, owner: str | None
) -> None:
    """With new_claims, the 250'd entry is in active/<owner>/ with its envelope in hand,
    never in incoming/; when delivery declines (None) it goes to incoming/ as before."""
    claims = _Claims(owner)
    harness.parts.new_claims = claims
    await threads.deferToThread(
        _send, harness.port, "alice@example.org", ["bob@example.net"], b"Subject: x\r\n\r\nhi\r\n"
    )
    if owner is None:
        assert claims.claimed == [] and len(harness.queued) == 1
        assert harness.store.counts()["incoming"] == 1
        return
    (entry,) = claims.claimed
    assert harness.queued == []
    assert harness.store.counts()["incoming"] == 0
    assert os.listdir(harness.store.layout.active_directory("w0")) == [entry.queue_id]
    envelope, content_size = read_entry_metadata(entry.path)
    assert (envelope, content_size) == (entry.envelope, entry.content_size)
    assert [r.address for r in entry.envelope.recipients] == ["bob@example.net"]


@pytest_twisted.ensureDeferred
async def test_pipelined_session_gets_ordered_replies(harness: Any) -> None:
    """Commands sent in one write are answered in order, one reply each."""
    lines = [
        b"EHLO client.example\r\n",
        b"MAIL FROM:<a@example.org>\r\n",
        b"RCPT TO:<b@example.net>\r\n",
        b"RCPT TO:<c@example.net>\r\n",
        b"DATA\r\n",
        b"Subject: x\r\n\r\nhi\r\n.\r\n",
        b"QUIT\r\n",
    ]
    out = await threads.deferToThread(_chat, harness.port, lines)
    codes = [line[:4] for line in out.split(b"\r\n") if line[3:4] == b" "]
    assert codes == [b"250 ", b"250 ", b"250 ", b"250 ", b"354 ", b"250 ", b"221 "]
    assert len(harness.queued) == 1


def _recv_until(sock: socket.socket, end: bytes) -> bytes:
    data = b""
    while not data.endswith(end):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


async def _writes_answering(harness: Any, group: bytes, replies: int) -> tuple[bytes, list]:
    """Send EHLO, then ``group`` in one write; its ``replies`` reply lines and the server's
    writes."""
    client = await threads.deferToThread(socket.create_connection, ("127.0.0.1", harness.port), 5)
    try:
        client.settimeout(5)
        await threads.deferToThread(_recv_until, client, b"\r\n")
        client.sendall(b"EHLO client.example\r\n")
        await threads.deferToThread(_recv_until, client, b"250 CHUNKING\r\n")
        (session,) = harness.service.factories["smtp"].sessions
        writes: list[bytes] = []
        write = session.transport.write

        def counting_write(data: bytes) -> None:
            writes.append(data)
            write(data)

        session.transport.write = counting_write
        client.sendall(group)
        out = b""
        while out.count(b"\r\n") < replies:
            chunk = await threads.deferToThread(client.recv, 4096)  # 5 s timeout
            assert chunk, f"the server closed after {out!r}"
            out += chunk
        return out, writes
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_a_pipelined_group_is_answered_in_one_write(harness: Any) -> None:
    """MAIL, two RCPTs and DATA sent together get their four replies in one transport write
    (one send and one segment: RFC 2920 §3.2), not one write per reply."""
    out, writes = await _writes_answering(
        harness,
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
        b"RCPT TO:<c@example.net>\r\nDATA\r\n",
        4,
    )
    assert [line[:3] for line in out.split(b"\r\n") if line] == [b"250", b"250", b"250", b"354"]
    assert writes == [out]


@pytest_twisted.ensureDeferred
async def test_a_bdat_group_is_answered_in_one_write_after_the_commit(harness: Any) -> None:
    """MAIL, RCPT and BDAT LAST together: the replies to MAIL and RCPT wait for the commit's
    and leave with it in one write. Sent ahead alone, they would hold the last reply back
    for the client's delayed ACK (40 ms) under Nagle's algorithm."""
    content = b"Subject: x\r\n\r\nbody\r\n"
    out, writes = await _writes_answering(
        harness,
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
        + b"BDAT %d LAST\r\n" % len(content)
        + content,
        3,
    )
    assert [line[:3] for line in out.split(b"\r\n") if line] == [b"250", b"250", b"250"]
    assert b"queued as " in out
    assert writes == [out]


@pytest_twisted.ensureDeferred
async def test_open_relay_matrix_over_loopback(tmp_path: Path) -> None:
    """Only mynetworks relays anywhere; a stranger reaches relay.domains only (554 5.7.1)."""
    h = InboundHarness(
        _reactor(),
        tmp_path,
        {"relay": {"mynetworks": ["127.0.0.1/32"], "domains": ["example.org"]}},
    )
    port = h.start()
    try:
        cases = [
            ("127.0.0.1", "b@foreign.test", b"250 2.1.5"),
            ("127.0.0.1", "b@example.org", b"250 2.1.5"),
            ("127.0.0.2", "b@example.org", b"250 2.1.5"),
            ("127.0.0.2", "b@foreign.test", str(replies.RELAY_DENIED).encode()),
        ]
        for source, recipient, expected in cases:
            out = await threads.deferToThread(
                _chat,
                port,
                [
                    b"EHLO x\r\n",
                    b"MAIL FROM:<a@x.test>\r\n",
                    f"RCPT TO:<{recipient}>\r\n".encode(),
                    b"QUIT\r\n",
                ],
                source,
            )
            assert expected in out, (source, recipient, out)
        assert any("reject: RCPT" in line and "554 5.7.1" in line for line in h.mail_log())
    finally:
        await h.stop()


@pytest_twisted.ensureDeferred
async def test_anyone_may_mail_the_bare_postmaster_which_goes_to_its_mailbox(
    tmp_path: Path,
) -> None:
    """RFC 5321 §4.5.1: <postmaster> is accepted from a stranger and queued for
    ``relay.postmaster``, though that mailbox's domain is not one a stranger may reach."""
    h = InboundHarness(
        _reactor(),
        tmp_path,
        {
            "relay": {
                "mynetworks": ["127.0.0.1/32"],
                "domains": ["example.org"],
                "postmaster": "ops@foreign.test",
            }
        },
    )
    port = h.start()
    try:
        out = await threads.deferToThread(
            _chat,
            port,
            [
                b"EHLO x\r\n",
                b"MAIL FROM:<a@x.test>\r\n",
                b"RCPT TO:<Postmaster>\r\n",
                b"RCPT TO:<ops@foreign.test>\r\n",
                b"DATA\r\n",
                b"Subject: abuse report\r\n\r\nbody\r\n.\r\n",
                b"QUIT\r\n",
            ],
            "127.0.0.2",
        )
    finally:
        await h.stop()
    assert str(replies.RELAY_DENIED).encode() in out  # the mailbox itself is still foreign
    (queue_id,) = h.queued
    envelope, _ = read_entry_metadata(h.store.layout.entry_path("incoming", queue_id))
    assert [r.address for r in envelope.recipients] == ["ops@foreign.test"]


@pytest_twisted.ensureDeferred
async def test_a_client_that_shuts_its_side_after_sending_still_gets_every_reply(
    harness: Any,
) -> None:
    """A half-closed client's message is queued and answered 250, then 221: it must not be
    left to think the message was lost (and send it again)."""
    session = (
        b"EHLO x\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
        b"Subject: half-closed\r\n\r\nbody\r\n.\r\nQUIT\r\n"
    )
    out = await threads.deferToThread(_chat_then_shut, harness.port, session)
    (queue_id,) = harness.queued
    assert f"250 2.0.0 Ok: queued as {queue_id}".encode() in out, out
    assert out.endswith(b"221 2.0.0 Bye\r\n"), out


@pytest_twisted.ensureDeferred
async def test_a_message_cut_off_by_a_half_close_is_not_queued(harness: Any) -> None:
    """Input that ends inside DATA answers what came before, queues nothing and closes."""
    session = b"EHLO x\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nno end\r\n"
    out = await threads.deferToThread(_chat_then_shut, harness.port, session)
    assert out.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n"), out
    assert harness.queued == []


def _flood_without_reading(sock: socket.socket, limit: int = 64 << 20) -> int:
    """Send EHLO lines and never read, until the server stops taking them for a second
    (or ``limit`` bytes or 20 s pass); return how many bytes were sent."""
    chunk = b"EHLO x\r\n" * 8192
    sock.setblocking(False)
    sent, blocked_since, deadline = 0, None, time.monotonic() + 20
    while sent < limit and time.monotonic() < deadline:
        try:
            sent += sock.send(chunk)
            blocked_since = None
        except BlockingIOError:
            blocked_since = blocked_since or time.monotonic()
            if time.monotonic() - blocked_since > 1.0:
                break
            time.sleep(0.01)
    return sent


def _read_until_quiet(sock: socket.socket) -> bytes:
    sock.setblocking(True)
    sock.settimeout(1.0)
    out = bytearray()
    try:
        while chunk := sock.recv(1 << 20):
            out += chunk
    except TimeoutError:
        pass
    return bytes(out)


@pytest_twisted.ensureDeferred
async def test_a_client_that_never_reads_its_replies_is_no_longer_read(harness: Any) -> None:
    """Replies that cannot leave stop the reading (the transport's producer), so a client
    cannot make the worker buffer replies without end; once it reads, the session goes on."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", harness.port))
    try:
        sent = await threads.deferToThread(_flood_without_reading, sock)
        assert sent < 64 << 20  # the server stopped taking input
        (session,) = harness.service.factories["smtp"].sessions
        assert session.reading_paused_for == {"replies"}
        replies_text = await threads.deferToThread(_read_until_quiet, sock)
        assert replies_text.startswith(b"220 ") and b"250-" in replies_text
        sock.sendall(b"QUIT\r\n")
        assert (await threads.deferToThread(_read_until_quiet, sock)).endswith(b"221 2.0.0 Bye\r\n")
    finally:
        sock.close()


def _closed_within(sock: socket.socket, seconds: float = 10.0) -> bool:
    """Read until the server closes the connection (True) or ``seconds`` pass (False).

    A close with our flood still unread in its buffer is a reset, which counts as closed.
    """
    sock.setblocking(True)
    sock.settimeout(0.5)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if not sock.recv(1 << 20):
                return True
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True
    return False


@pytest_twisted.ensureDeferred
async def test_a_timed_out_client_that_was_not_read_is_still_closed(tmp_path: Path) -> None:
    """The command timeout of a session whose reading is paused (its replies could not
    leave) closes the connection: the close does not wait on the paused producer."""
    h = InboundHarness(_reactor(), tmp_path, {"smtp": {"command_timeout": 0.5}})
    port = h.start()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    try:
        await threads.deferToThread(_flood_without_reading, sock, 8 << 20)
        closed = await threads.deferToThread(_closed_within, sock)
    finally:
        sock.close()
        await h.stop()
    assert closed
    assert any("disconnect from [127.0.0.1]" in line for line in h.mail_log())


@pytest_twisted.ensureDeferred
async def test_bare_lf_in_data_is_rejected_and_nothing_queued(harness: Any) -> None:
    """SMTP smuggling: a bare LF in DATA rejects the message; no queue file remains."""
    lines = [
        b"EHLO x\r\n",
        b"MAIL FROM:<a@example.org>\r\n",
        b"RCPT TO:<b@example.net>\r\n",
        b"DATA\r\n",
        b"Subject: x\r\n\r\nsmuggled\n.\nMAIL FROM:<evil@x>\r\n.\r\n",
        b"QUIT\r\n",
    ]
    out = await threads.deferToThread(_chat, harness.port, lines)
    assert str(replies.BARE_LINE_ENDING).encode() in out
    assert harness.queued == []
    assert harness.store.counts()["incoming"] == 0
    assert os.listdir(os.path.dirname(harness.store.layout.tmp_path("x"))) == []


@pytest_twisted.ensureDeferred
async def test_message_over_size_limit_is_refused_after_data(tmp_path: Path) -> None:
    """Too big: 552 5.3.4 at MAIL when SIZE= says so, else after DATA; nothing queued."""
    h = InboundHarness(_reactor(), tmp_path, {"smtp": {"max_message_size": 2048}})
    port = h.start()
    try:
        with pytest.raises(smtplib.SMTPSenderRefused) as raised:
            await threads.deferToThread(
                _send, port, "a@example.org", ["b@example.net"], b"x" * 5000 + b"\r\n"
            )
        assert raised.value.smtp_code == 552
        lines = [
            b"EHLO x\r\n",
            b"MAIL FROM:<a@example.org>\r\n",
            b"RCPT TO:<b@example.net>\r\n",
            b"DATA\r\n",
            b"Subject: big\r\n\r\n" + (b"y" * 70 + b"\r\n") * 60,
            b".\r\n",
        ]
        out = await threads.deferToThread(_chat, port, lines)
        assert out.split(b"\r\n")[-2] == str(replies.MESSAGE_TOO_BIG).encode()
        assert h.queued == []
    finally:
        await h.stop()


@pytest_twisted.ensureDeferred
async def test_idle_client_gets_421_timeout(tmp_path: Path) -> None:
    """A client silent past smtp.command_timeout gets 421 4.4.2 and is disconnected."""
    h = InboundHarness(_reactor(), tmp_path, {"smtp": {"command_timeout": 0.3}})
    port = h.start()
    try:
        out = await threads.deferToThread(_chat, port, [b"EHLO x\r\n"])
        assert str(replies.IDLE_TIMEOUT).encode() in out
    finally:
        await h.stop()


@pytest_twisted.ensureDeferred
async def test_bdat_chunks_over_a_socket_are_queued_exactly_as_sent(harness: Any) -> None:
    """RFC 3030 end to end: MAIL, RCPT and two pipelined BDAT chunks; the entry holds the
    Received header and then the content byte for byte (no unstuffing). A second
    transaction abandoned by RSET between chunks has its written-behind file removed at
    once, while the session goes on."""
    from twistedrelay.testing.waiting import wait_until

    content = b"Subject: chunked\r\n\r\n.not unstuffed\r\n.\r\nafter a lone dot\r\n"
    first, rest = content[:10], content[10:]
    abandoned = (b"x" * 998 + b"\r\n") * 70  # past SPILL_BYTES: written behind to tmp/
    client = await threads.deferToThread(socket.create_connection, ("127.0.0.1", harness.port), 5)
    try:
        client.settimeout(5)
        await threads.deferToThread(_recv_until, client, b"\r\n")
        client.sendall(
            b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
            + b"BDAT %d\r\n" % len(first)
            + first
            + b"BDAT %d LAST\r\n" % len(rest)
            + rest
            + b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
            + b"BDAT %d\r\n" % len(abandoned)
            + abandoned
        )
        out = await threads.deferToThread(_recv_until, client, b"70000 octets received\r\n")
        tmp = harness.store.layout.tmp
        await wait_until(_reactor(), lambda: os.listdir(tmp), "the chunk written behind to tmp/")
        client.sendall(b"RSET\r\n")
        out += await threads.deferToThread(_recv_until, client, b"250 2.0.0 Ok\r\n")
        await wait_until(_reactor(), lambda: not os.listdir(tmp), "an empty tmp/")
        client.sendall(b"QUIT\r\n")
        out += await threads.deferToThread(_recv_until, client, b"221 2.0.0 Bye\r\n")
    finally:
        client.close()
    (queue_id,) = harness.queued
    assert b"250 2.0.0 10 octets received\r\n" in out
    assert replies.queued_as(queue_id).to_bytes() in out
    path = harness.store.layout.entry_path("incoming", queue_id)
    envelope, content_size = read_entry_metadata(path)
    with open(path, "rb") as f:
        stored = f.read(content_size)
    assert stored.startswith(b"Received: from ") and stored.endswith(b"\r\n" + content)
    assert envelope.sender == "a@example.org"
