"""The sink's SMTP server: a fast, scriptable receiver that counts what it gets.

Owns the Twisted protocol and factory of ``twistedrelay bench sink`` and their counters;
the command line is in :mod:`twistedrelay.bench.sink`, the in-process test wrapper in
:mod:`twistedrelay.testing.sink`. Like Postfix's smtp-sink it is a standalone tool: it
shares no code with the relay's own ServerSession, so a bug in the relay's SMTP server
cannot hide in the tool that measures it. What to answer at each stage is decided in
:mod:`twistedrelay.bench.behaviour`.

Fast because it works on chunks: pipelined commands are split with ``bytes.find``, DATA is
scanned for ``CRLF.CRLF`` per received chunk with a 4-byte tail carried across chunks, and
all replies to one chunk go out in one write. Message content is kept only when someone
needs it (recording, ``--save-dir``, ``--check-sequence``: then only the head).

Counts: connections (total, current, most at once, refused), transactions (MAIL accepted),
messages and recipients accepted, content bytes, refusals by reply code, and optionally
unique/duplicate/missing messages by a sequence header (see :class:`SequenceTracker`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IOpenSSLServerConnectionCreator,
    IReactorTime,
    ITLSTransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from typing_extensions import override
from zope.interface import implementer

from twistedrelay.bench.behaviour import Action, SinkBehaviour, Stage, StageContext
from twistedrelay.bench.stats import SequenceTracker, extract_header
from twistedrelay.smtp import replies
from twistedrelay.smtp.replies import Reply
from twistedrelay.tls import SIGNING_KEY_TYPES

DEFAULT_MAX_SIZE = 36700160
_HEAD_BYTES = 16384  # enough for any sane header section when checking a sequence header
_MAX_LINE = 4096


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """One message the sink accepted, as recorded for tests."""

    sender: bytes
    recipients: tuple[bytes, ...]
    content: bytes
    """The message as received, dot-unstuffed, CRLF line endings."""
    helo: bytes
    connection_number: int


@dataclass(slots=True)
class SinkStats:
    """Counters of one sink; ``as_dict`` is the JSON the command line prints.

    ``connections_total`` includes refused connections. ``transactions`` counts MAIL
    commands accepted; ``messages``, ``recipients`` and ``bytes`` count accepted messages
    only (``bytes``: DATA as received, before dot-unstuffing); ``messages_bdat`` those of
    them that came with BDAT. ``refusals`` counts every reply of 400 or more by code;
    ``hang_ups`` every connection the sink dropped on purpose.
    """

    started_at: float
    connections_total: int = 0
    connections_current: int = 0
    connections_max_concurrent: int = 0
    connections_refused: int = 0
    transactions: int = 0
    messages: int = 0
    messages_bdat: int = 0
    recipients: int = 0
    bytes: int = 0
    hang_ups: int = 0
    refusals: dict[int, int] = field(default_factory=dict)
    first_message_at: float | None = None
    last_message_at: float | None = None
    sequence: SequenceTracker | None = None

    def as_dict(self, now: float) -> dict[str, Any]:  # Any: JSON values of several types
        """The counters as a JSON-ready dict, with rates over the time messages arrived."""
        span = (
            self.last_message_at - self.first_message_at
            if self.first_message_at is not None and self.last_message_at is not None
            else 0.0
        )
        report: dict[str, Any] = {
            "uptime_seconds": round(now - self.started_at, 3),
            "connections_total": self.connections_total,
            "connections_current": self.connections_current,
            "connections_max_concurrent": self.connections_max_concurrent,
            "connections_refused": self.connections_refused,
            "transactions": self.transactions,
            "messages": self.messages,
            "messages_bdat": self.messages_bdat,
            "recipients": self.recipients,
            "bytes": self.bytes,
            "hang_ups": self.hang_ups,
            "refusals": {str(code): n for code, n in sorted(self.refusals.items())},
            "messages_span_seconds": round(span, 3),
            "messages_per_second": round((self.messages - 1) / span, 1) if span > 0 else 0.0,
        }
        if self.sequence is not None:
            report["sequence"] = self.sequence.report()
        return report


@dataclass(slots=True)
class SinkConfig:
    """How a sink behaves, shared by every connection of one :class:`SinkFactory`."""

    hostname: str = "sink.example.test"
    max_size: int = DEFAULT_MAX_SIZE
    max_connections: int = 0
    """Refuse connections beyond this many at once with 421 (0: no limit)."""
    behaviour: SinkBehaviour = field(default_factory=SinkBehaviour)
    record: bool = False
    """Keep every accepted message in :attr:`SinkFactory.messages` (tests)."""
    save_dir: Path | None = None
    sequence_header: str | None = None
    tls_options: SinkTLS | None = None
    """Server TLS (see :func:`load_tls_options`): when set, the sink offers STARTTLS."""
    chunking: bool = True
    """Offer CHUNKING (RFC 3030: BDAT), as Postfix's smtpd does since 3.4."""


