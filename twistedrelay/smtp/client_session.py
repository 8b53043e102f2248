"""One outbound SMTP connection, without I/O: the client side of the conversation.

Owns what the relay says to a mail host and what the host's replies mean for each
recipient. Deliberately not here: sockets, timers, TLS handshakes, pools, retries (the
Twisted adapter in ``delivery/`` does those) and the outcome of a reply
(``delivery/outcome.py``). Invariant: every recipient handed to :meth:`ClientSession.begin`
comes back in exactly one :class:`TransactionComplete`, with the one reply that decides it.

API (h2/h11 style: bytes in, events out; bytes to write collect in an outbox)::

    session = ClientSession("relay.example", tls_level="may")
    events = session.receive(data)        # every chunk read from the connection
    transport.write(session.data_to_send())   # after *every* call below

Events, in the order a connection produces them:

- :class:`Ready` -- greeting, EHLO (HELO fallback) and any STARTTLS are done, or
  :meth:`reset` made the connection ready again: :meth:`begin` may start a transaction.
- :class:`StartTLS` -- the host said 220 to STARTTLS: start the TLS handshake now, then
  call :meth:`tls_established` (the session re-sends EHLO, RFC 3207 §4.2).
- :class:`SendContent` -- DATA was accepted (354): write ``encode_content(chunk)`` for
  every chunk of the message, then call :meth:`end_content`.
- :class:`TransactionComplete` -- one reply per recipient. Call :meth:`reset` to reuse
  the connection (a :class:`Ready` follows: at once with PIPELINING, the RSET then going
  in front of the next MAIL; after RSET's 250 otherwise) or :meth:`quit`.
- :class:`SessionFailed` -- the connection is unusable (greeting or EHLO/HELO refused,
  421, RSET refused, TLS required but not available, malformed reply). A transaction in
  flight is completed first, its unresolved recipients getting this reply. QUIT is
  queued when RFC 5321 asks for it; close the connection after writing it.
- :class:`Closed` -- the host answered QUIT.

Connection loss and timeouts are the adapter's to notice: :meth:`abort` with
``replies.CONNECTION_LOST`` or ``replies.CONVERSATION_TIMED_OUT`` completes a transaction
in flight. :attr:`ClientSession.awaiting` names the command whose reply is awaited, so the
adapter can pick the timeout for the stage.

With PIPELINING (RFC 2920) MAIL, every RCPT and DATA go in one write; without it, one
command per round trip. A host that also offers CHUNKING gets MAIL, the RCPTs and the whole
message as ``BDAT <size> LAST`` in one write when the adapter passes the message to
:meth:`ClientSession.begin` (RFC 3030): one round trip per message instead of two.
Message content for DATA is dot-stuffed and CRLF-normalised by :class:`ContentEncoder`,
correctly across chunk boundaries.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from twistedrelay.smtp import replies
from twistedrelay.smtp.replies import Reply

MAX_REPLY_LINE_BYTES = 4096
"""Longest reply line accepted (RFC 5321 §4.5.3.1.5 says 512; hosts exceed it)."""
MAX_REPLY_LINES = 1000

TLS_LEVELS = ("none", "may", "encrypt", "verify")
_TLS_REQUIRED = ("encrypt", "verify")

# RFC 3461 parameters, passed on only to a host that offers DSN.
_DSN_MAIL_PARAMS = ("RET", "ENVID")
_DSN_RCPT_PARAMS = ("NOTIFY", "ORCPT")

_ENHANCED_CODE = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")


class ProtocolError(Exception):
    """The mail host sent something that is not an SMTP reply."""


class SessionStateError(RuntimeError):
    """The adapter called a method the session's stage does not allow (a bug in the caller)."""


# -- replies ---------------------------------------------------------------------------------


