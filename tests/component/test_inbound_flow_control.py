"""Flow control of inbound sessions while a decision is pending: real reactor, loopback."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import defer, threads
from twisted.internet.task import deferLater

from twistedrelay.hooks import Decision, HookRunner, Plugin
from twistedrelay.smtp.server import HELD_INPUT_LIMIT
from twistedrelay.testing.inbound import InboundHarness
from twistedrelay.testing.waiting import wait_until


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@pytest_twisted.ensureDeferred
async def test_reading_pauses_only_once_held_input_passes_the_bound(tmp_path: Path) -> None:
    """Pipelined input during a slow decision is read on; a flood past the bound pauses."""
    gate: defer.Deferred[None] = defer.Deferred()
    asked: list[str] = []

    async def slow_mail(ctx: Any) -> Decision:
        asked.append(ctx.sender)
        await gate
        return Decision.proceed()

    hooks = HookRunner([Plugin("slow", "test", {"mail": slow_mail})], _reactor())
    # The flood is NOOPs: past the junk-command limit each counts as an error, so the
    # error limit is raised out of the way of what this test is about.
    harness = InboundHarness(_reactor(), tmp_path, {"smtp": {"max_errors": 100_000}}, hooks=hooks)
    port = harness.start()
    client = await threads.deferToThread(socket.create_connection, ("127.0.0.1", port), 5)
    try:
        await threads.deferToThread(client.recv, 1024)
        await threads.deferToThread(
            client.sendall, b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\n"
        )
        await wait_until(_reactor(), lambda: asked, "the mail hook")
        (session,) = harness.service.factories["smtp"].sessions
        readers = _reactor().getReaders

        small = b"NOOP\r\n" * 100
        await threads.deferToThread(client.sendall, small)
        await deferLater(_reactor(), 0.1, lambda: None)
        assert session.transport in readers(), "a few pipelined commands do not pause"

        flood = b"NOOP " + b"x" * 500 + b"\r\n"
        await threads.deferToThread(client.sendall, flood * (2 * HELD_INPUT_LIMIT // len(flood)))
        await wait_until(_reactor(), lambda: session.transport not in readers(), "reading to pause")

        gate.callback(None)
        await wait_until(_reactor(), lambda: session.transport in readers(), "reading to resume")
    finally:
        client.close()
        await harness.stop()
        hooks.close()