class SinkFactory(Factory):
    """Builds one :class:`SinkProtocol` per connection and holds what they all count."""

    protocol = None  # buildProtocol is overridden

    def __init__(self, reactor: IReactorTime, config: SinkConfig | None = None) -> None:
        self.reactor = reactor
        self.config = config or SinkConfig()
        self.stats = SinkStats(started_at=reactor.seconds())
        if self.config.sequence_header:
            self.stats.sequence = SequenceTracker()
        self.messages: list[ReceivedMessage] = []
        self.message_listeners: list[Callable[[ReceivedMessage | None], None]] = []
        self.connections: set[SinkProtocol] = set()
        self._no_connection_waiters: list[defer.Deferred[None]] = []
        self._saved = 0
        self.ends_of_data = 0
        """Ends of data seen, accepted or not: :attr:`StageContext.message_number`."""
        self._build_replies()

    def _build_replies(self) -> None:
        config = self.config
        self.greeting = f"220 {config.hostname} ESMTP twistedrelay bench sink\r\n".encode()
        lines = [
            config.hostname + " Hello",
            "PIPELINING",
            f"SIZE {config.max_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            *(["CHUNKING"] if config.chunking else []),
        ]
        self.ehlo_reply = _multiline(250, lines)
        self.ehlo_reply_tls = _multiline(250, [*lines, "STARTTLS"])
        self.helo_reply = f"250 {config.hostname}\r\n".encode()

    @override
    def buildProtocol(self, addr: IAddress | None) -> SinkProtocol:
        self.stats.connections_total += 1
        return SinkProtocol(self, self.stats.connections_total)

    def wants_content(self) -> bool:
        """True when accepted messages must be kept whole (record or save)."""
        return self.config.record or self.config.save_dir is not None

    def message_accepted(
        self,
        protocol: SinkProtocol,
        sender: bytes,
        recipients: list[bytes],
        size: int,
        content: bytes | None,
        head: bytes | None,
        chunked: bool = False,
    ) -> None:
        """Count one accepted message; record, save and check its sequence as configured."""
        stats = self.stats
        now = self.reactor.seconds()
        if stats.first_message_at is None:
            stats.first_message_at = now
        stats.last_message_at = now
        stats.messages += 1
        stats.messages_bdat += chunked
        stats.recipients += len(recipients)
        stats.bytes += size
        if stats.sequence is not None and self.config.sequence_header:
            source = content if content is not None else head or b""
            value = extract_header(source, self.config.sequence_header.lower().encode())
            stats.sequence.record(value, recipients)
        if content is None:
            return
        message = ReceivedMessage(
            sender, tuple(recipients), content, protocol.helo or b"", protocol.number
        )
        if self.config.save_dir is not None:
            self._save(message)
        if self.config.record:
            self.messages.append(message)
            for listener in list(self.message_listeners):
                listener(message)

    def _save(self, message: ReceivedMessage) -> None:
        # Like smtp-sink -d: the envelope as X- headers in front of the content.
        assert self.config.save_dir is not None
        self._saved += 1
        envelope = [b"X-Sink-Mail-From: <" + message.sender + b">\r\n"]
        envelope += [b"X-Sink-Rcpt-To: <" + r + b">\r\n" for r in message.recipients]
        path = self.config.save_dir / f"{os.getpid()}-{self._saved:08d}.eml"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(b"".join(envelope) + message.content)
        tmp.rename(path)

    def connection_closed(self, protocol: SinkProtocol) -> None:
        """Forget a closed connection; wake whoever waits for no connections left."""
        if protocol not in self.connections:
            return
        self.connections.discard(protocol)
        self.stats.connections_current = len(self.connections)
        if not self.connections:
            waiters, self._no_connection_waiters = self._no_connection_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def close_connections(self) -> defer.Deferred[None]:
        """Abort every open connection; fires once all of them are gone."""
        if not self.connections:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._no_connection_waiters.append(waiter)
        for protocol in list(self.connections):
            protocol.transport.abortConnection()
        return waiter

    def refused(self, code: int) -> None:
        """Count one refusal (any reply of 400 or more) by its code."""
        refusals = self.stats.refusals
        refusals[code] = refusals.get(code, 0) + 1


