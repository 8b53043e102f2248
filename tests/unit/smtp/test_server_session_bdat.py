"""ServerSession and BDAT (RFC 3030 CHUNKING): chunks, their replies, and staying in step."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tests.unit.smtp.session_driver import Transcript, accept_everything, drive
from twistedrelay.smtp import replies
from twistedrelay.smtp.replies import Reply
from twistedrelay.smtp.server_session import DataAborted, DataStart, Event, SessionSettings

SETTINGS = SessionSettings(hostname="mx.test")
EHLO = b"EHLO client.test\r\n"
HELO = b"HELO client.test\r\n"
MAIL = b"MAIL FROM:<sender@example.org>\r\n"
RCPT = b"RCPT TO:<rcpt@example.com>\r\n"
NOOP = b"NOOP\r\n"
CONTENT = b"Subject: chunks\r\n\r\n.a line with a dot\r\n.\r\nlast\r\n"


def bdat(data: bytes, last: bool = False) -> bytes:
    return b"BDAT %d%s\r\n" % (len(data), b" LAST" if last else b"") + data


def run(*parts: bytes, settings: SessionSettings = SETTINGS, **kwargs: object) -> Transcript:
    """Send ``parts`` in one write, as a pipelining client would."""
    return drive([b"".join(parts)], settings=settings, **kwargs)  # type: ignore[arg-type]


def octets(count: int) -> str:
    return f"250 2.0.0 {count} octets received\r\n"


def test_ehlo_offers_chunking_unless_turned_off() -> None:
    """CHUNKING is in the EHLO reply; ``chunking=False`` leaves it out and BDAT is 502."""
    assert "250 CHUNKING\r\n" in run(EHLO).text
    off = SessionSettings(hostname="mx.test", chunking=False)
    transcript = run(EHLO, MAIL, RCPT, b"BDAT 0 LAST\r\n", settings=off)
    assert "CHUNKING" not in transcript.text
    assert transcript.text.endswith(replies.COMMAND_NOT_IMPLEMENTED.to_bytes().decode())


def test_one_last_chunk_is_the_whole_message_as_sent() -> None:
    """MAIL, RCPT and BDAT LAST in one write: no 354, the content is not unstuffed, and
    the end of the chunk, not CRLF.CRLF, ends the message."""
    transcript = run(EHLO, MAIL, RCPT, bdat(CONTENT, last=True), NOOP)
    assert transcript.messages == [CONTENT]
    assert transcript.final_codes[-4:] == [250, 250, 250, 250]
    assert replies.queued_as("TESTID").to_bytes() in transcript.wire
    assert b"354" not in transcript.wire
    assert [e for e in transcript.events if isinstance(e, DataStart)] == [DataStart(chunked=True)]


def test_chunks_are_answered_each_and_joined() -> None:
    """Every chunk but the last gets "250 … octets received"; BDAT 0 LAST ends the message."""
    transcript = run(EHLO, MAIL, RCPT, bdat(CONTENT[:7]), bdat(CONTENT[7:]), bdat(b"", last=True))
    assert transcript.messages == [CONTENT]
    text = transcript.text
    assert octets(7) in text and octets(len(CONTENT) - 7) in text
    assert text.endswith(replies.queued_as("TESTID").to_bytes().decode())


@given(st.lists(st.integers(0, 200), max_size=6))
def test_how_the_bytes_arrive_never_changes_the_session(cuts: list[int]) -> None:
    """The stream cut anywhere (inside BDAT lines and chunks) gives the same wire and message."""
    stream = b"".join(
        [EHLO, MAIL, RCPT, bdat(CONTENT[:20]), bdat(CONTENT[20:], last=True), MAIL, NOOP]
    )
    bounds = [0, *sorted(c % (len(stream) + 1) for c in cuts), len(stream)]
    pieces = [stream[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    whole, split = drive([stream], settings=SETTINGS), drive(pieces, settings=SETTINGS)
    assert split.wire == whole.wire
    assert split.messages == whole.messages == [CONTENT]


def test_bdat_without_a_transaction_reads_its_chunk_then_refuses() -> None:
    """RFC 3030 §3.2: the chunk is consumed, never taken as commands; the session goes on."""
    looks_like_commands = b"RSET\r\nQUIT\r\n"
    no_mail = run(EHLO, bdat(looks_like_commands, last=True), NOOP)
    assert no_mail.text.endswith(
        replies.NEED_MAIL.to_bytes().decode() + replies.NOOP_OK.to_bytes().decode()
    )
    assert no_mail.closed is None
    no_rcpt = run(EHLO, MAIL, bdat(looks_like_commands), NOOP)
    assert no_rcpt.text.endswith(
        replies.NEED_RECIPIENTS.to_bytes().decode() + replies.NOOP_OK.to_bytes().decode()
    )
    assert no_rcpt.messages == []


def test_bdat_syntax_errors_are_501() -> None:
    """A chunk size that is missing, not decimal, too long, or a word other than LAST."""
    for line in (
        b"BDAT",
        b"BDAT x",
        b"BDAT -1",
        b"BDAT 1 FIRST",
        b"BDAT 1 LAST more",
        b"BDAT 9" * 9,
    ):
        transcript = run(EHLO, MAIL, RCPT, line + b"\r\n")
        assert transcript.text.endswith(replies.SYNTAX_ERROR.to_bytes().decode()), line


def test_bdat_is_unknown_before_ehlo() -> None:
    """CHUNKING is an ESMTP extension: after HELO, BDAT is not implemented."""
    transcript = run(HELO, MAIL, RCPT, b"BDAT 4 LAST\r\n")
    assert transcript.text.endswith(replies.COMMAND_NOT_IMPLEMENTED.to_bytes().decode())


def test_a_message_over_the_size_limit_is_refused_at_its_chunk_and_the_rest_dropped() -> None:
    """552 after the chunk that passes SIZE ends the transaction; the chunks the client had
    already pipelined are read and refused (503: no transaction) without losing step."""
    small = SessionSettings(hostname="mx.test", max_message_size=10)
    transcript = run(
        EHLO,
        MAIL,
        RCPT,
        bdat(b"x" * 8),
        bdat(b"y" * 8),
        bdat(b"z\r\n", last=True),
        NOOP,
        settings=small,
    )
    assert transcript.rejected == [replies.MESSAGE_TOO_BIG]
    assert transcript.messages == []
    assert transcript.text.endswith(
        octets(8)
        + replies.MESSAGE_TOO_BIG.to_bytes().decode()
        + replies.NEED_MAIL.to_bytes().decode()
        + replies.NOOP_OK.to_bytes().decode()
    )


def test_bdat_content_gets_the_smuggling_and_loop_checks() -> None:
    """A bare LF and too many Received headers refuse the message as with DATA."""
    assert run(EHLO, MAIL, RCPT, bdat(b"a\nb\r\n", last=True)).rejected == [
        replies.BARE_LINE_ENDING
    ]
    loop = SessionSettings(hostname="mx.test", max_received_headers=1)
    hops = b"Received: a\r\nReceived: b\r\n\r\nbody\r\n"
    assert run(EHLO, MAIL, RCPT, bdat(hops, last=True), settings=loop).rejected == [
        replies.TOO_MANY_HOPS
    ]


def test_no_data_or_rcpt_between_chunks_but_rset_aborts() -> None:
    """DATA and RCPT are out of sequence inside a BDAT transaction; RSET abandons the message
    (DataAborted) and a new transaction follows."""
    transcript = run(EHLO, MAIL, RCPT, bdat(b"part"), b"DATA\r\n", RCPT, b"RSET\r\n")
    assert transcript.text.endswith(
        octets(4)
        + replies.BAD_SEQUENCE.to_bytes().decode() * 2
        + replies.RESET_OK.to_bytes().decode()
    )
    assert DataAborted() in transcript.events
    again = run(EHLO, MAIL, RCPT, bdat(b"part"), b"RSET\r\n", MAIL, RCPT, bdat(CONTENT, last=True))
    assert again.messages == [CONTENT]


def test_a_refused_first_chunk_is_read_and_answered_after_it() -> None:
    """The adapter refusing the DataStart of BDAT: the chunk is dropped, the reply follows it."""

    def refuse_data(event: Event) -> Reply:
        return replies.LOCAL_ERROR if isinstance(event, DataStart) else accept_everything(event)

    transcript = run(EHLO, MAIL, RCPT, bdat(b"RSET\r\n", last=True), NOOP, decide=refuse_data)
    assert transcript.text.endswith(
        replies.LOCAL_ERROR.to_bytes().decode() + replies.NOOP_OK.to_bytes().decode()
    )
    assert transcript.messages == []


def test_refused_chunks_count_toward_the_error_limit() -> None:
    """A client that keeps sending BDAT without a transaction is closed at max_errors."""
    strict = SessionSettings(hostname="mx.test", max_errors=3)
    transcript = run(EHLO, *[bdat(b"data")] * 5, settings=strict)
    assert transcript.closed == "too_many_errors"
    assert transcript.text.count("503 5.5.1") == 3
