"""The worker's stdout log stream: flushes put off to the end of a reactor turn."""

from __future__ import annotations

import io

from twisted.internet.task import Clock
from twisted.python import threadable

from twistedrelay.process.worker import ReactorFlushedStream


class CountingStream(io.StringIO):
    """A StringIO that counts writes and flushes and keeps what each flush saw."""

    def __init__(self) -> None:
        super().__init__()
        self.flushed: list[str] = []
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)

    def flush(self) -> None:
        self.flushed.append(self.getvalue())


def test_flushes_of_one_reactor_turn_become_one_flush() -> None:
    """Many lines logged in one turn are flushed once, after the turn, all of them."""
    threadable.registerAsIOThread()
    out = CountingStream()
    clock = Clock()
    stream = ReactorFlushedStream(out)
    stream.attach(clock)
    for n in range(5):
        stream.write(f"line {n}\n")
        stream.flush()
    assert out.flushed == []
    assert out.writes == 0, "buffered here even if the stream writes through"
    clock.advance(0)
    assert out.flushed == ["".join(f"line {n}\n" for n in range(5))]
    assert out.writes == 1
    stream.write("later\n")
    stream.flush()
    clock.advance(0)
    assert len(out.flushed) == 2


def test_without_a_reactor_each_flush_is_immediate() -> None:
    """Before attach() and after detach() (start-up errors, last lines) nothing waits."""
    out = CountingStream()
    stream = ReactorFlushedStream(out)
    stream.write("cannot start\n")
    stream.flush()
    assert out.flushed == ["cannot start\n"]
    clock = Clock()
    stream.attach(clock)
    stream.write("pending\n")
    stream.flush()
    stream.detach()
    assert out.flushed[-1].endswith("pending\n")
    stream.write("after\n")
    stream.flush()
    assert out.flushed[-1].endswith("after\n")
