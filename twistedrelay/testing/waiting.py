"""Waiting for a condition with a deadline (tests and harnesses).

A test that waits for something asynchronous polls it here instead of sleeping: the wait
ends as soon as the condition holds and fails with a clear message at the deadline.
:func:`wait_until` polls on the running reactor; :func:`poll_until` blocks, for tests that
drive other processes without a reactor.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

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


_Value = TypeVar("_Value")


def poll_until(condition: Callable[[], _Value], timeout: float, what: str) -> _Value:
    """Call ``condition`` every 50 ms until it returns a truthy value, and return that value.

    :raises AssertionError: still falsy after ``timeout`` seconds; the message names ``what``.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
