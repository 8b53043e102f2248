"""SMTP smuggling (SEC Consult, 2023): only <CRLF>.<CRLF> may end DATA.

A sender that ends DATA with ``<LF>.<LF>`` (or another non-standard sequence) which an
outbound server passes through and an inbound server accepts can smuggle a second message
with a forged sender. The relay must never end DATA on those sequences, must never see a
second transaction inside the first message, and must reject messages that contain them.
"""

from __future__ import annotations

import pytest

from tests.unit.smtp.session_driver import drive
from twistedrelay.smtp import replies
from twistedrelay.smtp.data import DataDecoder
from twistedrelay.smtp.server_session import DataEnd, MailFrom

PREFIX = b"EHLO client.test\r\nMAIL FROM:<a@good.example>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
SMUGGLED = b"MAIL FROM:<ceo@victim.example>\r\nRCPT TO:<b@example.com>\r\nDATA\r\nforged\r\n"
FAKE_ENDINGS = [
    b"\n.\n",
    b"\r.\n",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\n.\r",
    b"\r.\r",
]
# Well-formed lines that only look like an end to a sloppy parser: plain content.
LOOKALIKE_ENDINGS = [b"\r\n\x00.\r\n", b"\r\n .\r\n", b"\r\n.\x00\r\n", b"\r\n. \r\n"]


@pytest.mark.parametrize("ending", FAKE_ENDINGS, ids=repr)
def test_fake_ending_never_ends_data(ending: bytes) -> None:
    """A non-standard end sequence is message content: one rejected message, no second MAIL."""
    data = PREFIX + b"Subject: hi\r\n\r\nbody" + ending + SMUGGLED + b".\r\nQUIT\r\n"
    for chunks in [[data], [data[i : i + 1] for i in range(len(data))]] + [
        [data[:i], data[i:]] for i in range(len(PREFIX), len(data), 3)
    ]:
        transcript = drive(chunks)
        data_ends = [event for event in transcript.events if isinstance(event, DataEnd)]
        mails = [event for event in transcript.events if isinstance(event, MailFrom)]
        assert len(data_ends) == 1
        assert len(mails) == 1
        assert transcript.messages == []
        assert transcript.rejected == [replies.BARE_LINE_ENDING]
        assert transcript.closed == "quit"


@pytest.mark.parametrize("ending", LOOKALIKE_ENDINGS, ids=repr)
def test_lookalike_ending_is_content(ending: bytes) -> None:
    """A line with a dot and another byte is content: one message holding the smuggled text."""
    data = PREFIX + b"body" + ending + SMUGGLED + b".\r\n"
    transcript = drive([data])
    # RFC 5321 §4.5.2: a leading dot is unstuffed like on any other line.
    assert transcript.messages == [(b"body" + ending).replace(b"\r\n.", b"\r\n") + SMUGGLED]
    assert len([event for event in transcript.events if isinstance(event, MailFrom)]) == 1


def test_real_ending_does_end_data() -> None:
    """Control: the same input with <CRLF>.<CRLF> gives two messages."""
    data = PREFIX + b"body\r\n.\r\n" + SMUGGLED + b".\r\n"
    transcript = drive([data])
    assert transcript.messages == [b"body\r\n", b"forged\r\n"]


@pytest.mark.parametrize("ending", FAKE_ENDINGS, ids=repr)
def test_decoder_alone_never_ends_on_fake_ending(ending: bytes) -> None:
    """The DATA decoder, fed any split, finds no end in a fake-ending stream."""
    data = b"body" + ending + b"more"
    for cut in range(len(data) + 1):
        decoder = DataDecoder(1 << 20, 50, 1 << 20)
        assert decoder.feed(data[:cut])[1] is None
        assert decoder.feed(data[cut:])[1] is None


def test_bare_lf_before_real_end_is_rejected() -> None:
    """``<LF>.<CRLF>`` followed later by the real end: rejected, nothing queued."""
    data = PREFIX + b"body\n.\r\n" + b"tail\r\n.\r\n"
    transcript = drive([data])
    assert transcript.messages == []
    assert transcript.rejected == [replies.BARE_LINE_ENDING]