_STATE_COMMAND = 0
_STATE_DATA = 1
_STATE_CHUNK = 2  # reading the octets of a BDAT chunk


class SinkProtocol(Protocol):
    """One SMTP session of the sink: splits pipelined commands, scans DATA, batches replies."""

    # Set before any method below runs (so not Optional as in Protocol), to a TCP connection,
    # which offers startTLS: the sink listens with listenTCP.
    transport: ITLSTransport

    def __init__(self, factory: SinkFactory, number: int) -> None:
        self.factory = factory
        self.number = number
        self.behaviour = factory.config.behaviour
        self.helo: bytes | None = None
        self.sender: bytes | None = None
        self.recipients: list[bytes] = []
        self._buffer = b""
        self._state = _STATE_COMMAND
        self._data_skip = 0
        self._data_size = 0
        self._chunk_left = 0  # octets of the current BDAT chunk still to read
        self._chunk_size = 0
        self._chunk_last = False
        self._chunk_refusal: Reply | None = None  # the reply after a chunk that is discarded
        self._chunked = False  # the message in progress came with BDAT
        self._parts: list[bytes] | None = None
        self._head: list[bytes] | None = None
        self._head_size = 0
        self._hang_up_in_data = False
        self._discard_rest = False
        self._paused = False
        self._closed = False
        self._tls = False
        self._delayed: IDelayedCall | None = None
        self._out: list[bytes] = []

    # -- Twisted callbacks -------------------------------------------------------------

    @override
    def connectionMade(self) -> None:
        factory = self.factory
        stats = factory.stats
        limit = factory.config.max_connections
        if limit and len(factory.connections) >= limit:
            stats.connections_refused += 1
            factory.refused(421)
            self._closed = True
            self.transport.write(replies.TOO_MANY_CONNECTIONS.to_bytes())
            self.transport.loseConnection()
            return
        factory.connections.add(self)
        stats.connections_current = len(factory.connections)
        if stats.connections_current > stats.connections_max_concurrent:
            stats.connections_max_concurrent = stats.connections_current
        if self.behaviour.script is None:
            self.transport.write(factory.greeting)
            return
        action = self.behaviour.decide(StageContext(Stage.CONNECT, self.number))
        self._respond(action, factory.greeting)
        self._flush()

    @override
    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        self._buffer = self._buffer + data if self._buffer else data
        if not self._paused:
            self._run()

    @override
    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        if self._delayed is not None and self._delayed.active():
            self._delayed.cancel()
        self.factory.connection_closed(self)

    # -- the loop over one received chunk ----------------------------------------------

    def _run(self) -> None:
        buf = self._buffer
        pos = 0
        size = len(buf)
        while not self._paused and not self._closed:
            if self._state == _STATE_CHUNK:
                take = min(self._chunk_left, size - pos)
                if self._chunk_refusal is None:
                    self._data_content(buf, pos, pos + take)
                pos += take
                self._chunk_left -= take
                if self._chunk_left:
                    break
                self._state = _STATE_COMMAND
                self._end_of_chunk()
                continue
            if self._state == _STATE_DATA:
                if self._hang_up_in_data:
                    if pos < size:
                        self._hang_up()
                    break
                # RFC 5321 §4.1.1.4: the data ends with CRLF.CRLF; the CRLF that ended the
                # DATA command counts as the first CRLF (skipped as content).
                end = buf.find(b"\r\n.\r\n", pos)
                start = pos + self._data_skip
                if end < 0:
                    keep_from = size - 4
                    if keep_from > start:
                        self._data_content(buf, start, keep_from)
                        self._data_skip = 0
                        pos = keep_from
                    break
                self._data_content(buf, start, end + 2)
                pos = end + 5
                self._state = _STATE_COMMAND
                self._end_of_data()
                continue
            end = buf.find(b"\r\n", pos)
            if end < 0:
                if size - pos > _MAX_LINE:
                    self._out.append(replies.LINE_TOO_LONG.to_bytes())
                    self._hang_up()
                break
            line = buf[pos:end]
            pos = end + 2
            if self._command(line):
                # Keep the command's CRLF in the buffer: it may be the start of CRLF.CRLF.
                pos -= 2
                self._data_skip = 2
            elif self._discard_rest:
                self._discard_rest = False
                pos = size
        self._buffer = buf[pos:] if pos else buf
        if self._closed:
            self._buffer = b""
        self._flush()

    def _flush(self) -> None:
        if self._out:
            self.transport.write(b"".join(self._out))
            self._out = []

    def _hang_up(self) -> None:
        self.factory.stats.hang_ups += 1
        self._closed = True
        self._flush()
        self.transport.loseConnection()

    # -- commands ----------------------------------------------------------------------

    def _command(self, line: bytes) -> bool:
        """Handle one command line; True when DATA was accepted (the rest is content)."""
        verb = line[:4].upper()
        if verb == b"MAIL":
            self._mail(line)
        elif verb == b"RCPT":
            self._rcpt(line)
        elif verb == b"DATA":
            return self._data()
        elif verb == b"BDAT" and self.factory.config.chunking:
            self._bdat(line)
        elif verb == b"RSET":
            self._reset()
            self._out.append(_RESET_OK)
        elif verb == b"EHLO" or verb == b"HELO":
            self._hello(line, extended=verb == b"EHLO")
        elif verb == b"NOOP":
            self._out.append(_NOOP_OK)
        elif verb == b"QUIT":
            self._out.append(_CLOSING)
            self._closed = True
            self._flush()
            self.transport.loseConnection()
        elif line.upper() == b"STARTTLS":
            self._starttls()
        elif verb == b"VRFY":
            self._out.append(replies.CANNOT_VRFY.to_bytes())
        elif verb == b"HELP":
            self._out.append(replies.HELP.to_bytes())
        else:
            self._refuse(replies.UNKNOWN_COMMAND)
        return False

    def _refuse(self, reply: Reply) -> None:
        self.factory.refused(reply.code)
        self._out.append(reply.to_bytes())

    def _reset(self) -> None:
        self.sender = None
        self.recipients = []

    def _hello(self, line: bytes, *, extended: bool) -> None:
        self._reset()
        self.helo = line[5:].strip()
        factory = self.factory
        if extended:
            offer_tls = factory.config.tls_options is not None and not self._tls
            positive = factory.ehlo_reply_tls if offer_tls else factory.ehlo_reply
        else:
            positive = factory.helo_reply
        self._decide(Stage.HELO, positive)

    def _mail(self, line: bytes) -> None:
        if self.helo is None:
            self._refuse(replies.HELO_REQUIRED)
            return
        if self.sender is not None:
            self._refuse(replies.NESTED_MAIL)
            return
        parsed = _parse_path(line, b"FROM")
        if parsed is None:
            self._refuse(replies.BAD_SENDER_SYNTAX)
            return
        address, params = parsed
        max_size = self.factory.config.max_size
        declared = params.upper().find(b"SIZE=")
        if declared >= 0 and max_size:
            digits = params[declared + 5 :].split(b" ", 1)[0]
            if digits.isdigit() and int(digits) > max_size:
                self._refuse(replies.MESSAGE_TOO_BIG)
                return
        stats = self.factory.stats
        stats.transactions += 1
        if self.behaviour.is_plain():
            self.sender = address
            self._out.append(_SENDER_OK)
            return
        ctx = StageContext(
            Stage.MAIL, self.number, stats.transactions, helo=self.helo, argument=address
        )
        if self._respond(self.behaviour.decide(ctx), _SENDER_OK):
            self.sender = address

    def _rcpt(self, line: bytes) -> None:
        if self.sender is None:
            self._refuse(replies.NEED_MAIL)
            return
        parsed = _parse_path(line, b"TO")
        if parsed is None:
            self._refuse(replies.BAD_ADDRESS_SYNTAX)
            return
        address = parsed[0]
        ctx = StageContext(
            Stage.RCPT,
            self.number,
            self.factory.stats.transactions,
            helo=self.helo or b"",
            sender=self.sender,
            argument=address,
            recipients=self.recipients,
        )
        if self._respond(self.behaviour.decide(ctx), _RECIPIENT_OK):
            self.recipients.append(address)

    def _data(self) -> bool:
        if self.sender is None:
            self._refuse(replies.NEED_MAIL)
            return False
        if not self.recipients:
            self._refuse(replies.NEED_RECIPIENTS)
            return False
        ctx = StageContext(
            Stage.DATA,
            self.number,
            self.factory.stats.transactions,
            helo=self.helo or b"",
            sender=self.sender,
            recipients=self.recipients,
        )
        action = self.behaviour.decide(ctx)
        if action is not None and action.hang_up:
            self._hang_up_in_data = True
            action = Action(delay_seconds=action.delay_seconds)
        if not self._respond(action, _START_MAIL_INPUT):
            return False
        self._state = _STATE_DATA
        self._start_content()
        return True

    def _start_content(self) -> None:
        """A message's content begins (DATA or a first BDAT chunk): keep what is needed."""
        self._data_size = 0
        self._parts = [] if self.factory.wants_content() else None
        if self.factory.stats.sequence is not None and self._parts is None:
            self._head, self._head_size = [], 0
        else:
            self._head = None

    def _bdat(self, line: bytes) -> None:
        """BDAT <size> [LAST] (RFC 3030): read the chunk's octets as they are."""
        words = line.split()
        last = len(words) == 3 and words[2].upper() == b"LAST"
        if len(words) not in (2, 3) or not words[1].isdigit() or (len(words) == 3 and not last):
            self._refuse(_BAD_BDAT)
            return
        self._state = _STATE_CHUNK
        self._chunk_left = self._chunk_size = int(words[1])
        self._chunk_last = last
        self._chunk_refusal = None
        if self.sender is None:
            self._chunk_refusal = replies.NEED_MAIL
        elif not self.recipients:
            self._chunk_refusal = replies.NEED_RECIPIENTS
        elif not self._chunked:
            self._start_chunked_message()

    def _start_chunked_message(self) -> None:
        """The first chunk: DATA's decision (a refusal or hang-up; no 354 to delay)."""
        ctx = StageContext(
            Stage.DATA,
            self.number,
            self.factory.stats.transactions,
            helo=self.helo or b"",
            sender=self.sender or b"",
            recipients=self.recipients,
        )
        action = None if self.behaviour.is_plain() else self.behaviour.decide(ctx)
        if action is not None and action.hang_up:
            self._hang_up_in_data = True
        elif action is not None and action.reply is not None and action.reply.code >= 400:
            self._chunk_refusal = action.reply
            return
        self._chunked = True
        self._start_content()

    def _end_of_chunk(self) -> None:
        if self._hang_up_in_data:
            self._hang_up_in_data = False
            self._hang_up()
            return
        if self._chunk_refusal is not None:
            # RFC 3030 §2: a refused chunk fails the transaction; chunks after it find no
            # MAIL and are refused and discarded too.
            self._refuse(self._chunk_refusal)
            self._chunked = False
            self._parts = self._head = None
            self._reset()
            return
        if not self._chunk_last:
            self._out.append(b"250 2.0.0 %d octets received\r\n" % self._chunk_size)
            return
        self._chunked = False
        self._end_of_data(chunked=True)

    def _data_content(self, buf: bytes, start: int, stop: int) -> None:
        if stop <= start:
            return
        self._data_size += stop - start
        if self._parts is not None:
            self._parts.append(buf[start:stop])
        elif self._head is not None and self._head_size < _HEAD_BYTES:
            self._head.append(buf[start:stop])
            self._head_size += stop - start

    def _end_of_data(self, *, chunked: bool = False) -> None:
        factory = self.factory
        stats = factory.stats
        sender = self.sender or b""
        recipients = self.recipients
        self._reset()
        content: bytes | None = None
        if self._parts is not None and chunked:
            content = b"".join(self._parts)  # BDAT: the octets as sent (RFC 3030)
            self._parts = None
        elif self._parts is not None:
            # RFC 5321 §4.5.2: a line that starts with a dot loses that dot (the content
            # holds no lone-dot line: that was the terminator).
            joined = b"\r\n" + b"".join(self._parts)
            content = joined.replace(b"\r\n.", b"\r\n")[2:]
            self._parts = None
        head = b"".join(self._head) if self._head is not None else None
        self._head = None
        size = self._data_size
        factory.ends_of_data += 1
        if factory.config.max_size and size > factory.config.max_size:
            self._refuse(replies.MESSAGE_TOO_BIG)
            return
        if self.behaviour.is_plain():
            self._out.append(_MESSAGE_OK)
            factory.message_accepted(self, sender, recipients, size, content, head, chunked)
            return
        ctx = StageContext(
            Stage.MESSAGE,
            self.number,
            stats.transactions,
            message_number=factory.ends_of_data,
            helo=self.helo or b"",
            sender=sender,
            recipients=recipients,
            content=content,
        )
        if self._respond(self.behaviour.decide(ctx), _MESSAGE_OK):
            factory.message_accepted(self, sender, recipients, size, content, head, chunked)

    def _starttls(self) -> None:
        options = self.factory.config.tls_options
        if options is None or self._tls:
            self._refuse(replies.COMMAND_NOT_IMPLEMENTED)
            return
        self._out.append(replies.READY_TO_START_TLS.to_bytes())
        self._flush()
        self.transport.startTLS(options)
        self._tls = True
        # RFC 3207 §4.2: forget everything said before TLS, including pipelined commands
        # that arrived in the clear after STARTTLS (the command injection attack).
        self.helo = None
        self._reset()
        self._discard_rest = True

    # -- replies -------------------------------------------------------------------------

    def _decide(self, stage: Stage, positive: bytes) -> bool:
        if self.behaviour.is_plain():
            self._out.append(positive)
            return True
        ctx = StageContext(stage, self.number, helo=self.helo or b"")
        return self._respond(self.behaviour.decide(ctx), positive)

    def _respond(self, action: Action | None, positive: bytes) -> bool:
        """Send the action's reply (or ``positive``); True when the command was accepted."""
        if action is None:
            self._out.append(positive)
            return True
        if action.hang_up:
            self._hang_up()
            return False
        reply = action.reply
        accepted = reply is None or reply.code < 400
        if reply is None:
            wire = positive
        else:
            wire = reply.to_bytes()
            if reply.code >= 400:
                self.factory.refused(reply.code)
        if action.delay_seconds > 0:
            self._flush()
            self._paused = True
            self._delayed = self.factory.reactor.callLater(
                action.delay_seconds, self._send_delayed, wire, action.close_after
            )
        else:
            self._out.append(wire)
            if action.close_after:
                self._closed = True
                self._flush()
                self.transport.loseConnection()
        return accepted

    def _send_delayed(self, wire: bytes, close_after: bool) -> None:
        self._delayed = None
        if self._closed:
            return
        self.transport.write(wire)
        if close_after:
            self._closed = True
            self.transport.loseConnection()
            return
        self._paused = False
        self._run()


