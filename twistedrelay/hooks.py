"""Hook plugins: loading, ordering and running them, and the Decision and *Context types.

Owns the plugin contract of docs/hooks.md. A plugin is a module (bundled in ``plugins/``,
importable as ``twistedrelay_plugins.<name>``, or found through the entry-point group
``twistedrelay.plugins``) that defines ``hook_<name>`` functions and optionally
``setup(settings)``. Each hook takes one context and returns a :class:`Decision`.

Invariant: a plugin never crashes the relay and never widens relay permission. The runner
turns an exception, a timeout or an invalid answer into ``451 4.3.0`` (logged with the
plugin's name and the traceback); the core asks plugins only about recipients its own relay
policy accepted, and the strongest answer a plugin can give there is ``accept`` (skip the
remaining rcpt hooks), never "relay anyway". Plugins see only their context: no transport,
no queue directory, no reactor.
"""

from __future__ import annotations

import argparse
import enum
import importlib
import importlib.metadata
import inspect
import re
import sys
import tempfile
import types
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeAlias

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from twistedrelay.config import Config, ConfigError, PluginsConfig, load_config
from twistedrelay.delivery.headers import DropRules, build_drop_rules, drop_header_fields
from twistedrelay.queue.entry import Envelope
from twistedrelay.routing import Destination, NextHop, parse_next_hop
from twistedrelay.smtp import replies
from twistedrelay.smtp.replies import Reply

BUNDLED_PACKAGE = "twistedrelay_plugins"
ENTRY_POINT_GROUP = "twistedrelay.plugins"
DEFAULT_HOOK_TIMEOUT = 30.0

_log = Logger(namespace="twistedrelay.hooks")


# -- decisions ------------------------------------------------------------------------------


class Verdict(enum.Enum):
    """What a hook asks the core to do."""

    PROCEED = "proceed"
    ACCEPT = "accept"
    REJECT = "reject"
    TEMPFAIL = "tempfail"
    DISCONNECT = "disconnect"
    HOLD = "hold"
    REROUTE = "reroute"


# RFC 5322 §3.6.8: a field name is printable US-ASCII except the colon.
_FIELD_NAME = re.compile(r"[!-9;-~]+")
# A header value may be folded (CRLF followed by WSP, RFC 5322 §2.2.3), never broken.
_BAD_LINE_BREAK = re.compile(r"\r(?!\n)|(?<!\r)\n|\r\n(?![ \t])")


def _check_header(name: str, value: str) -> None:
    if not _FIELD_NAME.fullmatch(name):
        raise ValueError(f"not a header field name: {name!r}")
    if _BAD_LINE_BREAK.search(value) or value.endswith("\r\n"):
        raise ValueError(f"header {name} value has a bare or final line break")


