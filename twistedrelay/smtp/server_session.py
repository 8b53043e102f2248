"""The inbound ESMTP conversation as a sans-IO state machine: bytes in → events; replies in → bytes.

Owns the order of an SMTP session (RFC 5321 §4.1.4, §3.3), every reply the protocol itself
decides (syntax, sequence, limits), ESMTP parameter checks (SIZE, BODY, SMTPUTF8, NOTIFY,
ORCPT), PIPELINING (RFC 2920) and the STARTTLS and AUTH exchanges' framing. It does no I/O,
knows no clock (timeouts are the adapter's) and makes no policy decisions: whether a sender
or a recipient is acceptable, whether a message is queued, whether credentials are good is
asked of the caller through events. In the style of h11: the caller moves bytes, the session
says what they mean.

Using it (the Twisted adapter, smtp/server.py, does exactly this)::

    session = ServerSession(SessionSettings(hostname="relay.example"))
    transport.write(session.greeting())
    # on every dataReceived(data), and with b"" after every respond():
    for event in session.receive(data):
        match event:
            case Output(data=raw):          transport.write(raw)
            case Helo() | MailFrom() | RcptTo() | Auth() | AuthContinuation():
                transport.write(session.respond(decide(event)))   # then receive(b"")
            case DataStart():   open queue file; write(session.respond(replies.START_MAIL_INPUT))
            case DataChunk(data=body):      queue_file.write(body)
            case DataEnd(size=n, error=e):  e and discard, else make durable;
                                            write(session.respond(e or replies.queued_as(id)))
            case StartTLS():    write(session.respond(replies.READY_TO_START_TLS)); start TLS;
                                after the handshake session.tls_started(new_settings)
            case Close():       close the connection after writing what was written so far

Rules (the contract with the adapter):

1. ``receive(data)`` buffers ``data`` and processes as many commands as it can. Replies the
   session decides itself come out as ``Output`` events, in order among the other events
   (adjacent ones are merged into one ``Output``).
2. Events that need a decision (``Helo``, ``MailFrom``, ``RcptTo``, ``DataStart``,
   ``DataEnd``, ``StartTLS``, ``Auth``, ``AuthContinuation``: the ``DECISION_EVENTS``) are
   always the *last* event of a ``receive`` result. Until ``respond(reply)`` is called the
   session only buffers input (``receive`` returns ``[]``), so replies go out in command
   order even when commands are pipelined (RFC 2920). ``respond`` returns the bytes to
   write; then call ``receive(b"")`` to process what was buffered meanwhile.
3. ``Close`` is the one event that means "close the connection once written": after QUIT
   (``reason="quit"``, the ``221`` is in the ``Output`` before it) and after too many errors
   (``reason="too_many_errors"``, after the ``421``). When the adapter's own reply reaches
   the error limit, ``respond`` returns that reply followed by the ``421``, and the next
   ``receive(b"")`` returns ``[Close(...)]``. After ``Close`` the session ignores input.
4. Every 4xx/5xx reply, whether the session's or the adapter's, counts toward
   ``max_errors``.
5. AUTH: a ``334`` reply to ``Auth``/``AuthContinuation`` makes the next line an
   ``AuthContinuation`` (a line ``*`` cancels: the session answers ``501 5.7.0`` itself). A
   ``235`` reply marks the session authenticated; pass the identity with it:
   ``respond(replies.AUTH_SUCCEEDED, authenticated_as="user")``. AUTH data is never logged
   here; ``AuthContinuation.line`` is the raw base64 line.
6. STARTTLS: after ``respond`` with a ``220``, everything already received after the
   STARTTLS line is discarded and input is ignored until ``tls_started()`` (plaintext
   command injection, CVE-2011-0411); the session is then as fresh as after the greeting
   (RFC 3207 §4.2).
7. DATA: ``respond`` to ``DataStart`` with a ``354`` to enter data mode; anything else keeps
   the transaction. After ``DataEnd`` the transaction is over whatever the reply. When
   ``DataEnd.error`` is set, the message must not be queued; ``DataChunk`` events already
   given must be discarded (none follow the error).
8. BDAT (RFC 3030 CHUNKING, offered when ``SessionSettings.chunking``): the first BDAT of
   a transaction is a ``DataStart`` with ``chunked=True``; answer it like DATA's (``354``
   to take the message: the session sends nothing for it). Then the chunks' bytes come as
   ``DataChunk`` events, the session answers each chunk but the last itself
   (``250 2.0.0 <n> octets received``), and the end of the last chunk, or of the first
   chunk that makes the message refused, is a ``DataEnd`` as for DATA. A refused BDAT
   (no transaction, or a ``DataStart`` answered otherwise) has its chunk read and
   dropped, so the session stays in step with a pipelining client.

While a decision is pending the session buffers without bound; the adapter must bound that
(server.py pauses reading from the transport once the input held since the decision began
passes HELD_INPUT_LIMIT, until it has called ``respond``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twistedrelay.smtp import replies
from twistedrelay.smtp.addresses import is_ascii
from twistedrelay.smtp.commands import (
    CommandSyntaxError,
    is_clean_text,
    is_valid_notify,
    is_valid_orcpt,
    is_xtext,
    parse_command,
    parse_mail_argument,
    parse_rcpt_argument,
)
from twistedrelay.smtp.data import ChunkDecoder, DataDecoder
from twistedrelay.smtp.replies import Reply

Params = dict[str, str | None]


@dataclass(frozen=True, slots=True)
class SessionSettings:
    """What the session advertises and enforces; the adapter builds it from ``[smtp]``.

    ``max_line_length`` counts a command line with its line ending,
    ``max_text_line_length`` a line of message content (0: no limit). ``auth_requires_tls``:
    AUTH exists but only over TLS, so before it AUTH is ``538 5.7.11`` (RFC 4954 §6), not
    ``502``.
    """

    hostname: str
    max_message_size: int = 36700160
    max_recipients: int = 1000
    max_received_headers: int = 50
    max_header_size: int = 1048576
    max_line_length: int = 2048
    max_text_line_length: int = 1000
    max_errors: int = 20
    chunking: bool = True
    starttls_offered: bool = False
    auth_mechanisms: tuple[str, ...] = ()
    auth_required: bool = False
    auth_requires_tls: bool = False


# -- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Output:
    """Bytes the session answered by itself; write them as they are."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Helo:
    """HELO (``extended=False``) or EHLO (``extended=True``) with a syntactically valid name.

    A positive ``respond`` sends the session's own greeting line or capability list.
    """

    name: str
    extended: bool


