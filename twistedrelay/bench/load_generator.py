"""The load generator of ``twistedrelay bench send``: many SMTP connections, many messages each.

Owns the Twisted client side of the benchmark: N sending connections, each carrying many
messages (a new MAIL after each final reply, RSET after a failed transaction), MAIL/RCPT/DATA
sent as one group when the server offers PIPELINING (RFC 2920), and the next group sent right
behind the end of data. With ``chunking`` and a server that offers CHUNKING (RFC 3030),
MAIL, the RCPTs and ``BDAT <size> LAST`` with the message go as one write instead, and the
next transaction starts after its reply. Like Postfix's smtp-source it is a standalone tool:
it shares no code with the relay's own ClientSession, so the tool that measures the relay
cannot share its bugs.

Every run is bounded: by a message count or a duration, and by a hard timeout that aborts
every connection. The acceptance latency of a message is the time from writing its final
``.`` (with BDAT: its MAIL…BDAT group) to reading the reply to it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IDelayedCall,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.python.failure import Failure
from typing_extensions import override

from twistedrelay.bench.messages import Message, MessageBuilder
from twistedrelay.bench.stats import summarize_latencies
from twistedrelay.transport import connect_tcp


@dataclass(slots=True)
class SendOptions:
    """What one run of the load generator does."""

    host: str = "127.0.0.1"
    port: int = 2525
    connections: int = 20
    messages: int = 1000
    """Messages to send in all; 0 with a duration means "until the duration ends"."""
    duration_seconds: float = 0.0
    rate: float = 0.0
    """Target messages per second over all connections (0: as fast as possible)."""
    pipelining: bool = True
    chunking: bool = False
    """Send each message as MAIL, RCPTs and ``BDAT <size> LAST`` in one write (RFC 3030)
    when the server offers CHUNKING and PIPELINING; else DATA."""
    helo: str = "bench.example.test"
    messages_per_connection: int = 0
    """Reconnect after this many transactions on one connection (0: never)."""
    hold_idle: int = 0
    """Extra connections that say EHLO and then only NOOP, held while the load runs."""
    idle_noop_seconds: float = 30.0
    timeout_seconds: float = 0.0
    """Hard limit of the whole run (0: 600 s, or duration + 60 s)."""
    progress_seconds: float = 1.0
    """Interval of the progress callback (0: none)."""

    def hard_timeout(self) -> float:
        """The effective hard timeout in seconds."""
        if self.timeout_seconds > 0:
            return self.timeout_seconds
        return self.duration_seconds + 60.0 if self.duration_seconds else 600.0


@dataclass(slots=True)
class SendReport:
    """The outcome of one run; ``as_dict`` is the JSON ``bench send --json`` prints."""

    target: str
    connections: int
    elapsed_seconds: float = 0.0
    messages_attempted: int = 0
    messages_accepted: int = 0
    messages_tempfailed: int = 0
    messages_rejected: int = 0
    messages_failed: int = 0
    """Lost with the connection, or refused before DATA (MAIL, every RCPT, or DATA refused)."""
    recipients_accepted: int = 0
    recipients_refused: int = 0
    bytes_sent: int = 0
    connections_opened: int = 0
    pipelining_used: bool = False
    chunking_used: bool = False
    errors: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    idle_requested: int = 0
    idle_established: int = 0
    idle_lost: int = 0
    timed_out: bool = False

    def count_error(self, key: str) -> None:
        """Count one error by reply code (e.g. ``"451"``) or by kind (``"connection_lost"``)."""
        self.errors[key] = self.errors.get(key, 0) + 1

    def messages_per_second(self) -> float:
        """Accepted messages per second of the load phase."""
        return self.messages_accepted / self.elapsed_seconds if self.elapsed_seconds else 0.0

    def as_dict(self) -> dict[str, Any]:  # Any: JSON values of several types
        """The report as a JSON-ready dict (latencies in milliseconds)."""
        return {
            "target": self.target,
            "connections": self.connections,
            "elapsed_seconds": round(self.elapsed_seconds, 3),
            "messages_attempted": self.messages_attempted,
            "messages_accepted": self.messages_accepted,
            "messages_tempfailed": self.messages_tempfailed,
            "messages_rejected": self.messages_rejected,
            "messages_failed": self.messages_failed,
            "recipients_accepted": self.recipients_accepted,
            "recipients_refused": self.recipients_refused,
            "messages_per_second": round(self.messages_per_second(), 1),
            "latency_ms": summarize_latencies(self.latencies),
            "errors": dict(sorted(self.errors.items())),
            "bytes_sent": self.bytes_sent,
            "connections_opened": self.connections_opened,
            "pipelining_used": self.pipelining_used,
            "chunking_used": self.chunking_used,
            "idle": {
                "requested": self.idle_requested,
                "established": self.idle_established,
                "lost": self.idle_lost,
            },
            "timed_out": self.timed_out,
        }


class LoadGenerator:
    """Runs one bounded load against one SMTP server and reports what happened.

    :param reactor: provides ``connectTCP``, ``callLater`` and ``seconds``.
    :param progress: called with a one-line summary every ``progress_seconds``.
    """

    def __init__(
        self,
        reactor: Any,  # IReactorTCP and IReactorTime at once
        options: SendOptions,
        builder: MessageBuilder | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.reactor = reactor
        self.options = options
        self.builder = builder or MessageBuilder()
        self.report = SendReport(f"{options.host}:{options.port}", options.connections)
        self._progress = progress
        self._next_sequence = 1
        self._started_at = 0.0
        self._ends_at = 0.0
        self._stopping = False
        self._finished = False
        self._ever_connected = False
        self._senders: set[SenderProtocol] = set()
        self._pending_connects = 0
        self._idle: set[IdleProtocol] = set()
        self._idle_pending = 0
        self._done: defer.Deferred[SendReport] = defer.Deferred()
        self._timers: list[IDelayedCall] = []
        self._last_progress = (0.0, 0)

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> defer.Deferred[SendReport]:
        """Start the run; the Deferred fires with the report when it is over (never fails)."""
        options = self.options
        self._timers.append(self.reactor.callLater(options.hard_timeout(), self._time_out))
        if options.hold_idle:
            self.report.idle_requested = options.hold_idle
            self._idle_pending = options.hold_idle
            for _ in range(options.hold_idle):
                connect_tcp(self.reactor, options.host, options.port, _IdleFactory(self))
        else:
            self._start_load()
        return self._done

    def _start_load(self) -> None:
        if self._stopping:
            return
        self._started_at = self.reactor.seconds()
        self._ends_at = self._started_at + self.options.duration_seconds
        if self.options.progress_seconds > 0 and self._progress is not None:
            self._schedule_progress()
        for _ in range(max(1, self.options.connections)):
            self._connect()

    def _connect(self) -> None:
        self._pending_connects += 1
        connect_tcp(self.reactor, self.options.host, self.options.port, _SenderFactory(self))

    def take(self, *, wait_ok: bool) -> tuple[int, float] | None:
        """Allocate the next message number and how long to wait before sending it.

        :param wait_ok: when False and the rate says "not yet", allocate nothing.
        :returns: (sequence, delay in seconds), or None when the run has no more to send.
        """
        due = self._next_due()
        if due is None:
            return None
        delay = due - self.reactor.seconds()
        if delay > 0 and not wait_ok:
            return None
        sequence = self._next_sequence
        self._next_sequence += 1
        self.report.messages_attempted += 1
        return sequence, max(delay, 0.0)

    def has_more(self) -> bool:
        """True while the run may still allocate messages."""
        return self._next_due() is not None

    def _next_due(self) -> float | None:
        """When the next message may be sent (now, or later under a rate); None: never."""
        options = self.options
        if self._stopping:
            return None
        allocated = self._next_sequence - 1
        if options.messages and allocated >= options.messages:
            return None
        now = self.reactor.seconds()
        due = self._started_at + allocated / options.rate if options.rate > 0 else now
        if options.duration_seconds and max(due, now) >= self._ends_at:
            return None
        return due

    # -- connection bookkeeping -----------------------------------------------------------

    def sender_connected(self, sender: SenderProtocol) -> None:
        """A sending connection is up."""
        self._pending_connects -= 1
        self._ever_connected = True
        self.report.connections_opened += 1
        self._senders.add(sender)

    def sender_failed_to_connect(self, reason: Failure) -> None:
        """Count a failed connect; retry shortly unless the server was never reachable."""
        self._pending_connects -= 1
        self.report.count_error("connect_failed")
        if self._ever_connected and self.has_more():
            self._pending_connects += 1
            self.reactor.callLater(0.2, self._retry_connect)
        self._maybe_finish()

    def _retry_connect(self) -> None:
        self._pending_connects -= 1
        if self.has_more():
            self._connect()
        self._maybe_finish()

    def sender_closed(self, sender: SenderProtocol, *, clean: bool) -> None:
        """A sending connection ended; open another while there is work left."""
        self._senders.discard(sender)
        if self.has_more():
            if clean:
                self._connect()
            else:
                self._pending_connects += 1
                self.reactor.callLater(0.05, self._retry_connect)
        self._maybe_finish()

    def idle_ready(self, idle: IdleProtocol) -> None:
        """An idle connection said EHLO successfully."""
        self._idle.add(idle)
        self.report.idle_established += 1
        self._idle_settled()

    def idle_failed(self) -> None:
        """An idle connection failed before it was established."""
        self.report.count_error("idle_connect_failed")
        self._idle_settled()

    def idle_lost(self, idle: IdleProtocol) -> None:
        """An established idle connection went away."""
        if idle in self._idle:
            self._idle.discard(idle)
            if not self._finished:
                self.report.idle_lost += 1

    def _idle_settled(self) -> None:
        self._idle_pending -= 1
        if self._idle_pending == 0:
            self._start_load()

    # -- the end ------------------------------------------------------------------------

    def _maybe_finish(self) -> None:
        if self._finished or self._senders or self._pending_connects > 0:
            return
        if self.has_more() and self._ever_connected:
            return
        self._finish()

    def _time_out(self) -> None:
        self.report.timed_out = True
        self._stopping = True
        for sender in list(self._senders):
            sender.abort()
        self._finish()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        self._stopping = True
        report = self.report
        if self._started_at:
            report.elapsed_seconds = self.reactor.seconds() - self._started_at
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        for idle in list(self._idle):
            idle.quit()
        self._report_progress()
        self._done.callback(report)

    def _schedule_progress(self) -> None:
        self._timers.append(
            self.reactor.callLater(self.options.progress_seconds, self._progress_tick)
        )

    def _progress_tick(self) -> None:
        if self._finished:
            return
        self._report_progress()
        self._schedule_progress()

    def _report_progress(self) -> None:
        if self._progress is None or not self._started_at:
            return
        report = self.report
        now = self.reactor.seconds()
        last_at, last_accepted = self._last_progress
        span = now - (last_at or self._started_at)
        recent = (report.messages_accepted - last_accepted) / span if span > 0 else 0.0
        self._last_progress = (now, report.messages_accepted)
        errors = sum(report.errors.values())
        self._progress(
            f"bench send: {now - self._started_at:6.1f}s sent {report.messages_attempted} "
            f"accepted {report.messages_accepted} ({recent:.0f}/s) "
            f"errors {errors} connections {len(self._senders)} idle {len(self._idle)}"
        )


# -- one sending connection --------------------------------------------------------------

_GREETING, _EHLO, _HELO, _MAIL, _RCPT, _DATA, _DOT, _RSET, _NOOP, _QUIT, _BDAT = range(11)


@dataclass(slots=True)
class _Transaction:
    message: Message
    accepted: int = 0
    answered: int = 0
    failed: bool = False
    done: bool = False
    written_at: float = 0.0
    next_started: bool = False


class SenderProtocol(Protocol):
    """One sending connection: EHLO, then transactions until the generator has no more."""

    # Set (to a TCP connection: the generator only calls connectTCP) before any method
    # below runs, so not Optional as in Protocol.
    transport: ITCPTransport

    def __init__(self, generator: LoadGenerator) -> None:
        self.generator = generator
        self.report = generator.report
        self._buffer = b""
        self._expect: deque[tuple[int, _Transaction | None]] = deque()
        self._outbox: deque[tuple[bytes, int, _Transaction | None]] = deque()
        self._pipelining = False
        self._chunking = False
        self._needs_reset = False
        self._transactions = 0
        self._closing = False
        self._clean = False
        self._wait: IDelayedCall | None = None
        self._multiline: list[bytes] = []
        self._helo = generator.options.helo.encode()

    @override
    def connectionMade(self) -> None:
        self.generator.sender_connected(self)
        self._expect.append((_GREETING, None))

    @override
    def dataReceived(self, data: bytes) -> None:
        buf = self._buffer + data if self._buffer else data
        pos = 0
        while True:
            end = buf.find(b"\r\n", pos)
            if end < 0:
                break
            line = buf[pos:end]
            pos = end + 2
            if line[3:4] == b"-":
                self._multiline.append(line)
                continue
            if self._multiline:
                self._multiline.append(line)
                lines, self._multiline = self._multiline, []
            else:
                lines = [line]
            code = int(line[:3]) if line[:3].isdigit() else 0
            self._reply(code, lines)
            if self._closing and not self._expect:
                break
        self._buffer = buf[pos:]

    @override
    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._wait is not None and self._wait.active():
            self._wait.cancel()
            self.report.messages_failed += 1
        lost: set[int] = set()
        for _, txn in self._expect:
            if txn is not None and not txn.done and id(txn) not in lost:
                lost.add(id(txn))
                self.report.messages_failed += 1
        for _, _, txn in self._outbox:
            if txn is not None and not txn.done and id(txn) not in lost:
                lost.add(id(txn))
                self.report.messages_failed += 1
        if not self._clean:
            self.report.count_error("connection_lost")
        self._expect.clear()
        self._outbox.clear()
        self.generator.sender_closed(self, clean=self._clean)

    def abort(self) -> None:
        """Drop the connection at once (hard timeout)."""
        self._closing = True
        self.transport.abortConnection()

    # -- replies ---------------------------------------------------------------------------

    def _reply(self, code: int, lines: list[bytes]) -> None:
        if not self._expect:
            self.report.count_error("unexpected_reply")
            return
        kind, txn = self._expect.popleft()
        if kind == _DOT:
            assert txn is not None
            self._end_of_data_reply(code, txn)
        elif kind == _BDAT:
            assert txn is not None
            if txn.accepted:
                self._end_of_data_reply(code, txn)
            else:  # refused for want of a recipient: the server kept the MAIL
                self._abandon(txn)
        elif kind == _RCPT:
            assert txn is not None
            self._recipient_reply(code, txn)
        elif kind == _MAIL:
            assert txn is not None
            if code >= 400:
                self._error(code)
                txn.failed = True
                if not self._pipelining:
                    self._abandon(txn)
        elif kind == _DATA:
            assert txn is not None
            self._data_reply(code, txn)
        elif kind == _GREETING:
            if code != 220:
                self._error(code)
                self._quit()
                return
            self._write([(b"EHLO " + self._helo + b"\r\n", _EHLO, None)])
        elif kind == _EHLO:
            if code != 250:
                self._write([(b"HELO " + self._helo + b"\r\n", _HELO, None)])
                return
            offered = any(line[4:].upper().startswith(b"PIPELINING") for line in lines[1:])
            options = self.generator.options
            self._pipelining = offered and options.pipelining
            if self._pipelining:
                self.report.pipelining_used = True
            chunking = any(line[4:].upper().startswith(b"CHUNKING") for line in lines[1:])
            self._chunking = chunking and options.chunking and self._pipelining
            if self._chunking:
                self.report.chunking_used = True
            self._start_next()
        elif kind == _HELO:
            if code != 250:
                self._error(code)
                self._quit()
                return
            self._start_next()
        elif kind == _QUIT:
            self._clean = True
            self.transport.loseConnection()
        elif code >= 400:  # RSET, NOOP
            self._error(code)
        if self._outbox and not self._expect:
            self._send_one()

    def _recipient_reply(self, code: int, txn: _Transaction) -> None:
        txn.answered += 1
        if code < 300:
            txn.accepted += 1
            self.report.recipients_accepted += 1
        else:
            self.report.recipients_refused += 1
            self._error(code)
        if (
            not self._pipelining
            and txn.answered == len(txn.message.recipients)
            and txn.accepted == 0
        ):
            # RFC 5321 §3.3: no recipient was accepted, so DATA would only fail.
            self._abandon(txn)

    def _data_reply(self, code: int, txn: _Transaction) -> None:
        if code != 354:
            if not txn.failed and txn.accepted:
                self._error(code)
            self._abandon(txn)
            return
        content = txn.message.content
        self.transport.write(content + b".\r\n")
        self.report.bytes_sent += len(content) + 3
        txn.written_at = time.perf_counter()
        self._expect.append((_DOT, txn))
        if self._pipelining and not self._needs_reset:
            # RFC 2920 §3.1: the end of data may be followed by the next group.
            taken = self._take(wait_ok=False)
            if taken is not None:
                txn.next_started = True
                self._begin(taken)

    def _end_of_data_reply(self, code: int, txn: _Transaction) -> None:
        txn.done = True
        report = self.report
        report.latencies.append(time.perf_counter() - txn.written_at)
        if code < 300:
            report.messages_accepted += 1
        else:
            self._error(code)
            if code < 500:
                report.messages_tempfailed += 1
            else:
                report.messages_rejected += 1
        if not txn.next_started:
            self._start_next()

    def _abandon(self, txn: _Transaction) -> None:
        """Give up a transaction refused before its content; the next one starts with RSET."""
        if txn.done:
            return
        txn.done = True
        self.report.messages_failed += 1
        self._needs_reset = True
        self._outbox = deque(item for item in self._outbox if item[2] is not txn)
        if not txn.next_started:
            self._start_next()

    def _error(self, code: int) -> None:
        self.report.count_error(str(code))

    # -- commands --------------------------------------------------------------------------

    def _take(self, *, wait_ok: bool) -> tuple[int, float] | None:
        limit = self.generator.options.messages_per_connection
        if self._closing or (limit and self._transactions >= limit):
            return None
        return self.generator.take(wait_ok=wait_ok)

    def _start_next(self) -> None:
        if self._closing or self._wait is not None:
            return
        taken = self._take(wait_ok=True)
        if taken is None:
            if not any(txn is not None and not txn.done for _, txn in self._expect):
                self._quit()
            return
        sequence, delay = taken
        if delay > 0:
            self._wait = self.generator.reactor.callLater(delay, self._begin_after_wait, sequence)
        else:
            self._begin(taken)

    def _begin_after_wait(self, sequence: int) -> None:
        self._wait = None
        self._begin((sequence, 0.0))

    def _begin(self, taken: tuple[int, float]) -> None:
        self._transactions += 1
        message = self.generator.builder.build(taken[0])
        txn = _Transaction(message)
        commands: list[tuple[bytes, int, _Transaction | None]] = []
        if self._needs_reset:
            self._needs_reset = False
            commands.append((b"RSET\r\n", _RSET, None))
        commands.append((b"MAIL FROM:<" + message.sender + b">\r\n", _MAIL, txn))
        for recipient in message.recipients:
            commands.append((b"RCPT TO:<" + recipient + b">\r\n", _RCPT, txn))
        if self._chunking:
            # The builder's content has no line starting with ".": as sent with DATA.
            content = message.content
            commands.append((b"BDAT %d LAST\r\n" % len(content) + content, _BDAT, txn))
            self.report.bytes_sent += len(content)
            txn.written_at = time.perf_counter()
        else:
            commands.append((b"DATA\r\n", _DATA, txn))
        self._write(commands)

    def _write(self, commands: list[tuple[bytes, int, _Transaction | None]]) -> None:
        if self._pipelining:
            self.transport.write(b"".join(command for command, _, _ in commands))
            self._expect.extend((kind, txn) for _, kind, txn in commands)
            return
        self._outbox.extend(commands)
        if not self._expect:
            self._send_one()

    def _send_one(self) -> None:
        command, kind, txn = self._outbox.popleft()
        self.transport.write(command)
        self._expect.append((kind, txn))

    def _quit(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._outbox.clear()
        self.transport.write(b"QUIT\r\n")
        self._expect.append((_QUIT, None))


class _SenderFactory(ClientFactory):
    def __init__(self, generator: LoadGenerator) -> None:
        self.generator = generator

    @override
    def buildProtocol(self, addr: IAddress | None) -> SenderProtocol:
        return SenderProtocol(self.generator)

    @override
    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.generator.sender_failed_to_connect(reason)


# -- idle connections ---------------------------------------------------------------------


class IdleProtocol(Protocol):
    """A connection that says EHLO, then only a NOOP now and then, until the run ends."""

    transport: ITransport  # set before any method below runs, so not Optional as in Protocol

    def __init__(self, generator: LoadGenerator) -> None:
        self.generator = generator
        self._buffer = b""
        self._stage = _GREETING
        self._ready = False
        self._noop: IDelayedCall | None = None

    @override
    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\r\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\r\n", 1)
            if line[3:4] != b"-":
                self._reply(line[:3])

    def _reply(self, code: bytes) -> None:
        if self._stage == _GREETING:
            if code != b"220":
                self.transport.loseConnection()
                return
            self._stage = _EHLO
            self.transport.write(b"EHLO " + self.generator.options.helo.encode() + b"\r\n")
        elif self._stage == _EHLO:
            if code != b"250":
                self.transport.loseConnection()
                return
            self._stage = _NOOP
            self._ready = True
            self._schedule_noop()
            self.generator.idle_ready(self)

    def _schedule_noop(self) -> None:
        self._noop = self.generator.reactor.callLater(
            self.generator.options.idle_noop_seconds, self._send_noop
        )

    def _send_noop(self) -> None:
        self.transport.write(b"NOOP\r\n")
        self._schedule_noop()

    def quit(self) -> None:
        """End the idle session politely."""
        if self._noop is not None and self._noop.active():
            self._noop.cancel()
        self.transport.write(b"QUIT\r\n")
        self.transport.loseConnection()

    @override
    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._noop is not None and self._noop.active():
            self._noop.cancel()
        if self._ready:
            self.generator.idle_lost(self)
        else:
            self.generator.idle_failed()


class _IdleFactory(ClientFactory):
    def __init__(self, generator: LoadGenerator) -> None:
        self.generator = generator

    @override
    def buildProtocol(self, addr: IAddress | None) -> IdleProtocol:
        return IdleProtocol(self.generator)

    @override
    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.generator.idle_failed()