@dataclass(frozen=True, slots=True)
class Decision:
    """A hook's answer. Build it with the class methods, never by hand.

    ``reply`` goes to the client for reject, tempfail and disconnect. ``reason`` says why a
    message is held. ``next_hop`` is where a reroute sends a destination batch.
    ``add_headers`` (name, value) pairs are prepended to the queued message, in order;
    ``drop_headers`` (name, value or None) pairs name header fields the queued copy omits
    (value None: every field with that name). Both accumulate across plugins at the data
    hook. ``decided_by`` is filled by the runner with the plugin whose verdict won.
    """

    verdict: Verdict
    reply: Reply | None = None
    reason: str = ""
    next_hop: NextHop | None = None
    add_headers: tuple[tuple[str, str], ...] = ()
    drop_headers: tuple[tuple[str, str | None], ...] = ()
    decided_by: str = ""

    @classmethod
    def proceed(
        cls,
        add_headers: Sequence[tuple[str, str]] = (),
        drop_headers: Sequence[tuple[str, str | None]] = (),
    ) -> Decision:
        """Carry on with the next plugin (and then the core), optionally editing headers.

        :raises ValueError: a header name or value that would corrupt the message.
        """
        for name, value in add_headers:
            _check_header(name, value)
        for name, _ in drop_headers:
            _check_header(name, "")
        return cls(
            Verdict.PROCEED, add_headers=tuple(add_headers), drop_headers=tuple(drop_headers)
        )

    @classmethod
    def accept(cls) -> Decision:
        """Accept the recipient now (rcpt only); later plugins' rcpt hooks are skipped.

        This never overrides core relay policy: rcpt hooks run only for recipients the core
        already accepted.
        """
        return cls(Verdict.ACCEPT)

    @classmethod
    def reject(cls, reply: Reply) -> Decision:
        """Refuse permanently with a 5xx reply.

        :raises ValueError: the reply is not 5xx.
        """
        if not reply.is_permanent:
            raise ValueError(f"reject needs a 5xx reply, got {reply}")
        return cls(Verdict.REJECT, reply=reply)

    @classmethod
    def tempfail(cls, reply: Reply | None = None) -> Decision:
        """Refuse for now with a 4xx reply (default ``451 4.3.0``); the client retries.

        :raises ValueError: the reply is not 4xx.
        """
        reply = replies.PLUGIN_ERROR if reply is None else reply
        if not reply.is_transient:
            raise ValueError(f"tempfail needs a 4xx reply, got {reply}")
        return cls(Verdict.TEMPFAIL, reply=reply)

    @classmethod
    def disconnect(cls, reply: Reply) -> Decision:
        """Send a 4xx or 5xx reply and close the session (e.g. ``421``, ``554``).

        :raises ValueError: the reply is positive.
        """
        if reply.is_positive:
            raise ValueError(f"disconnect needs a 4xx or 5xx reply, got {reply}")
        return cls(Verdict.DISCONNECT, reply=reply)

    @classmethod
    def hold(cls, reason: str) -> Decision:
        """Queue the message in hold/ (data only); the client still gets 250."""
        if "\n" in reason or "\r" in reason:
            raise ValueError("a hold reason is one line")
        return cls(Verdict.HOLD, reason=reason)

    @classmethod
    def add_header(cls, name: str, value: str) -> Decision:
        """Prepend ``name: value`` to the queued message and proceed (data only).

        Several plugins may add headers; they accumulate in plugin order. ``value`` may be
        folded (CRLF + space or tab) but carries no final line break.
        """
        return cls.proceed(add_headers=[(name, value)])

    @classmethod
    def drop_header(cls, name: str, value: str | None = None) -> Decision:
        """Omit header fields called ``name`` from the queued copy and proceed (data only).

        With ``value``, only fields whose unfolded, whitespace-collapsed value (as in
        ``DataContext.headers``) equals it are omitted. Delivery does the omitting: the
        stored file keeps the field (delivery/headers.py).
        """
        return cls.proceed(drop_headers=[(name, value)])

    @classmethod
    def reroute(cls, next_hop: str) -> Decision:
        """Send this destination batch to ``next_hop``, in route syntax (deliver only).

        :raises ValueError: ``next_hop`` is not valid route syntax (see routing.py).
        """
        return cls(Verdict.REROUTE, next_hop=parse_next_hop(next_hop))

    @property
    def is_proceed(self) -> bool:
        """True for proceed (with or without header edits)."""
        return self.verdict is Verdict.PROCEED

    def header_lines(self) -> tuple[str, ...]:
        """``add_headers`` as raw CRLF-terminated lines, for ``Envelope.prepend_headers``."""
        return _header_lines(self.add_headers)


def _header_lines(fields: Sequence[tuple[str, str]]) -> tuple[str, ...]:
    return tuple(f"{name}: {value}\r\n" for name, value in fields)


PROCEED = Decision(Verdict.PROCEED)


# -- contexts -------------------------------------------------------------------------------


class Notes(dict[str, dict[str, Any]]):
    """Per-plugin scratch space shared by the hooks of one session: ``ctx.notes[name]``.

    Indexing a plugin's name creates its dict on first use, so plugins never collide and
    never need to check. The core never reads notes.
    """

    def __missing__(self, plugin: str) -> dict[str, Any]:
        value: dict[str, Any] = {}
        self[plugin] = value
        return value


