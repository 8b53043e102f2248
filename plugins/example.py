"""A template for plugin authors: every hook, each doing nothing harmful.

Copy this file, rename it, keep the hooks you need and delete the rest. What it does: when
``add_header = true`` it adds ``X-Example: yes`` to every message at the data hook, and it
records one result per transaction so you can see it in the mail log.

Settings (``[plugins.example]``):

``add_header`` (bool, default false)
    Add ``X-Example: yes`` to each message.

Rules every plugin follows (docs/hooks.md has the full contract):

- A hook is ``def hook_<name>(ctx)`` or ``async def hook_<name>(ctx)`` and returns a
  ``Decision``. Observer hooks (queue, delivered, deferred, bounced, disconnect) return
  nothing.
- Settings are checked in ``setup()``: refuse unknown keys with ``check_settings``, raise
  ``SettingsError(key, problem)`` for a bad value. Open files and databases lazily or in
  setup, and release them in ``close()``.
- When ``setup()`` returns an object, its ``hook_*`` methods are the hooks (so state lives on
  the object, not in module globals); when it returns None, the module's functions are.
- Keep per-session data in ``ctx.notes[<plugin name>]`` and explain decisions with
  ``ctx.results.add(<plugin name>, text)``. Never touch sockets, the queue or the reactor.
- A hook that raises or takes longer than ``[plugins] hook_timeout`` gives the client
  ``451 4.3.0`` and logs your plugin's name with the traceback. Blocking work inside a plain
  ``def`` hook cannot be interrupted by the timeout, so keep it short.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twistedrelay.hooks import (
    ConnectContext,
    DataContext,
    Decision,
    DeliverContext,
    DisconnectContext,
    HeloContext,
    MailContext,
    OutcomeContext,
    PluginEnvironment,
    QueueContext,
    RcptContext,
    SettingsError,
    check_settings,
)


def setup(settings: Mapping[str, Any], environment: PluginEnvironment) -> Example:
    """Check ``[plugins.example]`` and build the plugin.

    :raises SettingsError: an unknown key or a value of the wrong type.
    """
    check_settings(settings, {"add_header"})
    add_header = settings.get("add_header", False)
    if not isinstance(add_header, bool):
        raise SettingsError("add_header", f"expected true or false, got {add_header!r}")
    return Example(environment.name, add_header)


class Example:
    """The hooks, as methods so they can read the settings."""

    def __init__(self, name: str, add_header: bool) -> None:
        self.name = name
        self.add_header = add_header

    def hook_connect(self, ctx: ConnectContext) -> Decision:
        """Runs before the greeting; reject or disconnect here to refuse a client early."""
        ctx.notes[self.name]["connected_at"] = ctx.now
        return Decision.proceed()

    def hook_helo(self, ctx: HeloContext) -> Decision:
        """Runs for HELO and EHLO (``ctx.extended``); ``ctx.helo_name`` is what was said."""
        return Decision.proceed()

    def hook_mail(self, ctx: MailContext) -> Decision:
        """Runs after the core accepted MAIL FROM; ``ctx.sender`` is "" for bounces."""
        ctx.notes[self.name]["recipients"] = 0
        return Decision.proceed()

    def hook_rcpt(self, ctx: RcptContext) -> Decision:
        """Runs for each recipient core relay policy accepted; you can only narrow that."""
        ctx.notes[self.name]["recipients"] = ctx.notes[self.name].get("recipients", 0) + 1
        return Decision.proceed()

    async def hook_data(self, ctx: DataContext) -> Decision:
        """Runs once the message is stored, before it is queued; may add headers or hold.

        Written as ``async def`` to show that hooks may await Deferreds or coroutines.
        """
        ctx.results.add(self.name, f"{len(ctx.headers)} headers, {ctx.size} bytes")
        if self.add_header:
            return Decision.add_header("X-Example", "yes")
        return Decision.proceed()

    def hook_queue(self, ctx: QueueContext) -> None:
        """Observes the durable write: ``ctx.queue_id`` now exists."""

    def hook_deliver(self, ctx: DeliverContext) -> Decision:
        """Runs before each attempt for a destination batch; may reroute or tempfail."""
        return Decision.proceed()

    def hook_delivered(self, ctx: OutcomeContext) -> None:
        """Observes one recipient delivered."""

    def hook_deferred(self, ctx: OutcomeContext) -> None:
        """Observes one recipient deferred (it will be retried)."""

    def hook_bounced(self, ctx: OutcomeContext) -> None:
        """Observes one recipient bounced (a DSN goes to the sender)."""

    def hook_disconnect(self, ctx: DisconnectContext) -> None:
        """Observes the end of a session, however it ended."""
