"""Fuzz targets (hypothesis): no client input makes the session raise or send a bad reply."""

from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.smtp.session_driver import drive
from twistedrelay.smtp.server_session import SessionSettings

REPLY_LINE = re.compile(rb"[2-5][0-9][0-9][ -][^\r\n]*")
SETTINGS = SessionSettings(
    "mx.test",
    max_message_size=200,
    max_recipients=3,
    max_line_length=64,
    max_errors=10,
    starttls_offered=True,
    auth_mechanisms=("PLAIN",),
)
TOKENS = [
    b"EHLO x\r\n",
    b"HELO x\r\n",
    b"MAIL FROM:<a@b.c>\r\n",
    b"MAIL FROM:<> SIZE=10 SMTPUTF8\r\n",
    b"RCPT TO:<d@e.f>\r\n",
    "RCPT TO:<ü@e.f>\r\n".encode(),
    b"DATA\r\n",
    b"BDAT 5\r\n",
    b"BDAT 0 LAST\r\n",
    b"BDAT 3 LAST\r\n",
    b"BDAT x\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"AUTH PLAIN\r\n",
    b"STARTTLS\r\n",
    b"*\r\n",
    b"QUIT\r\n",
    b".\r\n",
    b"\r\n.\r\n",
    b"\n.\n",
    b"..\r\n",
    b"Received: x\r\n",
    b"\r",
    b"\n",
    b"\xff",
    b"x" * 70,
]


def assert_valid_wire(wire: bytes) -> None:
    """Every line written is a reply line: 3 digits, space or hyphen, CRLF-terminated."""
    assert wire.endswith(b"\r\n")
    for line in wire[:-2].split(b"\r\n"):
        assert REPLY_LINE.fullmatch(line), line


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=6))
def test_random_bytes_give_valid_replies(data: bytes, cuts: list[int]) -> None:
    """Random bytes never raise, and produce only well-formed replies, chunked any way."""
    bounds = [0, *sorted(min(cut, len(data)) for cut in cuts), len(data)]
    chunks = [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    transcript = drive(chunks, settings=SETTINGS)
    assert_valid_wire(bytes(transcript.wire))
    assert drive([data], settings=SETTINGS).wire == transcript.wire


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(TOKENS), max_size=40), st.lists(st.integers(0, 2000), max_size=6))
def test_command_soup_is_chunk_size_invariant(tokens: list[bytes], cuts: list[int]) -> None:
    """Sequences of plausible commands and data give the same replies and messages in any split."""
    data = b"".join(tokens)
    bounds = [0, *sorted(min(cut, len(data)) for cut in cuts), len(data)]
    chunks = [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    whole = drive([data], settings=SETTINGS)
    split = drive(chunks, settings=SETTINGS)
    assert_valid_wire(bytes(whole.wire))
    assert (split.wire, split.messages, split.rejected) == (
        whole.wire,
        whole.messages,
        whole.rejected,
    )