class Results:
    """Why plugins decided what they did; the entries end up in the mail log line.

    Like Haraka's ``results``: ``ctx.results.add("rate_limit", "per_client 3/100")``.
    """

    def __init__(self) -> None:
        self._entries: list[tuple[str, str]] = []

    def add(self, plugin: str, text: str) -> None:
        """Record one result of ``plugin`` (one line of text, no ``=``-escaping needed)."""
        self._entries.append((plugin, " ".join(text.split())))

    @property
    def entries(self) -> tuple[tuple[str, str], ...]:
        """Every (plugin, text) in the order they were added."""
        return tuple(self._entries)

    def format(self) -> str:
        """One log-friendly string: ``plugin:text; plugin:text`` ("" when empty)."""
        return "; ".join(f"{plugin}:{text}" for plugin, text in self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def _now() -> float:
    # Imported here so that building a context in a unit test needs no reactor.
    import time

    return time.time()


@dataclass(frozen=True, slots=True, kw_only=True)
class HookContext:
    """What every hook knows about the session that led to it.

    :ivar client_address: the client's IP address ("" for mail the relay made itself).
    :ivar client_port: the client's TCP port.
    :ivar listener: "smtp", "submission" or "submissions" (the socket's mode).
    :ivar tls: the TLS protocol version in use (e.g. "TLSv1.3"), None in clear text.
    :ivar helo_name: the last HELO/EHLO name ("" before it).
    :ivar authenticated_as: the AUTH user name, None when not authenticated.
    :ivar now: epoch seconds (reactor clock) when the hook was called.
    :ivar notes: per-plugin scratch space; pass the same Notes for a whole session.
    :ivar results: collector for the log line; pass one Results per transaction.
    """

    client_address: str = ""
    client_port: int = 0
    listener: str = "smtp"
    tls: str | None = None
    helo_name: str = ""
    authenticated_as: str | None = None
    now: float = field(default_factory=_now)
    notes: Notes = field(default_factory=Notes)
    results: Results = field(default_factory=Results)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectContext(HookContext):
    """``connect``: a client connected; nothing has been said yet (not even the greeting)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HeloContext(HookContext):
    """``helo``: the client sent HELO (``extended`` False) or EHLO (True); see helo_name."""

    extended: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class MailContext(HookContext):
    """``mail``: MAIL FROM passed the core checks.

    :ivar sender: the reverse-path without angle brackets ("" is the null sender).
    :ivar params: ESMTP parameters, upper-case keys (SIZE, BODY, SMTPUTF8, RET, ENVID).
    """

    sender: str
    params: Mapping[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class RcptContext(HookContext):
    """``rcpt``: one RCPT TO that core relay policy accepted.

    :ivar recipient: the forward-path without angle brackets.
    :ivar params: its ESMTP parameters (NOTIFY, ORCPT).
    :ivar sender: the transaction's reverse-path.
    :ivar accepted: recipients accepted earlier in this transaction.
    """

    recipient: str
    sender: str
    params: Mapping[str, str | None] = field(default_factory=dict)
    accepted: tuple[str, ...] = ()


def _no_message() -> bytes:
    raise LookupError("this DataContext was built without a message reader")


@dataclass(frozen=True, slots=True, kw_only=True)
class DataContext(HookContext):
    """``data``: the whole message was received and stored; it is not queued yet.

    :ivar sender: the reverse-path.
    :ivar recipients: the accepted forward-paths, in order.
    :ivar headers: the stored header section as (name, value) pairs, in order; values are
        unfolded (RFC 5322 §2.2.3) and stripped, names as written.
    :ivar size: the stored message size in bytes.
    :ivar message_reader: returns the stored message (header section, blank line, body)
        with CRLF line endings, exactly the bytes that will be delivered after the added
        headers; use :meth:`read_message` / :meth:`read_body`.
    """

    sender: str
    recipients: tuple[str, ...]
    headers: tuple[tuple[str, str], ...] = ()
    size: int = 0
    message_reader: Callable[[], bytes] = _no_message

    def read_message(self) -> bytes:
        """The stored message: header section, empty line, body (CRLF line endings)."""
        return self.message_reader()

    def read_body(self) -> bytes:
        """The body only: what follows the first empty line (b"" when there is none)."""
        message = self.message_reader()
        if message.startswith(b"\r\n"):
            return message[2:]
        _, separator, body = message.partition(b"\r\n\r\n")
        return body if separator else b""

    def header_values(self, name: str) -> list[str]:
        """The values of every header field called ``name`` (case-insensitive), in order."""
        name = name.lower()
        return [value for field_name, value in self.headers if field_name.lower() == name]


def _as_delivered(
    stored: DataContext, added: Sequence[tuple[str, str]], dropped: Sequence[tuple[str, str | None]]
) -> DataContext:
    """The data context the next plugins see: the message as it will be delivered.

    The fields earlier plugins added are on top and the ones they dropped gone, so that a
    signer listed after an editor signs what goes out (docs/hooks.md).
    """
    rules = build_drop_rules(dropped)
    prepended = "".join(_header_lines(added)).encode("utf-8")
    read_stored = stored.message_reader

    def read_delivered() -> bytes:
        return prepended + drop_header_fields(read_stored(), rules)

    drops = DropRules(rules)
    return replace(
        stored,
        headers=(*added, *((n, v) for n, v in stored.headers if not drops.drops(n, v))),
        message_reader=read_delivered,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueContext(HookContext):
    """``queue`` (observer): the message is durable in the queue as ``queue_id``."""

    queue_id: str
    envelope: Envelope

    @classmethod
    def for_envelope(cls, envelope: Envelope, **kwargs: Any) -> QueueContext:
        """A context whose session fields come from the stored envelope."""
        return cls(
            queue_id=envelope.queue_id, envelope=envelope, **_from_envelope(envelope), **kwargs
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliverContext(HookContext):
    """``deliver``: an attempt is about to start for one destination batch of a message.

    :ivar queue_id: the queue entry.
    :ivar sender: its reverse-path.
    :ivar destination: the routed destination (domain, or a route's next hop).
    :ivar recipients: the forward-paths in this batch.
    :ivar mail_hosts: the resolved hosts in the order they will be tried (host names or
        addresses as text; empty when resolution has not run).
    """

    queue_id: str
    sender: str
    destination: Destination
    recipients: tuple[str, ...]
    mail_hosts: tuple[str, ...] = ()

    @classmethod
    def for_envelope(cls, envelope: Envelope, **kwargs: Any) -> DeliverContext:
        """A context whose session fields, queue ID and sender come from the envelope."""
        return cls(
            queue_id=envelope.queue_id, sender=envelope.sender, **_from_envelope(envelope), **kwargs
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class OutcomeContext(HookContext):
    """``delivered`` / ``deferred`` / ``bounced`` (observers): one recipient's outcome.

    :ivar queue_id: the queue entry.
    :ivar recipient: the forward-path.
    :ivar result: "delivered", "deferred" or "bounced" (the hook's name and metric label).
    :ivar reply: the remote reply, or the local diagnostic, as an operator reads it.
    :ivar attempt: which attempt of this recipient this was (1 = first).
    :ivar destination: the destination's name.
    """

    queue_id: str
    recipient: str
    result: str
    reply: str = ""
    attempt: int = 1
    destination: str = ""

    @classmethod
    def for_envelope(cls, envelope: Envelope, **kwargs: Any) -> OutcomeContext:
        """A context whose session fields and queue ID come from the envelope."""
        return cls(queue_id=envelope.queue_id, **_from_envelope(envelope), **kwargs)


@dataclass(frozen=True, slots=True, kw_only=True)
class DisconnectContext(HookContext):
    """``disconnect`` (observer): the session ended, however it ended.

    :ivar messages: messages queued in this session.
    :ivar recipients: recipients accepted in this session.
    :ivar errors: error replies sent (4xx and 5xx).
    :ivar duration_seconds: from connect to disconnect.
    :ivar reason: how it ended: "quit", "timeout", "client closed", "rejected", "shutdown".
    """

    messages: int = 0
    recipients: int = 0
    errors: int = 0
    duration_seconds: float = 0.0
    reason: str = ""


def _from_envelope(envelope: Envelope) -> dict[str, Any]:
    return {
        "client_address": envelope.client_address,
        "client_port": envelope.client_port,
        "listener": envelope.listener,
        "tls": envelope.tls,
        "helo_name": envelope.client_helo,
        "authenticated_as": envelope.authenticated_as,
    }


# -- the hooks ------------------------------------------------------------------------------

_SESSION_REFUSALS = frozenset({Verdict.REJECT, Verdict.TEMPFAIL, Verdict.DISCONNECT})

#: Every hook and the verdicts it may return; an empty set marks an observer, whose return
#: value is ignored and which runs off the hot path.
HOOKS: Mapping[str, frozenset[Verdict]] = types.MappingProxyType(
    {
        "connect": _SESSION_REFUSALS,
        "helo": _SESSION_REFUSALS,
        "mail": _SESSION_REFUSALS,
        "rcpt": _SESSION_REFUSALS | {Verdict.ACCEPT},
        "data": _SESSION_REFUSALS | {Verdict.HOLD},
        "queue": frozenset(),
        "deliver": frozenset({Verdict.TEMPFAIL, Verdict.REROUTE}),
        "delivered": frozenset(),
        "deferred": frozenset(),
        "bounced": frozenset(),
        "disconnect": frozenset(),
    }
)

HookFunction: TypeAlias = Callable[[Any], Any]


def is_observer(hook: str) -> bool:
    """True for hooks whose return value is ignored (queue, outcomes, disconnect)."""
    return not HOOKS[hook]


@dataclass(frozen=True, slots=True)
class Plugin:
    """One enabled plugin: its name, where it came from, and its hook functions."""

    name: str
    origin: str
    hooks: Mapping[str, HookFunction]
    instance: object = None

    def close(self) -> None:
        """Call the plugin's ``close()`` if its setup() returned an object with one."""
        close = getattr(self.instance, "close", None)
        if callable(close):
            close()


class HookRunner:
    """Runs one hook of every enabled plugin, in order, and combines their decisions.

    :param plugins: the enabled plugins in run order.
    :param clock: the reactor (or a task.Clock in tests), for timeouts and observers.
    :param timeout_seconds: the limit for one plugin's hook call.
    :param log: where failures are logged (default: the twistedrelay.hooks logger).
    """

    def __init__(
        self,
        plugins: Sequence[Plugin],
        clock: IReactorTime,
        timeout_seconds: float = DEFAULT_HOOK_TIMEOUT,
        log: Logger | None = None,
    ) -> None:
        self.plugins = tuple(plugins)
        self._clock = clock
        self._timeout = timeout_seconds
        self._log = log if log is not None else _log
        self._by_hook: dict[str, tuple[Plugin, ...]] = {
            hook: tuple(p for p in self.plugins if hook in p.hooks) for hook in HOOKS
        }
        self._observers_running: set[defer.Deferred[None]] = set()

    def has_hook(self, hook: str) -> bool:
        """Whether any enabled plugin implements ``hook``.

        Callers skip building the context when none does (the inbound hot path).
        """
        return bool(self._by_hook[hook])

    def run(self, hook: str, ctx: HookContext) -> defer.Deferred[Decision]:
        """Run ``hook`` of every plugin that has it, in order; never fails.

        The first decision that is not proceed wins and stops the run (``accept`` included).
        Header edits of proceed decisions accumulate and are carried by the final decision.
        An exception, a timeout or a verdict the hook may not return is logged with the
        plugin's name and becomes ``tempfail(451 4.3.0)``. Observer hooks are started on the
        next reactor turn and their errors only logged: the Deferred fires at once with
        proceed.

        :param hook: one of :data:`HOOKS`.
        :param ctx: the context type matching ``hook``.
        :returns: a Deferred that fires with the combined Decision (already fired when no
            plugin implements the hook).
        :raises KeyError: ``hook`` is not a hook name (a programming error in the caller).
        """
        plugins = self._by_hook[hook]
        if not plugins:
            return defer.succeed(PROCEED)
        if is_observer(hook):
            self._start_observers(hook, plugins, ctx)
            return defer.succeed(PROCEED)
        return defer.ensureDeferred(self._run_deciders(hook, plugins, ctx))

    def drain(self) -> defer.Deferred[None]:
        """Fires when every observer hook started so far has finished (for shutdown, tests)."""
        running = list(self._observers_running)
        return defer.DeferredList(running, consumeErrors=True).addCallback(lambda _: None)

    def close(self) -> None:
        """Let every plugin release what its setup() acquired (files, databases)."""
        for plugin in self.plugins:
            plugin.close()

    async def _run_deciders(
        self, hook: str, plugins: tuple[Plugin, ...], ctx: HookContext
    ) -> Decision:
        allowed = HOOKS[hook]
        added: list[tuple[str, str]] = []
        dropped: list[tuple[str, str | None]] = []
        stored = ctx
        for plugin in plugins:
            decision = await self._call(plugin, hook, ctx)
            if not isinstance(decision, Decision):
                decision = self._invalid(plugin, hook, f"returned {decision!r}, not a Decision")
            elif not decision.is_proceed and decision.verdict not in allowed:
                decision = self._invalid(plugin, hook, f"may not return {decision.verdict.value}")
            elif (decision.add_headers or decision.drop_headers) and hook != "data":
                decision = self._invalid(plugin, hook, "edits headers outside the data hook")
            added.extend(decision.add_headers)
            dropped.extend(decision.drop_headers)
            if isinstance(stored, DataContext) and (decision.add_headers or decision.drop_headers):
                ctx = _as_delivered(stored, added, dropped)
            if not decision.is_proceed:
                return replace(
                    decision,
                    add_headers=tuple(added),
                    drop_headers=tuple(dropped),
                    decided_by=decision.decided_by or plugin.name,
                )
        if not added and not dropped:
            return PROCEED
        return Decision(Verdict.PROCEED, add_headers=tuple(added), drop_headers=tuple(dropped))

    def _invalid(self, plugin: Plugin, hook: str, problem: str) -> Decision:
        self._log.error(
            "plugin {plugin} hook_{hook} {problem}", plugin=plugin.name, hook=hook, problem=problem
        )
        return replace(Decision.tempfail(), decided_by=plugin.name)

    async def _call(self, plugin: Plugin, hook: str, ctx: HookContext) -> object:
        """One hook call with its timeout; an exception or timeout becomes tempfail."""
        d: defer.Deferred[object] = defer.maybeDeferred(_call_hook, plugin.hooks[hook], ctx)
        if not d.called:
            d.addTimeout(self._timeout, self._clock)
        try:
            return await d
        except defer.TimeoutError:
            self._log.failure(
                "plugin {plugin} hook_{hook} timed out after {timeout_seconds}s",
                plugin=plugin.name,
                hook=hook,
                timeout_seconds=self._timeout,
            )
        except Exception:
            self._log.failure("plugin {plugin} hook_{hook} failed", plugin=plugin.name, hook=hook)
        return replace(Decision.tempfail(), decided_by=plugin.name)

    def _start_observers(self, hook: str, plugins: tuple[Plugin, ...], ctx: HookContext) -> None:
        async def observe() -> None:
            for plugin in plugins:
                await self._call(plugin, hook, ctx)

        started: defer.Deferred[None] = defer.Deferred()
        started.addCallback(lambda _: defer.ensureDeferred(observe()))
        self._observers_running.add(started)
        started.addBoth(self._observer_done, started)
        # Off the hot path: the caller's callback chain finishes before any plugin runs.
        self._clock.callLater(0, started.callback, None)

    def _observer_done(self, result: object, started: defer.Deferred[None]) -> None:
        self._observers_running.discard(started)
        if isinstance(result, Failure):
            self._log.failure("observer hooks failed", failure=result)


def _call_hook(function: HookFunction, ctx: HookContext) -> object:
    result = function(ctx)
    if inspect.iscoroutine(result):
        return defer.ensureDeferred(result)
    return result


# -- loading --------------------------------------------------------------------------------


class SettingsError(ValueError):
    """A plugin setting that cannot be used; ``key`` is relative to ``[plugins.<name>]``."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


def check_settings(settings: Mapping[str, Any], known: Collection[str]) -> None:
    """Refuse settings keys a plugin does not know (DESIGN: unknown keys stop start-up).

    :raises SettingsError: naming the first unknown key.
    """
    for key in settings:
        if key not in known:
            raise SettingsError(key, "unknown key")


@dataclass(frozen=True, slots=True)
class PluginEnvironment:
    """What the relay tells a plugin's setup() besides its settings.

    :ivar name: the plugin's name as enabled (the key for ``ctx.notes`` and results).
    :ivar state_directory: a directory the plugin may keep state in, shared by all worker
        processes; None when the relay did not provide one.
    :ivar run_in_thread: ``run_in_thread(function, *args)`` runs blocking work (signing a
        large message, say) in the reactor's thread pool and returns a Deferred of its
        result; None when the relay offers no thread pool (then run the work inline).
    """

    name: str
    state_directory: Path | None = None
    run_in_thread: Callable[..., defer.Deferred[Any]] | None = None


def plugin_state_directory(config: Config) -> Path:
    """Where plugins keep state shared by all workers: ``<queue.directory>/plugin-state``.

    The composition root passes this to :func:`load_plugins`; plugins create it on first use.
    """
    return config.queue.directory / "plugin-state"


def load_plugins(
    plugins: PluginsConfig,
    clock: IReactorTime,
    source: str = "<config>",
    state_directory: Path | None = None,
    run_in_thread: Callable[..., defer.Deferred[Any]] | None = None,
) -> HookRunner:
    """Import, set up and order the enabled plugins.

    A name resolves first to the bundled module ``twistedrelay_plugins.<name>``, then to the
    entry point ``<name>`` of group ``twistedrelay.plugins``. ``setup(settings)`` (or
    ``setup(settings, environment)``) receives ``[plugins.<name>]``; when it returns an
    object, that object's ``hook_*`` attributes are the hooks, else the module's are.

    :param plugins: the ``[plugins]`` table.
    :param clock: passed to the HookRunner.
    :param source: the config file name, for errors.
    :param state_directory: given to plugins as ``environment.state_directory``.
    :param run_in_thread: given to plugins as ``environment.run_in_thread``; the composition
        root passes ``partial(threads.deferToThreadPool, reactor, reactor.getThreadPool())``.
    :raises ConfigError: an unknown plugin, a plugin enabled twice, settings for a plugin
        that is not enabled, a setting the plugin refuses, or a misnamed hook function.
    """
    loaded: list[Plugin] = []
    try:
        for name in plugins.enabled:
            if any(p.name == name for p in loaded):
                raise ConfigError(source, "plugins.enabled", f"plugin {name!r} is enabled twice")
            settings = plugins.settings.get(name, {})
            environment = PluginEnvironment(name, state_directory, run_in_thread)
            loaded.append(_load_one(name, settings, environment, source))
        for name in plugins.settings:
            if name not in plugins.enabled:
                raise ConfigError(
                    source, f"plugins.{name}", "settings for a plugin that is not enabled"
                )
    except BaseException:
        for plugin in loaded:
            plugin.close()
        raise
    return HookRunner(loaded, clock, plugins.hook_timeout)


def _load_one(
    name: str, settings: Mapping[str, Any], environment: PluginEnvironment, source: str
) -> Plugin:
    module, origin = _import_plugin(name, source)
    setup = getattr(module, "setup", None)
    instance: object = None
    if setup is None:
        if settings:
            key = next(iter(settings))
            raise ConfigError(
                source, f"plugins.{name}.{key}", "unknown key (the plugin takes no settings)"
            )
    else:
        try:
            if "environment" in inspect.signature(setup).parameters:
                instance = setup(settings, environment=environment)
            else:
                instance = setup(settings)
        except SettingsError as e:
            raise ConfigError(source, f"plugins.{name}.{e.key}", e.problem) from None
        except (ValueError, TypeError, OSError, ImportError, LookupError) as e:
            raise ConfigError(source, f"plugins.{name}", str(e)) from None
        except Exception as e:  # noqa: BLE001 (a plugin's own bug: one line, not a traceback)
            raise ConfigError(
                source, f"plugins.{name}", f"setup() failed: {type(e).__name__}: {e}"
            ) from None
    provider = module if instance is None else instance
    hooks = {}
    for attribute in dir(provider):
        if not attribute.startswith("hook_"):
            continue
        hook = attribute.removeprefix("hook_")
        if hook not in HOOKS:
            raise ConfigError(
                source, "plugins.enabled", f"plugin {name!r} defines {attribute}, not a known hook"
            )
        function = getattr(provider, attribute)
        if callable(function):
            hooks[hook] = function
    return Plugin(name, origin, {h: hooks[h] for h in HOOKS if h in hooks}, instance)


def _import_plugin(name: str, source: str) -> tuple[Any, str]:
    """The plugin's module (or entry-point object) and a description of where it came from."""
    if name.isidentifier():
        module_name = f"{BUNDLED_PACKAGE}.{name}"
        try:
            return importlib.import_module(module_name), f"bundled ({module_name})"
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise ConfigError(source, "plugins.enabled", f"plugin {name!r}: {e}") from None
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.name == name:
            try:
                target = entry_point.load()
            except Exception as e:
                raise ConfigError(
                    source, "plugins.enabled", f"plugin {name!r} ({entry_point.value}): {e}"
                ) from None
            distribution = entry_point.dist.name if entry_point.dist is not None else "?"
            return target, f"entry point ({entry_point.value}, from {distribution})"
    raise ConfigError(
        source,
        "plugins.enabled",
        f"unknown plugin {name!r}: not bundled and no {ENTRY_POINT_GROUP} entry point",
    )


# -- `twistedrelay plugins` -----------------------------------------------------------------


def describe(runner: HookRunner) -> Iterator[str]:
    """Lines for ``twistedrelay plugins``: each plugin in run order with its hooks."""
    if not runner.plugins:
        yield "no plugins enabled"
        return
    width = max(len(p.name) for p in runner.plugins)
    for position, plugin in enumerate(runner.plugins, 1):
        hooks = " ".join(plugin.hooks) or "(no hooks)"
        yield f"{position:2d}. {plugin.name:<{width}}  {hooks}  [{plugin.origin}]"
    yield ""
    yield "per hook, in run order:"
    for hook in HOOKS:
        names = [p.name for p in runner.plugins if hook in p.hooks]
        if names:
            yield f"  {hook:<10} {' -> '.join(names)}"


def plugins_main(argv: list[str]) -> int:
    """``twistedrelay plugins [--order] [--config FILE]``: print the enabled plugins in order.

    Loading runs each plugin's setup(), so this also checks the plugin settings.

    :returns: 0, or 1 when the config or a plugin cannot be loaded.
    """
    parser = argparse.ArgumentParser(
        prog="twistedrelay plugins", description="List the enabled hook plugins in run order."
    )
    parser.add_argument("--config", help="relay.toml (default: the embedded default)")
    parser.add_argument("--order", action="store_true", help="accepted for Haraka habits")
    options = parser.parse_args(argv)
    from twisted.internet import task

    try:
        config = load_config(options.config)
        runner = load_plugins(
            config.plugins, task.Clock(), config.source, plugin_state_directory(config)
        )
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    try:
        for line in describe(runner):
            print(line)
    finally:
        runner.close()
    return 0


def validate_plugins(plugins: PluginsConfig, source: str) -> None:
    """Set the enabled plugins up once and close them again, to check their settings.

    Used by ``check-config`` and by twistd before anything binds, so a bad plugin setting
    stops start-up with one line naming the key instead of a worker crash loop. Plugins
    get a throwaway state directory: checking leaves no file behind.

    :raises ConfigError: an unknown plugin, an unknown or bad setting.
    """
    from twisted.internet.task import Clock

    with tempfile.TemporaryDirectory(prefix="twistedrelay-check-") as state:
        load_plugins(plugins, Clock(), source, state_directory=Path(state)).close()