@implementer(IOpenSSLServerConnectionCreator)
class SinkTLS:
    """Server TLS for the sink's STARTTLS: one pyOpenSSL context, any client accepted."""

    def __init__(self, context: SSL.Context) -> None:
        self.context = context

    def serverConnectionForTLS(self, tls_protocol: TLSMemoryBIOProtocol) -> SSL.Connection:  # noqa: N802
        """Twisted's IOpenSSLServerConnectionCreator: a connection on the context."""
        return SSL.Connection(self.context, None)


def load_tls_options(certificate_path: Path, key_path: Path) -> SinkTLS:
    """Server TLS from a PEM chain file (leaf first) and a PEM private key, for STARTTLS.

    :raises ValueError: when a file holds no certificate or key.
    :raises OpenSSL.SSL.Error: when the key does not match the certificate.
    """
    chain = x509.load_pem_x509_certificates(certificate_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, SIGNING_KEY_TYPES):
        raise TypeError("Unsupported key type")  # what pyOpenSSL's use_privatekey would raise
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.use_certificate(chain[0])
    for intermediate in chain[1:]:
        context.add_extra_chain_cert(intermediate)
    context.use_privatekey(key)
    context.check_privatekey()
    return SinkTLS(context)


_BAD_BDAT = Reply(501, "5.5.4", "Syntax: BDAT <size> [LAST]")
_SENDER_OK = replies.SENDER_OK.to_bytes()
_RECIPIENT_OK = replies.RECIPIENT_OK.to_bytes()
_START_MAIL_INPUT = replies.START_MAIL_INPUT.to_bytes()
_MESSAGE_OK = replies.OK.to_bytes()
_RESET_OK = replies.RESET_OK.to_bytes()
_NOOP_OK = replies.NOOP_OK.to_bytes()
_CLOSING = replies.CLOSING.to_bytes()


def _multiline(code: int, lines: list[str]) -> bytes:
    """A multi-line reply (RFC 5321 §4.2.1): ``code-`` on every line but the last."""
    head = "".join(f"{code}-{line}\r\n" for line in lines[:-1])
    return (head + f"{code} {lines[-1]}\r\n").encode()


def _parse_path(line: bytes, keyword: bytes) -> tuple[bytes, bytes] | None:
    """Split ``MAIL FROM:<a> params`` / ``RCPT TO:<a> params`` into (address, params)."""
    colon = line.find(b":", 5)
    if colon < 0 or line[5:colon].strip().upper() != keyword:
        return None
    rest = line[colon + 1 :].lstrip()
    if rest.startswith(b"<"):
        close = rest.find(b">")
        if close < 0:
            return None
        return rest[1:close], rest[close + 1 :].strip()
    address, _, params = rest.partition(b" ")
    return address, params.strip()
