"""The worker's stdout log stream: flushes put off to the end of a reactor turn; its lines."""

from __future__ import annotations

import io

from twisted.internet.task import Clock
from twisted.logger import Logger, eventAsText
from twisted.python import threadable

from twistedrelay.eventlog import NAMESPACE, MailLog
from twistedrelay.process.worker import ReactorFlushedStream, line_observer


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


def test_mail_lines_are_written_as_event_as_text_would_write_them() -> None:
    """line_observer's shortcut for mail log events gives eventAsText's line, braces too."""
    events: list[dict] = []
    maillog = MailLog(Logger(namespace=NAMESPACE, observer=events.append))
    maillog.connect("127.0.0.1", 40000, "smtp")
    maillog.queued("ABC123", "a{b}c@example.org", 10, 1, "127.0.0.1", 40000)
    maillog.disconnect("127.0.0.1", "ehlo=1 {mail_line} quit=1")
    stream = io.StringIO()
    observe = line_observer(stream)
    for event in events:
        observe(event)
    expected = "".join(eventAsText(e, includeTimestamp=False) + "\n" for e in events)
    assert stream.getvalue() == expected
    assert "from=<a{b}c@example.org>" in expected