@dataclass(frozen=True, slots=True)
class MailFrom:
    """MAIL FROM that passed the session's checks; ``sender`` is ``""`` for ``<>``."""

    sender: str
    params: Params


@dataclass(frozen=True, slots=True)
class RcptTo:
    """RCPT TO that passed the session's checks (syntax, sequence, count, SMTPUTF8)."""

    recipient: str
    params: Params


@dataclass(frozen=True, slots=True)
class DataStart:
    """DATA or a transaction's first BDAT (``chunked``): respond ``354`` to take the message."""

    chunked: bool = False


@dataclass(frozen=True, slots=True)
class DataChunk:
    """Decoded message bytes to append to the queue file."""

    data: bytes


@dataclass(frozen=True, slots=True)
class DataEnd:
    """The end of DATA: ``size`` decoded bytes; ``error`` is the reply when it must be refused."""

    size: int
    error: Reply | None


@dataclass(frozen=True, slots=True)
class DataAborted:
    """RSET or EHLO/HELO ended a BDAT transaction between chunks: discard its message."""


@dataclass(frozen=True, slots=True)
class StartTLS:
    """STARTTLS, offered and allowed now: respond ``220`` and start the handshake."""


@dataclass(frozen=True, slots=True)
class Auth:
    """AUTH with an offered mechanism (upper-cased); an initial response ``=`` becomes ``""``."""

    mechanism: str
    initial_response: str | None