class ReplyParser:
    """Incremental parser of SMTP replies (RFC 5321 §4.2), multi-line and enhanced codes.

    Feed chunks of any size; complete replies come out in order. Lines may end in CRLF or
    a bare LF (accepted from hosts; we never send one). The enhanced status code (RFC 2034,
    RFC 3463) is taken from the first line when its class matches the reply code, and
    removed from every line that carries it.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._code = 0
        self._lines: list[str] = []

    def feed(self, data: bytes) -> list[Reply]:
        """Parse ``data``; return the replies it completes.

        :raises ProtocolError: a line is not a reply line, too long, or a multi-line reply
            changes its code.
        """
        buffer = self._buffer
        buffer += data
        found: list[Reply] = []
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            line = bytes(buffer[start:end])
            start = end + 1
            reply = self._line(line[:-1] if line.endswith(b"\r") else line)
            if reply is not None:
                found.append(reply)
        del buffer[:start]
        if len(buffer) > MAX_REPLY_LINE_BYTES:
            raise ProtocolError("reply line too long")
        return found

    def clear(self) -> None:
        """Forget buffered input (after STARTTLS nothing sent in plaintext may be used)."""
        self._buffer.clear()
        self._code = 0
        self._lines = []

    @property
    def has_buffered(self) -> bool:
        """Whether bytes of an incomplete reply are waiting."""
        return bool(self._buffer) or bool(self._lines)

    def _line(self, line: bytes) -> Reply | None:
        if len(line) > MAX_REPLY_LINE_BYTES:
            raise ProtocolError("reply line too long")
        code_text, separator = line[:3], line[3:4]
        if not (
            len(code_text) == 3
            and code_text.isdigit()
            and code_text[:1] in b"2345"
            and separator in (b"", b" ", b"-")
        ):
            raise ProtocolError(f"not a reply line: {line[:80]!r}")
        code = int(code_text)
        if self._lines and code != self._code:
            raise ProtocolError(f"reply code changed within a multi-line reply: {code}")
        if len(self._lines) >= MAX_REPLY_LINES:
            raise ProtocolError("too many lines in one reply")
        self._code = code
        self._lines.append(line[4:].decode("utf-8", "replace"))
        if separator == b"-":
            return None
        lines, self._lines = self._lines, []
        return _build_reply(code, lines)


def _build_reply(code: int, lines: list[str]) -> Reply:
    match = _ENHANCED_CODE.match(lines[0])
    if match is None or int(match.group(1)) != code // 100:
        return Reply(code, None, "\n".join(lines))
    enhanced = ".".join(match.groups())
    prefix = match.group(0).rstrip(" ")
    stripped = [
        line[len(prefix) :].removeprefix(" ") if line.startswith(prefix) else line for line in lines
    ]
    return Reply(code, enhanced, "\n".join(stripped))


# -- capabilities ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What the mail host's EHLO reply offered (empty after a HELO fallback).

    ``keywords`` maps each upper-cased EHLO keyword to its parameter text.
    """

    extended: bool = False
    keywords: Mapping[str, str] = field(default_factory=dict)

    @property
    def pipelining(self) -> bool:
        """RFC 2920."""
        return "PIPELINING" in self.keywords

    @property
    def offers_size(self) -> bool:
        """RFC 1870: SIZE= may be declared."""
        return "SIZE" in self.keywords

    @property
    def size_limit(self) -> int | None:
        """The host's fixed message size limit, or None for none (RFC 1870 §4: 0 = none)."""
        text = self.keywords.get("SIZE", "").strip()
        return int(text) if text.isdigit() and int(text) > 0 else None

    @property
    def eightbitmime(self) -> bool:
        """RFC 6152."""
        return "8BITMIME" in self.keywords

    @property
    def smtputf8(self) -> bool:
        """RFC 6531."""
        return "SMTPUTF8" in self.keywords

    @property
    def starttls(self) -> bool:
        """RFC 3207."""
        return "STARTTLS" in self.keywords

    @property
    def chunking(self) -> bool:
        """RFC 3030: BDAT may replace DATA."""
        return "CHUNKING" in self.keywords

    @property
    def enhanced_status_codes(self) -> bool:
        """RFC 2034."""
        return "ENHANCEDSTATUSCODES" in self.keywords

    @property
    def dsn(self) -> bool:
        """RFC 3461."""
        return "DSN" in self.keywords

    @property
    def auth_mechanisms(self) -> frozenset[str]:
        """RFC 4954: the SASL mechanisms offered."""
        return frozenset(self.keywords.get("AUTH", "").upper().split())


