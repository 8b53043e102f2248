"""Time one mail log line in a worker: MailLog through the worker's line observer.

Run: ``.venv/bin/python benchmarks/micro/bench_mail_log.py``

A worker writes three mail log lines per message (queued, the delivery, removed) plus two
per session. This times MailLog.queued and MailLog.connect with the worker's own observer
(``line_observer`` on a ``ReactorFlushedStream`` over an in-memory stream, so no I/O), best
of five rounds of 20,000 lines, microseconds per line.

Measured on the 2-core development VM (Python 3.11.7, Twisted 26.10), PERFORMANCE.md
round 4, best of five: 13.9 (queued) and 10.2 (connect) through Logger.info and
eventAsText (538dd41, on PYTHONPATH); 5.1 and 3.7 after 09c3c6b (the event handed straight
to the observer, written without parsing its format).
"""

from __future__ import annotations

import io
import timeit

from twisted.logger import globalLogBeginner

from twistedrelay.eventlog import MailLog
from twistedrelay.process.worker import ReactorFlushedStream, line_observer

LINES = 20_000


def main() -> None:
    """Print microseconds per line for two kinds of mail log line."""
    stream = ReactorFlushedStream(io.StringIO())
    globalLogBeginner.beginLoggingTo(
        [line_observer(stream)], redirectStandardIO=False, discardBuffer=True
    )
    maillog = MailLog()
    cases = {
        "queued": lambda: maillog.queued(
            "4Yb7Kx2mQzT1a", "sender@example.com", 1234, 1, "127.0.0.1", 40000
        ),
        "connect": lambda: maillog.connect("127.0.0.1", 40000, "smtp"),
    }
    for name, call in cases.items():
        best = min(timeit.repeat(call, number=LINES, repeat=5))
        print(f"{name:8s} {best / LINES * 1e6:5.1f} us per line")


if __name__ == "__main__":
    main()