@dataclass(frozen=True, slots=True)
class AuthContinuation:
    """The client's line after a ``334`` challenge (base64, not decoded)."""

    line: str


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection after writing; ``reason`` is ``"quit"`` or ``"too_many_errors"``."""

    reason: str


Event = (
    Output
    | Helo
    | MailFrom
    | RcptTo
    | DataStart
    | DataChunk
    | DataEnd
    | DataAborted
    | StartTLS
    | Auth
    | AuthContinuation
    | Close
)
DECISION_EVENTS = (Helo, MailFrom, RcptTo, DataStart, DataEnd, StartTLS, Auth, AuthContinuation)

_NOT_IMPLEMENTED_VERBS = frozenset({"TURN", "ETRN", "EXPN", "SEND", "SOML", "SAML"})
#: Digits allowed in a BDAT chunk size (RFC 3030 sets no limit; a larger chunk could not
#: fit any size limit anyway).
_MAX_CHUNK_SIZE_DIGITS = 15
#: NOOP, RSET, VRFY and HELP a session may send between messages; each one past it counts
#: as an error (Postfix's smtpd_junk_command_limit), so a session of nothing else ends at
#: ``max_errors`` instead of holding its connection for ever.
JUNK_COMMAND_LIMIT = 100


class ServerSession:
    """One inbound SMTP session (a connection), sans-IO; see the module docstring.

    :param settings: limits and what to advertise; replaced by ``tls_started``.
    """

    def __init__(self, settings: SessionSettings) -> None:
        self._settings = settings
        self._buffer = b""
        # How many bytes at the start of _buffer are known to hold no LF.
        self._scanned = 0
        self._discarding_line = False
        self._pending: Event | None = None
        self._closing: Close | None = None
        self._closed = False
        self._awaiting_tls = False
        self._tls = False
        self._error_count = 0
        self._junk_count = 0
        self._helo_name: str | None = None
        self._extended = False
        self._authenticated_as: str | None = None
        self._auth_continues = False
        self._sender: str | None = None
        self._mail_params: Params = {}
        self._recipients: list[tuple[str, Params]] = []
        self._decoder: DataDecoder | None = None
        # BDAT: the message's checks (first chunk to the end), and the chunk being read.
        self._chunks: ChunkDecoder | None = None
        self._chunk_left = 0
        self._chunk_size = 0
        self._chunk_last = False
        self._chunk_reading = False
        self._chunk_refusal: Reply | None = None  # the chunk is dropped, then this is sent

    # -- read-only state ------------------------------------------------------------------

    @property
    def settings(self) -> SessionSettings:
        """The settings in force."""
        return self._settings

    @property
    def helo_name(self) -> str | None:
        """The accepted HELO/EHLO name, or None before one was accepted."""
        return self._helo_name

    @property
    def extended(self) -> bool:
        """Whether the accepted greeting was EHLO (ESMTP)."""
        return self._extended

    @property
    def is_tls(self) -> bool:
        """Whether ``tls_started`` was called."""
        return self._tls

    @property
    def is_authenticated(self) -> bool:
        """Whether AUTH succeeded in this session."""
        return self._authenticated_as is not None

    @property
    def authenticated_as(self) -> str | None:
        """The identity given with the ``235`` reply."""
        return self._authenticated_as

    @property
    def sender(self) -> str | None:
        """The accepted reverse-path of the open transaction (``""`` is null), or None."""
        return self._sender

    @property
    def mail_params(self) -> Params:
        """The MAIL FROM parameters of the open transaction (a copy)."""
        return dict(self._mail_params)

    @property
    def recipients(self) -> tuple[tuple[str, Params], ...]:
        """The accepted recipients of the open transaction with their RCPT parameters."""
        return tuple(self._recipients)

    @property
    def error_count(self) -> int:
        """4xx/5xx replies sent so far."""
        return self._error_count

    @property
    def in_data(self) -> bool:
        """Whether the session is receiving message data (DATA after 354, or BDAT chunks)."""
        return self._decoder is not None or self._chunks is not None

    @property
    def is_closed(self) -> bool:
        """Whether ``Close`` was emitted; input is ignored from then on."""
        return self._closed

    # -- the adapter's calls --------------------------------------------------------------

    def greeting(self) -> bytes:
        """The ``220`` greeting to send when the connection opens (RFC 5321 §4.3.1)."""
        return Reply(220, None, f"{self._settings.hostname} ESMTP twistedrelay").to_bytes()

    def receive(self, data: bytes) -> list[Event]:
        """Take bytes from the client and return what they mean, in order.

        :param data: bytes as received; ``b""`` to continue after ``respond``.
        :returns: events; a decision event, if any, is the last one.
        """
        if self._closed or self._awaiting_tls:
            return []
        if data:
            self._buffer = self._buffer + data if self._buffer else data
        if self._pending is not None:
            return []
        events: list[Event] = []
        if self._closing is not None:
            self._emit_close(events)
            return events
        self._process(events)
        return events

    def respond(self, reply: Reply, *, authenticated_as: str | None = None) -> bytes:
        """Answer the pending decision event and return the bytes to write.

        :param reply: the decision; its effect depends on the event (module docstring).
        :param authenticated_as: the identity, required with a ``235`` reply to AUTH.
        :raises RuntimeError: no decision is pending.
        :raises ValueError: a ``235`` reply without ``authenticated_as``.
        """
        event = self._pending
        if event is None:
            raise RuntimeError("respond() without a pending decision event")
        if (
            reply.code == 235
            and authenticated_as is None
            and isinstance(event, Auth | AuthContinuation)
        ):
            raise ValueError("a 235 reply needs authenticated_as")
        self._pending = None
        out = reply
        if isinstance(event, Helo):
            out = self._answer_helo(event, reply)
        elif isinstance(event, MailFrom):
            if reply.is_positive:
                self._sender = event.sender
                self._mail_params = event.params
        elif isinstance(event, RcptTo):
            if reply.is_positive:
                self._recipients.append((event.recipient, event.params))
        elif isinstance(event, DataStart):
            settings = self._settings
            limits = (
                settings.max_message_size,
                settings.max_received_headers,
                settings.max_header_size,
                settings.max_text_line_length,
            )
            if event.chunked:
                self._chunk_reading = True
                if reply.code != 354:
                    self._chunk_refusal = reply  # sent once the chunk is read
                    return b""
                self._chunks = ChunkDecoder(*limits)
                return b""
            if reply.code == 354:
                self._decoder = DataDecoder(*limits)
        elif isinstance(event, DataEnd):
            self._reset_transaction()
            if reply.is_positive:
                self._junk_count = 0  # as Postfix: the count starts again after a message
        elif isinstance(event, StartTLS):
            if reply.code == 220:
                # RFC 3207 §4.2 / CVE-2011-0411: nothing sent before the handshake may be
                # taken as if it came over TLS.
                self._buffer = b""
                self._scanned = 0
                self._awaiting_tls = True
        elif isinstance(event, Auth | AuthContinuation):
            self._auth_continues = reply.code == 334
            if reply.code == 235:
                self._authenticated_as = authenticated_as
        return self._reply_bytes(out)

    def tls_started(self, settings: SessionSettings) -> None:
        """The TLS handshake completed: forget everything the client said (RFC 3207 §4.2).

        Call it after a STARTTLS handshake. For implicit TLS (port 465) it may also be called
        before any input, only to make ``is_tls`` true.

        :param settings: the settings for the TLS part of the session (e.g. AUTH offered).
        """
        self._settings = settings
        self._tls = True
        self._awaiting_tls = False
        self._buffer = b""
        self._scanned = 0
        self._discarding_line = False
        self._helo_name = None
        self._extended = False
        self._authenticated_as = None
        self._auth_continues = False
        self._reset_transaction()

    # -- input processing -----------------------------------------------------------------

    def _process(self, events: list[Event]) -> None:
        """Turn buffered input into events until a decision is needed or input runs out."""
        buffer = self._buffer
        pos = 0
        max_line = self._settings.max_line_length
        while self._pending is None and not self._closed:
            if self._chunk_reading:
                take = min(self._chunk_left, len(buffer) - pos)
                if take:
                    self._read_chunk(buffer[pos : pos + take], events)
                    pos += take
                if self._chunk_left:
                    break
                self._end_chunk(events)
                continue
            if self._decoder is not None:
                if pos >= len(buffer):
                    break
                decoded, end = self._decoder.feed(buffer[pos:] if pos else buffer)
                if decoded:
                    events.append(DataChunk(decoded))
                if end is None:
                    pos = len(buffer)
                    break
                pos += end
                self._pending = DataEnd(self._decoder.size, self._decoder.error)
                self._decoder = None
                events.append(self._pending)
                break
            newline = buffer.find(b"\n", pos + self._scanned)
            if newline < 0:
                if self._discarding_line:
                    pos = len(buffer)
                elif len(buffer) - pos >= max_line:
                    # The line can only end up too long: drop it now so memory stays bounded.
                    self._auth_continues = False
                    self._reply(events, replies.LINE_TOO_LONG)
                    self._discarding_line = True
                    pos = len(buffer)
                self._scanned = len(buffer) - pos
                break
            line_end = newline + 1
            self._scanned = 0
            if self._discarding_line:
                self._discarding_line = False
                pos = line_end
                continue
            if line_end - pos > max_line:
                pos = line_end
                self._auth_continues = False
                self._reply(events, replies.LINE_TOO_LONG)
                continue
            # Commands end with CRLF; a bare LF is accepted too, as Postfix does (never in DATA).
            line = buffer[
                pos : newline - 1 if newline > pos and buffer[newline - 1] == 13 else newline
            ]
            pos = line_end
            self._handle_line(line, events)
        self._buffer = b"" if self._closed else buffer[pos:] if pos else buffer

    def _handle_line(self, line: bytes, events: list[Event]) -> None:
        """Dispatch one command line (or an AUTH continuation line)."""
        if self._auth_continues:
            self._auth_continues = False
            text = line.decode("utf-8", "surrogateescape").strip()
            if text == "*":
                # RFC 4954 §4: "*" cancels the exchange.
                self._reply(events, replies.AUTH_CANCELLED)
            elif not is_clean_text(text):
                self._reply(events, replies.SYNTAX_ERROR)
            else:
                self._decide(events, AuthContinuation(text))
            return
        try:
            command = parse_command(line)
        except CommandSyntaxError as error:
            self._reply(events, error.reply)
            return
        handler = _HANDLERS.get(command.verb)
        if handler is None:
            if command.verb in _NOT_IMPLEMENTED_VERBS:
                self._reply(events, replies.COMMAND_NOT_IMPLEMENTED)
            else:
                self._reply(events, replies.UNKNOWN_COMMAND)
            return
        if not is_clean_text(command.argument):
            self._reply(events, replies.SYNTAX_ERROR)
            return
        try:
            handler(self, command.argument, events)
        except CommandSyntaxError as error:
            self._reply(events, error.reply)

    # -- commands -------------------------------------------------------------------------

    def _on_ehlo(self, argument: str, events: list[Event]) -> None:
        self._greet(argument, True, events)

    def _on_helo(self, argument: str, events: list[Event]) -> None:
        self._greet(argument, False, events)

    def _greet(self, argument: str, extended: bool, events: list[Event]) -> None:
        if not argument or " " in argument:
            raise CommandSyntaxError(replies.SYNTAX_ERROR)
        # RFC 5321 §4.1.4: EHLO/HELO later in a session resets the transaction like RSET.
        self._abort_chunks(events)
        self._reset_transaction()
        self._decide(events, Helo(argument, extended))

    def _on_mail(self, argument: str, events: list[Event]) -> None:
        if self._helo_name is None:
            raise CommandSyntaxError(replies.HELO_REQUIRED)
        if self._sender is not None:
            raise CommandSyntaxError(replies.NESTED_MAIL)
        if self._settings.auth_required and not self.is_authenticated:
            raise CommandSyntaxError(replies.AUTH_REQUIRED)
        sender, params = parse_mail_argument(argument)
        self._check_mail_params(params)
        # RFC 6531 §3.4: a non-ASCII address needs the SMTPUTF8 parameter.
        if not is_ascii(sender) and "SMTPUTF8" not in params:
            raise CommandSyntaxError(replies.SMTPUTF8_REQUIRED)
        self._decide(events, MailFrom(sender, params))

    def _check_mail_params(self, params: Params) -> None:
        """RFC 5321 §4.1.1.11: only parameters of advertised extensions, and only after EHLO."""
        if params and not self._extended:
            raise CommandSyntaxError(replies.PARAMETER_NOT_IMPLEMENTED)
        for keyword, value in params.items():
            if keyword == "SIZE":
                # RFC 1870 §6: a declared size over the limit is refused at MAIL.
                if value is None or not value.isdigit() or not value.isascii():
                    raise CommandSyntaxError(replies.SYNTAX_ERROR)
                if int(value) > self._settings.max_message_size:
                    raise CommandSyntaxError(replies.MESSAGE_TOO_BIG)
            elif keyword == "BODY":
                # RFC 6152: 7BIT or 8BITMIME (BINARYMIME, RFC 3030 §3, is not offered).
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    raise CommandSyntaxError(replies.SYNTAX_ERROR)
            elif keyword == "SMTPUTF8":
                if value is not None:
                    raise CommandSyntaxError(replies.SYNTAX_ERROR)
            elif keyword == "AUTH" and self._settings.auth_mechanisms:
                # RFC 4954 §5: AUTH=<xtext mailbox> or AUTH=<>, accepted as given.
                if value is None or not (value == "<>" or is_xtext(value)):
                    raise CommandSyntaxError(replies.SYNTAX_ERROR)
            elif keyword == "RET":
                # RFC 3461 §4.3, accepted syntactically so DSN-aware clients are not refused.
                if value is None or value.upper() not in ("FULL", "HDRS"):
                    raise CommandSyntaxError(replies.SYNTAX_ERROR)
            elif keyword == "ENVID":
                if value is None or not is_xtext(value):
                    raise CommandSyntaxError(replies.SYNTAX_ERROR)
            else:
                raise CommandSyntaxError(replies.PARAMETER_NOT_IMPLEMENTED)

    def _on_rcpt(self, argument: str, events: list[Event]) -> None:
        if self._sender is None:
            raise CommandSyntaxError(replies.NEED_MAIL)
        if self._chunks is not None:
            # The message is on its way (BDAT): its recipients are fixed.
            raise CommandSyntaxError(replies.BAD_SEQUENCE)
        recipient, params = parse_rcpt_argument(argument)
        if params and not self._extended:
            raise CommandSyntaxError(replies.PARAMETER_NOT_IMPLEMENTED)
        for keyword, value in params.items():
            # RFC 3461 §4.1, §4.2: NOTIFY and ORCPT, accepted syntactically.
            if keyword == "NOTIFY":
                if value is None or not is_valid_notify(value):
                    raise CommandSyntaxError(replies.SYNTAX_ERROR)
            elif keyword == "ORCPT":
                if value is None or not is_valid_orcpt(value):
                    raise CommandSyntaxError(replies.SYNTAX_ERROR)
            else:
                raise CommandSyntaxError(replies.PARAMETER_NOT_IMPLEMENTED)
        if len(self._recipients) >= self._settings.max_recipients:
            raise CommandSyntaxError(replies.TOO_MANY_RECIPIENTS)
        if not is_ascii(recipient) and "SMTPUTF8" not in self._mail_params:
            raise CommandSyntaxError(replies.SMTPUTF8_REQUIRED)
        self._decide(events, RcptTo(recipient, params))

    def _on_data(self, argument: str, events: list[Event]) -> None:
        if argument:
            raise CommandSyntaxError(replies.SYNTAX_ERROR)
        if self._sender is None:
            raise CommandSyntaxError(replies.NEED_MAIL)
        if not self._recipients:
            raise CommandSyntaxError(replies.NEED_RECIPIENTS)
        if self._chunks is not None:
            # RFC 3030 §3.1: DATA and BDAT are not mixed in one transaction.
            raise CommandSyntaxError(replies.BAD_SEQUENCE)
        self._decide(events, DataStart())

    def _on_bdat(self, argument: str, events: list[Event]) -> None:
        if not (self._extended and self._settings.chunking):
            raise CommandSyntaxError(replies.COMMAND_NOT_IMPLEMENTED)
        words = argument.split(" ")
        if (
            not 1 <= len(words) <= 2
            or not words[0].isdigit()
            or not words[0].isascii()
            or len(words[0]) > _MAX_CHUNK_SIZE_DIGITS
            or (len(words) == 2 and words[1].upper() != "LAST")
        ):
            # The chunk's size is unknown: its bytes will be read as commands and refused.
            raise CommandSyntaxError(replies.SYNTAX_ERROR)
        self._chunk_size = self._chunk_left = int(words[0])
        self._chunk_last = len(words) == 2
        refusal = None
        if self._sender is None:
            refusal = replies.NEED_MAIL
        elif not self._recipients:
            refusal = replies.NEED_RECIPIENTS
        if refusal is not None:
            # RFC 3030 §3.2: the chunk is read all the same, then refused.
            self._chunk_reading, self._chunk_refusal = True, refusal
        elif self._chunks is None:
            self._decide(events, DataStart(chunked=True))
        else:
            self._chunk_reading = True

    def _read_chunk(self, data: bytes, events: list[Event]) -> None:
        """Take the next bytes of the chunk being read."""
        self._chunk_left -= len(data)
        if self._chunks is not None and self._chunk_refusal is None:
            decoded = self._chunks.feed(data)
            if decoded:
                events.append(DataChunk(decoded))

    def _end_chunk(self, events: list[Event]) -> None:
        """A chunk is read: answer it, or end the message (last chunk, or refused)."""
        self._chunk_reading = False
        if self._chunk_refusal is not None:
            refusal, self._chunk_refusal = self._chunk_refusal, None
            self._reply(events, refusal)
            return
        chunks = self._chunks
        assert chunks is not None
        if self._chunk_last:
            decoded = chunks.finish()
            if decoded:
                events.append(DataChunk(decoded))
        if self._chunk_last or chunks.error is not None:
            self._decide(events, DataEnd(chunks.size, chunks.error))
            return
        self._reply(events, Reply(250, "2.0.0", f"{self._chunk_size} octets received"))

    def _on_rset(self, argument: str, events: list[Event]) -> None:
        if argument:
            raise CommandSyntaxError(replies.SYNTAX_ERROR)
        self._abort_chunks(events)
        self._reset_transaction()
        self._reply(events, replies.RESET_OK, junk=True)

    def _on_noop(self, argument: str, events: list[Event]) -> None:
        # RFC 5321 §4.1.1.9: a NOOP argument is allowed and ignored.
        self._reply(events, replies.NOOP_OK, junk=True)

    def _on_quit(self, argument: str, events: list[Event]) -> None:
        if argument:
            raise CommandSyntaxError(replies.SYNTAX_ERROR)
        self._reply(events, replies.CLOSING)
        self._closing = Close("quit")
        self._emit_close(events)

    def _on_vrfy(self, argument: str, events: list[Event]) -> None:
        if not argument:
            raise CommandSyntaxError(replies.SYNTAX_ERROR)
        # RFC 5321 §3.5.3: 252 when we will not verify but will try to deliver.
        self._reply(events, replies.CANNOT_VRFY, junk=True)

    def _on_help(self, argument: str, events: list[Event]) -> None:
        self._reply(events, replies.HELP, junk=True)

    def _on_starttls(self, argument: str, events: list[Event]) -> None:
        if argument:
            raise CommandSyntaxError(replies.SYNTAX_ERROR)
        if self._tls:
            raise CommandSyntaxError(replies.BAD_SEQUENCE)
        if not self._settings.starttls_offered:
            raise CommandSyntaxError(replies.COMMAND_NOT_IMPLEMENTED)
        if self._sender is not None:
            raise CommandSyntaxError(replies.BAD_SEQUENCE)
        self._decide(events, StartTLS())

    def _on_auth(self, argument: str, events: list[Event]) -> None:
        mechanisms = self._settings.auth_mechanisms
        if not mechanisms:
            if self._settings.auth_requires_tls and not self._tls:
                raise CommandSyntaxError(replies.ENCRYPTION_REQUIRED_FOR_AUTH)
            raise CommandSyntaxError(replies.COMMAND_NOT_IMPLEMENTED)
        if self._helo_name is None:
            raise CommandSyntaxError(replies.HELO_REQUIRED)
        if not self._extended or self._sender is not None:
            raise CommandSyntaxError(replies.BAD_SEQUENCE)
        if self.is_authenticated:
            raise CommandSyntaxError(replies.ALREADY_AUTHENTICATED)
        words = argument.split()
        if not words or len(words) > 2:
            raise CommandSyntaxError(replies.SYNTAX_ERROR)
        mechanism = words[0].upper()
        if mechanism not in (m.upper() for m in mechanisms):
            raise CommandSyntaxError(replies.AUTH_MECHANISM_UNKNOWN)
        initial: str | None = None
        if len(words) == 2:
            # RFC 4954 §4: "=" is an empty initial response.
            initial = "" if words[1] == "=" else words[1]
        self._decide(events, Auth(mechanism, initial))

    # -- replies and state ----------------------------------------------------------------

    def _answer_helo(self, event: Helo, reply: Reply) -> Reply:
        """The greeting reply for an accepted HELO/EHLO, or the refusal as given."""
        if not reply.is_positive:
            return reply
        self._helo_name = event.name
        self._extended = event.extended
        hostname = self._settings.hostname
        if not event.extended:
            return Reply(250, None, hostname)
        # RFC 5321 §4.1.1.1: the first line names the server, then one extension per line.
        lines = [hostname, "PIPELINING", f"SIZE {self._settings.max_message_size}"]
        if self._settings.starttls_offered and not self._tls:
            lines.append("STARTTLS")
        if self._settings.auth_mechanisms and not self.is_authenticated:
            lines.append("AUTH " + " ".join(self._settings.auth_mechanisms))
        lines += ["ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8"]
        if self._settings.chunking:
            lines.append("CHUNKING")
        return Reply(250, None, "\n".join(lines))

    def _decide(self, events: list[Event], event: Event) -> None:
        """Emit an event that waits for ``respond``."""
        self._pending = event
        events.append(event)

    def _reply(self, events: list[Event], reply: Reply, *, junk: bool = False) -> None:
        """Emit a reply the session decided itself, merged with a preceding Output.

        :param junk: the reply answers NOOP, RSET, VRFY or HELP (JUNK_COMMAND_LIMIT).
        """
        data = self._reply_bytes(reply)
        if junk:
            self._junk_count += 1
            if self._junk_count > JUNK_COMMAND_LIMIT:
                data += self._count_error()
        if events and isinstance(events[-1], Output):
            events[-1] = Output(events[-1].data + data)
        else:
            events.append(Output(data))
        if self._closing is not None:
            self._emit_close(events)

    def _reply_bytes(self, reply: Reply) -> bytes:
        """Encode a reply, counting errors; at the limit append the 421 and plan to close."""
        data = reply.to_bytes()
        if reply.code >= 400:
            data += self._count_error()
        return data

    def _count_error(self) -> bytes:
        """Count an error; at ``max_errors`` plan to close and return the 421 to send."""
        if self._closing is not None:
            return b""
        self._error_count += 1
        if self._error_count < self._settings.max_errors:
            return b""
        self._closing = Close("too_many_errors")
        return replies.TOO_MANY_ERRORS.to_bytes()

    def _emit_close(self, events: list[Event]) -> None:
        """Emit the planned ``Close``; the session ignores input from now on."""
        assert self._closing is not None
        events.append(self._closing)
        self._closed = True

    def _abort_chunks(self, events: list[Event]) -> None:
        """Tell the adapter that the BDAT message in progress will not be completed."""
        if self._chunks is not None:
            events.append(DataAborted())

    def _reset_transaction(self) -> None:
        """Forget the sender, recipients and data state (RFC 5321 §4.1.1.5)."""
        self._sender = None
        self._mail_params = {}
        self._recipients = []
        self._decoder = None
        self._chunks = None


# Verb → handler, built once (STYLE.md: an explicit table, not getattr dispatch).
_HANDLERS: dict[str, Callable[[ServerSession, str, list[Event]], None]] = {
    "EHLO": ServerSession._on_ehlo,
    "HELO": ServerSession._on_helo,
    "MAIL": ServerSession._on_mail,
    "RCPT": ServerSession._on_rcpt,
    "DATA": ServerSession._on_data,
    "BDAT": ServerSession._on_bdat,
    "RSET": ServerSession._on_rset,
    "NOOP": ServerSession._on_noop,
    "QUIT": ServerSession._on_quit,
    "VRFY": ServerSession._on_vrfy,
    "HELP": ServerSession._on_help,
    "STARTTLS": ServerSession._on_starttls,
    "AUTH": ServerSession._on_auth,
}

__all__ = [
    "DECISION_EVENTS",
    "Auth",
    "AuthContinuation",
    "Close",
    "DataAborted",
    "DataChunk",
    "DataEnd",
    "DataStart",
    "Event",
    "Helo",
    "MailFrom",
    "Output",
    "RcptTo",
    "ServerSession",
    "SessionSettings",
    "StartTLS",
]