def parse_ehlo_reply(reply: Reply) -> Capabilities:
    """The capabilities in a positive EHLO reply: one keyword per line after the first."""
    keywords: dict[str, str] = {}
    for line in reply.text.split("\n")[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            keywords[keyword.upper()] = params.strip()
    return Capabilities(extended=True, keywords=keywords)


# -- content ---------------------------------------------------------------------------------

_LINE_ENDING = re.compile(rb"\r\n|\r|\n")


class ContentEncoder:
    """Message content → DATA bytes: CRLF line endings and dot-stuffing (RFC 5321 §4.5.2).

    Correct across chunk boundaries: a line that starts with "." is stuffed even when the
    previous chunk ended exactly with its CRLF (Twisted's SMTPClient misses that case and
    the peer takes the line for the end of data), and a CR at the end of one chunk pairs
    with an LF at the start of the next. Bare CR and bare LF become CRLF.
    """

    def __init__(self) -> None:
        self._at_line_start = True
        self._pending_cr = False

    def encode(self, chunk: bytes) -> bytes:
        """Encode the next chunk of content."""
        head = b""
        if self._pending_cr:
            self._pending_cr = False
            head = b"\r\n"
            self._at_line_start = True
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._pending_cr = True
        if not chunk:
            return head
        crlf = chunk.count(b"\r\n")
        if chunk.count(b"\r") != crlf or chunk.count(b"\n") != crlf:
            chunk = _LINE_ENDING.sub(b"\r\n", chunk)
        if b"\r\n." in chunk:
            chunk = chunk.replace(b"\r\n.", b"\r\n..")
        if self._at_line_start and chunk.startswith(b"."):
            head += b"."
        self._at_line_start = chunk.endswith(b"\n")
        return head + chunk if head else chunk

    def finish(self) -> bytes:
        """The end of the content: a CRLF if the last line lacks one, then a lone dot line."""
        if self._pending_cr:
            self._pending_cr = False
            self._at_line_start = True
            return b"\r\n.\r\n"
        return b".\r\n" if self._at_line_start else b"\r\n.\r\n"


def encode_content(content: bytes) -> bytes:
    """Encode a whole message for DATA, terminator included."""
    encoder = ContentEncoder()
    return encoder.encode(content) + encoder.finish()


# -- events and results ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """The reply that decides one recipient: its RCPT, MAIL, DATA or end-of-data reply."""

    recipient: str
    reply: Reply


@dataclass(frozen=True, slots=True)
class TransactionResult:
    """One reply per recipient, in the order given to begin().

    ``sent`` is False when the session refused the transaction itself (SIZE, SMTPUTF8)
    without saying anything to the host. ``answered`` is False when the host answered no
    command of it, not even MAIL (the connection was lost, or a pipelined RSET refused):
    the transaction can go at once on another connection.
    """

    recipients: tuple[RecipientResult, ...]
    sent: bool = True
    answered: bool = True

    @property
    def accepted(self) -> tuple[RecipientResult, ...]:
        """The recipients whose deciding reply is positive (delivered)."""
        return tuple(r for r in self.recipients if r.reply.code < 400)


@dataclass(frozen=True, slots=True)
class Ready:
    """The session can start a transaction."""

    capabilities: Capabilities
    tls: bool


@dataclass(frozen=True, slots=True)
class StartTLS:
    """Start the TLS handshake now; then call tls_established()."""


@dataclass(frozen=True, slots=True)
class SendContent:
    """DATA was accepted: send the content, then call end_content()."""


@dataclass(frozen=True, slots=True)
class TransactionComplete:
    """The transaction is over; every recipient has its deciding reply."""

    result: TransactionResult


@dataclass(frozen=True, slots=True)
class SessionFailed:
    """The connection can no longer be used; ``reply`` says why."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class Closed:
    """The host answered QUIT."""


Event = Ready | StartTLS | SendContent | TransactionComplete | SessionFailed | Closed


class Stage(enum.Enum):
    """Where the conversation is."""

    GREETING = "greeting"
    HELLO = "hello"
    STARTTLS = "starttls"
    TLS_HANDSHAKE = "tls handshake"
    READY = "ready"
    TRANSACTION = "transaction"
    CONTENT = "content"
    DONE = "done"
    RESETTING = "resetting"
    QUITTING = "quitting"
    CLOSED = "closed"


class _Command(enum.Enum):
    """A command whose reply is awaited (value: its name in diagnostics)."""

    GREETING = "greeting"
    EHLO = "EHLO"
    HELO = "HELO"
    STARTTLS = "STARTTLS"
    MAIL = "MAIL FROM"
    RCPT = "RCPT TO"
    DATA = "DATA"
    END_OF_DATA = "end of data"
    BDAT = "BDAT"
    LONE_DOT = "lone dot"
    RSET = "RSET"
    PIPELINED_RSET = "RSET in front of MAIL"
    QUIT = "QUIT"


@dataclass(slots=True)
class _Transaction:
    recipients: list[str]
    rcpt_lines: list[bytes]
    mail_reply: Reply | None = None
    rcpt_replies: list[Reply | None] = field(default_factory=list)
    data_reply: Reply | None = None
    final_reply: Reply | None = None
    chunked: bool = False

    def has_accepted(self) -> bool:
        return (
            self.mail_reply is not None
            and self.mail_reply.is_positive
            and any(r is not None and r.is_positive for r in self.rcpt_replies)
        )

    def result(self, missing: Reply) -> TransactionResult:
        """Each recipient's deciding reply; ``missing`` stands in for replies never received."""
        mail = self.mail_reply or missing
        data = self.data_reply or missing
        final = self.final_reply or missing
        results = []
        for recipient, rcpt in zip(self.recipients, self.rcpt_replies, strict=True):
            if not mail.is_positive:
                reply = mail
            elif rcpt is None or not rcpt.is_positive:
                reply = rcpt or missing
            elif self.chunked:
                reply = final
            elif data.code != 354:
                reply = data
            else:
                reply = final
            results.append(RecipientResult(recipient, reply))
        return TransactionResult(tuple(results), answered=self.mail_reply is not None)


# -- the session -----------------------------------------------------------------------------


class ClientSession:
    """The client side of one SMTP connection carrying any number of transactions.

    :param hostname: the name to announce in EHLO/HELO.
    :param tls_level: ``none`` never issues STARTTLS; ``may`` issues it when offered and
        carries on in plaintext if refused; ``encrypt``/``verify`` fail the session
        (4.7.4) when STARTTLS is not offered or is refused. Certificate checks for
        ``verify`` happen in the adapter's handshake.
    """

    def __init__(self, hostname: str, tls_level: str = "none") -> None:
        if tls_level not in TLS_LEVELS:
            raise ValueError(f"tls_level must be one of {TLS_LEVELS}, got {tls_level!r}")
        self._hostname = hostname
        self._tls_level = tls_level
        self._parser = ReplyParser()
        self._outbox: list[bytes] = []
        self._pending: deque[_Command] = deque([_Command.GREETING])
        self._rcpt_index = 0
        self._transaction: _Transaction | None = None
        self._encoder = ContentEncoder()
        self.stage = Stage.GREETING
        self.capabilities = Capabilities()
        self.tls = False
        self.transaction_count = 0
        """Transactions begun on this connection (for the reuse limit)."""
        self._rset_with_next = False  # RSET goes in front of the next transaction's MAIL

    # -- adapter-facing API --------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Return and forget the bytes the session wants written, in order."""
        data = b"".join(self._outbox)
        self._outbox.clear()
        return data

    @property
    def awaiting(self) -> str | None:
        """The command whose reply is awaited ("greeting", "RCPT TO", "end of data"…)."""
        return self._pending[0].value if self._pending else None

    def receive(self, data: bytes) -> list[Event]:
        """Take bytes read from the connection; return the events they cause."""
        if self.stage is Stage.CLOSED:
            return []
        events: list[Event] = []
        try:
            received = self._parser.feed(data)
        except ProtocolError as e:
            self._fail(
                replies.MALFORMED_REPLY.with_text(f"{replies.MALFORMED_REPLY.text}: {e}"),
                events,
                send_quit=False,
            )
            return events
        for index, reply in enumerate(received):
            if self._is_closed():
                break
            self._on_reply(reply, events)
            if self.stage is Stage.TLS_HANDSHAKE and (
                index + 1 < len(received) or self._parser.has_buffered
            ):
                # RFC 3207 §4.2 and CVE-2011-0411: anything the host sent after its 220 came
                # before the handshake, so it may be a man-in-the-middle's injection. No
                # handshake is started on such a connection.
                events.remove(StartTLS())
                self._fail(replies.STARTTLS_INJECTION, events, send_quit=False)
                break
        return events

    def _is_closed(self) -> bool:
        # A call, not an inline `is` test: _on_reply may close the session, which the type
        # checker's narrowing of self.stage (from the test above the loop) cannot see.
        return self.stage is Stage.CLOSED

    def tls_established(self) -> list[Event]:
        """The TLS handshake finished: forget what was learnt in plaintext and EHLO again."""
        self._require(Stage.TLS_HANDSHAKE)
        self.tls = True
        self.capabilities = Capabilities()
        self._parser.clear()
        self._send(_Command.EHLO, b"EHLO " + self._hostname.encode("ascii") + b"\r\n")
        self.stage = Stage.HELLO
        return []

    def begin(
        self,
        sender: str,
        recipients: Sequence[tuple[str, Mapping[str, str | None]]],
        content_size: int,
        body_8bit: bool = False,
        smtputf8: bool = False,
        mail_params: Mapping[str, str | None] | None = None,
        chunk: bytes | None = None,
    ) -> list[Event]:
        """Start a transaction: MAIL FROM, one RCPT TO per recipient, DATA.

        With ``chunk`` (the whole message, CRLF line endings) and a host that offers
        CHUNKING and PIPELINING, the message goes as ``BDAT <size> LAST`` right after the
        RCPTs, in the same write (RFC 3030): no 354 round trip and no dot-stuffing, and its
        reply completes the transaction; :class:`SendContent` never comes. Otherwise the
        chunk is ignored and DATA is used.

        :param sender: the reverse-path ("" for the null sender).
        :param recipients: (address, RCPT parameters) pairs; NOTIFY and ORCPT are passed on
            when the host offers DSN, others are dropped.
        :param content_size: the size in bytes declared with SIZE= when the host offers it.
        :param body_8bit: declare BODY=8BITMIME when the host offers it (RFC 6152).
        :param smtputf8: the message needs SMTPUTF8 (also implied by non-ASCII addresses).
        :param mail_params: MAIL FROM parameters of the original; RET and ENVID are passed
            on when the host offers DSN.
        :param chunk: the message to send with BDAT when the host allows it.
        :returns: [] normally; a sent=False :class:`TransactionComplete` when the host
            cannot take the message (SMTPUTF8 not offered: 5.6.7; bigger than its SIZE
            limit: 5.3.4), in which case nothing is written and the session stays ready.
        :raises SessionStateError: the session is not ready.
        :raises ValueError: no recipients.
        """
        self._require(Stage.READY)
        if not recipients:
            raise ValueError("a transaction needs at least one recipient")
        addresses = [address for address, _ in recipients]
        caps = self.capabilities
        smtputf8 = smtputf8 or not all(a.isascii() for a in [sender, *addresses])
        refusal = None
        if smtputf8 and not caps.smtputf8:
            refusal = replies.SMTPUTF8_NOT_OFFERED
        elif caps.size_limit is not None and content_size > caps.size_limit:
            refusal = replies.MESSAGE_TOO_BIG_FOR_HOST.with_text(
                f"Message size {content_size} exceeds size limit {caps.size_limit} of host"
            )
        if refusal is not None:
            result = TransactionResult(
                tuple(RecipientResult(a, refusal) for a in addresses), sent=False
            )
            return [TransactionComplete(result)]

        params = []
        if caps.offers_size:
            params.append(f"SIZE={content_size}")
        if body_8bit and caps.eightbitmime:
            params.append("BODY=8BITMIME")
        if smtputf8:
            params.append("SMTPUTF8")
        if caps.dsn and mail_params:
            params.extend(_format_params(mail_params, _DSN_MAIL_PARAMS))
        mail_line = _command_line("MAIL FROM", sender, params)
        rcpt_lines = [
            _command_line(
                "RCPT TO", address, _format_params(p, _DSN_RCPT_PARAMS) if caps.dsn else []
            )
            for address, p in recipients
        ]
        chunked = chunk is not None and caps.chunking and caps.pipelining
        self._transaction = _Transaction(
            addresses, rcpt_lines, rcpt_replies=[None] * len(addresses), chunked=chunked
        )
        self._encoder = ContentEncoder()
        self._rcpt_index = 0
        self.transaction_count += 1
        self.stage = Stage.TRANSACTION
        if self._rset_with_next:
            self._rset_with_next = False
            self._send(_Command.PIPELINED_RSET, b"RSET\r\n")
        self._send(_Command.MAIL, mail_line)
        if caps.pipelining:
            # RFC 2920 §3.1: MAIL and RCPT may be grouped, and DATA may end the group.
            for line in rcpt_lines:
                self._send(_Command.RCPT, line)
            if chunked:
                # RFC 3030 §4.2: BDAT may be pipelined after RCPT; with every RCPT refused
                # the host still reads the chunk and refuses it.
                assert chunk is not None
                self._send(_Command.BDAT, b"BDAT %d LAST\r\n" % len(chunk))
                self._outbox.append(chunk)
            else:
                self._send(_Command.DATA, b"DATA\r\n")
        return []

    def encode_content(self, chunk: bytes) -> bytes:
        """Dot-stuff and CRLF-normalise the next chunk of content; write the result.

        Returns the bytes directly (not through the outbox): it is the hot path.
        """
        self._require(Stage.CONTENT)
        return self._encoder.encode(chunk)

    def end_content(self) -> list[Event]:
        """The content is complete: queue the terminator and await the final reply."""
        self._require(Stage.CONTENT)
        self._outbox.append(self._encoder.finish())
        self._pending.append(_Command.END_OF_DATA)
        self.stage = Stage.TRANSACTION
        return []

    @property
    def reusable(self) -> bool:
        """The last transaction is over and the connection is in step: reset() may follow.

        False once the session failed or closed (a 421, a malformed reply, a timeout),
        even while the adapter has not seen the connection close yet.
        """
        return self.stage in (Stage.DONE, Stage.READY)

    def reset(self) -> list[Event]:
        """Make the connection ready for another transaction with RSET (RFC 5321 §4.1.1.5).

        A host that offers PIPELINING gets the RSET in front of the next transaction's MAIL,
        in the same write (RFC 2920 §3.1 lets RSET appear anywhere in a group): the session
        is ready at once (a :class:`Ready` is returned) and reuse costs no round trip. If
        that RSET is refused, the session fails as below. Without PIPELINING the RSET is
        sent now and the :class:`Ready` follows its 250.
        """
        self._require(Stage.DONE, Stage.READY)
        if self.capabilities.pipelining:
            self._rset_with_next = True
            events: list[Event] = []
            self._become_ready(events)
            return events
        self._send(_Command.RSET, b"RSET\r\n")
        self.stage = Stage.RESETTING
        return []

    def quit(self) -> list[Event]:
        """Send QUIT; a :class:`Closed` follows the host's answer."""
        self._require(Stage.DONE, Stage.READY)
        self._send(_Command.QUIT, b"QUIT\r\n")
        self.stage = Stage.QUITTING
        return []

    def abort(self, reply: Reply) -> list[Event]:
        """The connection is gone or timed out: complete a transaction in flight with ``reply``.

        :returns: a :class:`TransactionComplete` if a transaction was in flight, else [].
        """
        events: list[Event] = []
        self._finish_transaction(reply, events)
        self._close()
        return events

    # -- replies ---------------------------------------------------------------------------

    def _on_reply(self, reply: Reply, events: list[Event]) -> None:
        if not self._pending:
            if reply.code == 421:
                self._fail(reply, events, send_quit=False)
                return
            self._fail(
                replies.MALFORMED_REPLY.with_text(f"Unexpected reply: {reply}"),
                events,
                send_quit=False,
            )
            return
        command = self._pending.popleft()
        if reply.code == 421 and command is not _Command.QUIT:
            # RFC 5321 §3.8: 421 means the host is closing the channel; no QUIT.
            self._fail(reply, events, send_quit=False)
            return
        handler = self._HANDLERS[command]
        handler(self, reply, events)

    def _on_greeting(self, reply: Reply, events: list[Event]) -> None:
        if reply.code != 220:
            if reply.is_permanent:
                # As Postfix (smtp_skip_5xx_greeting): a host that will not talk is skipped
                # for the next one, and the mail deferred, not bounced, when none will.
                refused = replies.GREETING_REFUSED
                reply = refused.with_text(f"{refused.text}: {reply}")
            # RFC 5321 §3.1: after a 554 greeting the client SHOULD send QUIT.
            self._fail(reply, events, send_quit=True)
            return
        self.stage = Stage.HELLO
        self._send(_Command.EHLO, b"EHLO " + self._hostname.encode("ascii") + b"\r\n")

    def _on_ehlo(self, reply: Reply, events: list[Event]) -> None:
        if reply.code == 250:
            self.capabilities = parse_ehlo_reply(reply)
            self._after_hello(events)
        elif reply.is_permanent:
            # RFC 5321 §3.2: a host that does not know EHLO gets HELO.
            self._send(_Command.HELO, b"HELO " + self._hostname.encode("ascii") + b"\r\n")
        else:
            self._fail(reply, events, send_quit=True)

    def _on_helo(self, reply: Reply, events: list[Event]) -> None:
        if reply.code == 250:
            self.capabilities = Capabilities()
            self._after_hello(events)
        else:
            self._fail(reply, events, send_quit=True)

    def _after_hello(self, events: list[Event]) -> None:
        if self._tls_level != "none" and not self.tls:
            if self.capabilities.starttls:
                self.stage = Stage.STARTTLS
                self._send(_Command.STARTTLS, b"STARTTLS\r\n")
                return
            if self._tls_level in _TLS_REQUIRED:
                self._fail(replies.TLS_REQUIRED_NOT_OFFERED, events, send_quit=True)
                return
        self._become_ready(events)

    def _on_starttls(self, reply: Reply, events: list[Event]) -> None:
        if reply.code == 220:
            self.stage = Stage.TLS_HANDSHAKE
            events.append(StartTLS())
        elif self._tls_level in _TLS_REQUIRED:
            refused = replies.TLS_REQUIRED_REFUSED
            self._fail(refused.with_text(f"{refused.text}: {reply}"), events, send_quit=True)
        else:
            self._become_ready(events)

    def _on_mail(self, reply: Reply, events: list[Event]) -> None:
        transaction = self._current()
        transaction.mail_reply = reply
        if self.capabilities.pipelining:
            return
        if reply.is_positive:
            self._send(_Command.RCPT, transaction.rcpt_lines[0])
        else:
            self._finish_transaction(reply, events)

    def _on_rcpt(self, reply: Reply, events: list[Event]) -> None:
        transaction = self._current()
        index = self._rcpt_index
        if reply.code == 552:
            # RFC 5321 §4.5.3.1.10: a 552 to RCPT (too many recipients, or a full mailbox)
            # SHOULD be taken as the temporary 452, as Postfix does.
            enhanced = "4" + reply.enhanced[1:] if reply.enhanced else None
            reply = Reply(452, enhanced, reply.text)
        transaction.rcpt_replies[index] = reply
        self._rcpt_index = index + 1
        if self.capabilities.pipelining:
            return
        if self._rcpt_index < len(transaction.rcpt_lines):
            self._send(_Command.RCPT, transaction.rcpt_lines[self._rcpt_index])
        elif transaction.has_accepted():
            self._send(_Command.DATA, b"DATA\r\n")
        else:
            self._finish_transaction(reply, events)

    def _on_data(self, reply: Reply, events: list[Event]) -> None:
        transaction = self._current()
        if reply.is_positive and reply.code != 354:
            # RFC 5321 §4.3.2: DATA succeeds only with 354. A 250 here is no delivery (no
            # content was sent), and the host may now be reading content or commands.
            transaction.data_reply = _unexpected(reply)
            self._fail(transaction.data_reply, events, send_quit=False)
            return
        transaction.data_reply = reply
        if reply.code != 354:
            self._finish_transaction(reply, events)
        elif transaction.has_accepted():
            self.stage = Stage.CONTENT
            events.append(SendContent())
        else:
            # RFC 2920 §3.1: DATA was pipelined, every RCPT failed, yet the host said 354:
            # send an empty message body (a lone dot) so that nothing is delivered.
            self._send(_Command.LONE_DOT, b".\r\n")

    def _on_lone_dot(self, reply: Reply, events: list[Event]) -> None:
        self._finish_transaction(reply, events)

    def _on_final_reply(self, reply: Reply, events: list[Event]) -> None:
        """The reply to the message's end (DATA's dot or BDAT LAST): 2xx alone delivers."""
        transaction = self._current()
        if 300 <= reply.code < 400 or reply.code < 200:
            transaction.final_reply = _unexpected(reply)
            self._fail(transaction.final_reply, events, send_quit=False)
            return
        transaction.final_reply = reply
        self._finish_transaction(reply, events)

    def _on_rset(self, reply: Reply, events: list[Event]) -> None:
        if reply.is_positive:
            self._become_ready(events)
        else:
            self._fail(reply, events, send_quit=True)

    def _on_pipelined_rset(self, reply: Reply, events: list[Event]) -> None:
        if not reply.is_positive:
            # The transaction behind it cannot be trusted: its recipients are deferred (the
            # refusal is about the connection, not about them) and the connection is closed
            # without QUIT (its pipelined DATA may have put the host in the content stage).
            refused = replies.RSET_REFUSED
            self._fail(refused.with_text(f"{refused.text}: {reply}"), events, send_quit=False)

    def _on_quit(self, reply: Reply, events: list[Event]) -> None:
        self._close()
        events.append(Closed())

    _HANDLERS: dict[_Command, Callable[[ClientSession, Reply, list[Event]], None]] = {
        _Command.GREETING: _on_greeting,
        _Command.EHLO: _on_ehlo,
        _Command.HELO: _on_helo,
        _Command.STARTTLS: _on_starttls,
        _Command.MAIL: _on_mail,
        _Command.RCPT: _on_rcpt,
        _Command.DATA: _on_data,
        _Command.END_OF_DATA: _on_final_reply,
        _Command.LONE_DOT: _on_lone_dot,
        _Command.BDAT: _on_final_reply,
        _Command.RSET: _on_rset,
        _Command.PIPELINED_RSET: _on_pipelined_rset,
        _Command.QUIT: _on_quit,
    }

    # -- helpers ---------------------------------------------------------------------------

    def _send(self, command: _Command, line: bytes) -> None:
        self._outbox.append(line)
        self._pending.append(command)

    def _require(self, *stages: Stage) -> None:
        if self.stage not in stages:
            allowed = " or ".join(s.value for s in stages)
            raise SessionStateError(f"session is {self.stage.value}, expected {allowed}")

    def _current(self) -> _Transaction:
        if self._transaction is None:
            raise SessionStateError("no transaction in flight")
        return self._transaction

    def _become_ready(self, events: list[Event]) -> None:
        self.stage = Stage.READY
        events.append(Ready(self.capabilities, self.tls))

    def _finish_transaction(self, missing: Reply, events: list[Event]) -> None:
        """Complete the transaction in flight, if any; ``missing`` fills absent replies."""
        transaction = self._transaction
        if transaction is None:
            return
        self._transaction = None
        self.stage = Stage.DONE
        events.append(TransactionComplete(transaction.result(missing)))

    def _fail(self, reply: Reply, events: list[Event], *, send_quit: bool) -> None:
        self._finish_transaction(reply, events)
        events.append(SessionFailed(reply))
        self._pending.clear()
        if send_quit:
            self._send(_Command.QUIT, b"QUIT\r\n")
            self.stage = Stage.QUITTING
        else:
            self._close()

    def _close(self) -> None:
        self.stage = Stage.CLOSED
        self._pending.clear()
        self._outbox.clear()
        self._transaction = None


def _unexpected(reply: Reply) -> Reply:
    """A reply the command cannot have (RFC 5321 §4.3.2): a deferral that names it."""
    return replies.UNEXPECTED_REPLY.with_text(f"{replies.UNEXPECTED_REPLY.text}: {reply}")


def _format_params(params: Mapping[str, str | None], allowed: Sequence[str]) -> list[str]:
    out = []
    for key, value in params.items():
        if key.upper() in allowed:
            out.append(key.upper() if value is None else f"{key.upper()}={value}")
    return out


def _command_line(verb: str, address: str, params: Sequence[str]) -> bytes:
    text = f"{verb}:<{address}>"
    if params:
        text += " " + " ".join(params)
    return (text + "\r\n").encode("utf-8")
