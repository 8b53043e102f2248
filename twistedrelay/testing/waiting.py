"""Waiting for a condition on the running reactor, with a deadline (tests and harnesses).

A test that waits for something asynchronous polls it here instead of sleeping: the wait
ends as soon as the condition holds and fails with a clear message at the deadline.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater


async def wait_until(
    reactor: IReactorTime,
    condition: Callable[[], object],
    what: str,
    timeout_seconds: float = 10.0,
    interval_seconds: float = 0.02,
) -> None:
    """Poll ``condition`` every ``interval_seconds`` until it is true.

    :raises AssertionError: it was still false after ``timeout_seconds``; the message names
        ``what`` was awaited.
    """
    deadline = reactor.seconds() + timeout_seconds
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout_seconds:g} s waiting for: {what}")
        await deferLater(reactor, interval_seconds, lambda: None)
