"""Queue IDs: the name of a queue entry, unique across processes and restarts.

Owns the format of a queue ID. A queue ID is 20 upper-case hexadecimal characters::

    TTTTTTTTTTTTT PPPPPP C
    13 hex: microseconds since the Unix epoch (good until the year 2112)
     6 hex: the process ID (2**24 > Linux's PID_MAX_LIMIT of 2**22)
     1 hex: a counter for IDs made in the same microsecond by the same process

Invariants: the IDs one process makes strictly increase (the generator never moves its
timestamp backwards, even if the wall clock does, and borrows the next microsecond when the
counter runs out); two live processes never share a PID, so their IDs differ in the PID
field; a restarted process makes IDs from a later timestamp. IDs sort by arrival time as
plain strings, which the queue uses for "oldest first" without a stat(), and they are easy to
grep in logs (no punctuation, fixed length).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable

QUEUE_ID_LENGTH = 20
_TIME_DIGITS = 13
_PID_DIGITS = 6
_COUNTER_LIMIT = 16  # one hex digit
_QUEUE_ID_RE = re.compile(r"[0-9A-F]{20}\Z")


def is_queue_id(text: str) -> bool:
    """Whether ``text`` has the form of a queue ID (so foreign files can be ignored)."""
    return _QUEUE_ID_RE.match(text) is not None


def arrival_time_of(queue_id: str) -> float:
    """The epoch seconds encoded in a queue ID: when the message started arriving.

    :raises ValueError: ``queue_id`` is not a queue ID.
    """
    if not is_queue_id(queue_id):
        raise ValueError(f"not a queue ID: {queue_id!r}")
    return int(queue_id[:_TIME_DIGITS], 16) / 1_000_000


class QueueIdGenerator:
    """Makes queue IDs for the current process.

    :param clock_ns: wall-clock time in nanoseconds (injected for tests).
    :param getpid: the process ID source; read on every call, so a forked child (which
        gets a new PID) never repeats its parent's IDs.
    """

    def __init__(
        self,
        clock_ns: Callable[[], int] = time.time_ns,
        getpid: Callable[[], int] = os.getpid,
    ) -> None:
        self._clock_ns = clock_ns
        self._getpid = getpid
        self._last_micros = 0
        self._counter = 0
        self._last_pid = -1

    def new_id(self) -> str:
        """Return a queue ID never returned before by any process on this host."""
        pid = self._getpid()
        micros = self._clock_ns() // 1000
        if pid != self._last_pid:
            # A forked child inherits the parent's state: start afresh under its own PID.
            self._last_pid = pid
            self._last_micros = 0
        if micros > self._last_micros:
            self._last_micros = micros
            self._counter = 0
        else:
            # Same microsecond, or the wall clock stepped back: stay strictly increasing.
            self._counter += 1
            if self._counter >= _COUNTER_LIMIT:
                self._last_micros += 1
                self._counter = 0
        return (
            f"{self._last_micros:0{_TIME_DIGITS}X}"
            f"{pid % (1 << (4 * _PID_DIGITS)):0{_PID_DIGITS}X}"
            f"{self._counter:X}"
        )
