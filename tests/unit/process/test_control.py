"""The master→worker control words and their line framing."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from twistedrelay.process.control import (
    MAX_LINE_BYTES,
    ControlCommand,
    ControlDecoder,
    encode_command,
)

STREAM = b"".join(encode_command(c) for c in (ControlCommand.RELOAD, ControlCommand.DRAIN))


def test_encoded_commands_decode_in_order() -> None:
    """What the master writes is what the worker reads, in order."""
    assert ControlDecoder().feed(STREAM) == [ControlCommand.RELOAD, ControlCommand.DRAIN]


@given(st.integers(min_value=1, max_value=len(STREAM)))
def test_decoding_does_not_depend_on_chunk_size(size: int) -> None:
    """Pipe reads may split a word anywhere; the commands stay the same."""
    decoder = ControlDecoder()
    commands = []
    for start in range(0, len(STREAM), size):
        commands += decoder.feed(STREAM[start : start + size])
    assert commands == [ControlCommand.RELOAD, ControlCommand.DRAIN]


def test_unknown_words_are_reported_not_obeyed() -> None:
    """A word this worker does not know is set aside, and the next one still works."""
    decoder = ControlDecoder()
    assert decoder.feed(b"restart\n\xff\n\nreload\n") == [ControlCommand.RELOAD]
    assert decoder.unknown == [b"restart", b"\xff"]


def test_an_endless_line_is_dropped_not_buffered() -> None:
    """Garbage without a newline is cut at MAX_LINE_BYTES instead of growing the buffer."""
    decoder = ControlDecoder()
    assert decoder.feed(b"x" * (MAX_LINE_BYTES + 10)) == []
    assert decoder.unknown == [b"x" * MAX_LINE_BYTES]
