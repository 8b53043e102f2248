"""SMTPClientProtocol: one outbound SMTP connection, a thin adapter around ClientSession.

Owns the connection's I/O: writing what the session wants written, the per-stage timeout,
the STARTTLS handshake, streaming a queued message's content through the session's
dot-stuffing encoder, and turning connection loss into the session's ``abort``. It does not
decide what replies mean (delivery/outcome.py) or when to reuse the connection (pool.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from typing_extensions import override
from zope.interface import implementer

from twistedrelay.delivery.headers import HeaderFilter
from twistedrelay.smtp import replies
from twistedrelay.smtp.client_session import (
    ClientSession,
    Closed,
    Event,
    Ready,
    SendContent,
    SessionFailed,
    StartTLS,
    TransactionComplete,
    TransactionResult,
)
from twistedrelay.smtp.replies import Reply
from twistedrelay.tls import VERIFICATION_ERRORS

CONTENT_CHUNK_BYTES = 64 * 1024
CONTENT_WRITE_BYTES = 256 * 1024
"""Content is written once this much is encoded (and at its end)."""


class ConnectionNotReadyError(Exception):
    """The connection never became ready for a transaction; ``reply`` says why."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    """What one transaction sends: the envelope part and a way to read the content.

    ``prepend`` goes before the stored content; header fields matching ``drop_headers``
    (``Envelope.drop_headers``) are left out of the stored content's header section.
    """

    sender: str
    recipients: Sequence[tuple[str, Mapping[str, str | None]]]
    content_size: int
    open_content: Callable[[], BinaryIO]
    prepend: bytes = b""
    body_8bit: bool = False
    smtputf8: bool = False
    mail_params: Mapping[str, str | None] | None = None
    drop_headers: Sequence[tuple[str, str | None]] = ()


@implementer(IHandshakeListener)
class SMTPClientProtocol(Protocol):
    """Drives a ClientSession over a transport.

    ``ready`` fires with the protocol once the session may start a transaction (after the
    greeting, EHLO and any STARTTLS), or fails with ConnectionNotReadyError.

    :param tls_context: called with the mail host name when the session asks for STARTTLS;
        returns the client TLS connection creator (see tls.ClientTLS).
    :param chunking: send with BDAT when the host offers CHUNKING (``delivery.chunking``).
    """

    def __init__(
        self,
        session: ClientSession,
        reactor: Any,
        command_timeout: float,
        data_timeout: float,
        tls_context: Callable[[], Any] | None = None,
        chunking: bool = True,
    ) -> None:
        self.session = session
        self.chunking = chunking
        self.reactor = reactor
        self.command_timeout = command_timeout
        self.data_timeout = data_timeout
        self.tls_context = tls_context
        self.ready: defer.Deferred[SMTPClientProtocol] = defer.Deferred()
        self.closed: defer.Deferred[None] = defer.Deferred()
        self.is_ready = False
        self.is_open = False
        self.tls_used = False
        self.tls_established = False
        self._transaction: defer.Deferred[TransactionResult] | None = None
        self._message: OutboundMessage | None = None
        self._timer: IDelayedCall | None = None

    # -- Twisted callbacks ----------------------------------------------------------------

    @override
    def connectionMade(self) -> None:
        self.is_open = True
        self._arm_timer(self.command_timeout)

    @override
    def dataReceived(self, data: bytes) -> None:
        self._handle(self.session.receive(data))

    @override
    def connectionLost(self, reason: Failure | None = None) -> None:
        self.is_open = False
        self.is_ready = False
        self._cancel_timer()
        lost = replies.CONNECTION_LOST
        if self.tls_used and not self.tls_established:
            # Say why: a failed handshake (a certificate that failed "verify", no common
            # protocol version) must not read as a network glitch; "may" falls back on it.
            failed = replies.TLS_HANDSHAKE_FAILED
            why = "connection closed"
            if reason is not None and reason.check(*VERIFICATION_ERRORS):
                why = _ssl_error_text(reason.value)
            lost = failed.with_text(f"{failed.text}: {why}")
        self._handle(self.session.abort(lost))
        self._fail_ready(lost)
        if not self.closed.called:
            self.closed.callback(None)

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: the STARTTLS handshake succeeded (and verified, for "verify")."""
        self.tls_established = True

    # -- what the pool calls --------------------------------------------------------------

    def send(self, message: OutboundMessage) -> defer.Deferred[TransactionResult]:
        """Run one transaction; fires with one reply per recipient (never fails)."""
        self.is_ready = False
        self._message = message
        self._transaction = defer.Deferred()
        result = self._transaction
        capabilities = self.session.capabilities
        chunk = (
            _whole_message(message)
            if self.chunking and capabilities.chunking and capabilities.pipelining
            else None
        )
        self._handle(
            self.session.begin(
                message.sender,
                message.recipients,
                message.content_size + len(message.prepend),
                body_8bit=message.body_8bit,
                smtputf8=message.smtputf8,
                mail_params=message.mail_params,
                chunk=chunk,
            )
        )
        self._flush()
        return result

    def reset(self) -> defer.Deferred[SMTPClientProtocol]:
        """RSET for the next transaction; fires when ready (at once when RSET is pipelined)."""
        events = self.session.reset()  # first: a refusal must not orphan a new ready
        self.ready = defer.Deferred()
        self._handle(events)
        self._flush()
        return self.ready

    def quit(self) -> None:
        """Say QUIT and close once it is written."""
        if not self.is_open:
            return
        self.is_ready = False
        try:
            self.session.quit()
        except RuntimeError:
            pass  # the session is mid-transaction or failed: just close
        self._flush()
        self.transport.loseConnection()  # type: ignore[union-attr]

    # -- events ---------------------------------------------------------------------------

    def _handle(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, Ready):
                self.is_ready = True
                self._arm_timer(None)
                if not self.ready.called:
                    self.ready.callback(self)
            elif isinstance(event, StartTLS):
                self._start_tls()
            elif isinstance(event, SendContent):
                self._send_content()
            elif isinstance(event, TransactionComplete):
                self._complete(event.result)
            elif isinstance(event, SessionFailed):
                self._fail_ready(event.reply)
                self._flush()
                if self.is_open:
                    self.transport.loseConnection()  # type: ignore[union-attr]
            elif isinstance(event, Closed) and self.is_open:
                self.transport.loseConnection()  # type: ignore[union-attr]
        self._flush()
        if self.session.awaiting is not None:
            stage_timeout = (
                self.data_timeout
                if self.session.awaiting in ("end of data", "BDAT")
                else self.command_timeout
            )
            self._arm_timer(stage_timeout)

    def _start_tls(self) -> None:
        if self.tls_context is None:
            self._handle(self.session.abort(replies.CONNECTION_LOST))
            return
        self._flush()
        self.transport.startTLS(self.tls_context())  # type: ignore[union-attr]
        self.tls_used = True
        self._handle(self.session.tls_established())

    def _send_content(self) -> None:
        """Write the message and its terminator: in one write unless it is large.

        The transport writes at once (twistedrelay.transport), so each write is a send and
        a packet; a 1 KiB message goes out as one.
        """
        message = self._message
        assert message is not None
        transport: Any = self.transport
        encode = self.session.encode_content
        pending: list[bytes] = []
        pending_bytes = 0
        if message.prepend:
            pending.append(encode(message.prepend))
        header_filter = HeaderFilter(message.drop_headers) if message.drop_headers else None
        with message.open_content() as content:
            while chunk := content.read(CONTENT_CHUNK_BYTES):
                if header_filter is not None:
                    chunk = header_filter.feed(chunk)
                if chunk:
                    encoded = encode(chunk)
                    pending.append(encoded)
                    pending_bytes += len(encoded)
                    if pending_bytes >= CONTENT_WRITE_BYTES:
                        transport.write(b"".join(pending))
                        pending.clear()
                        pending_bytes = 0
        if header_filter is not None and (rest := header_filter.finish()):
            pending.append(encode(rest))
        events = self.session.end_content()
        pending.append(self.session.data_to_send())
        transport.write(b"".join(pending))
        self._handle(events)

    def _complete(self, result: TransactionResult) -> None:
        self._message = None
        transaction, self._transaction = self._transaction, None
        if transaction is not None:
            transaction.callback(result)

    def _fail_ready(self, reply: Reply) -> None:
        if not self.ready.called:
            self.ready.errback(ConnectionNotReadyError(reply))

    def _flush(self) -> None:
        data = self.session.data_to_send()
        if data and self.is_open:
            self.transport.write(data)  # type: ignore[union-attr]

    # -- timeouts -------------------------------------------------------------------------

    def _arm_timer(self, seconds: float | None) -> None:
        self._cancel_timer()
        if seconds:
            self._timer = self.reactor.callLater(seconds, self._timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        self._handle(self.session.abort(replies.CONVERSATION_TIMED_OUT))
        self._fail_ready(replies.CONVERSATION_TIMED_OUT)
        if self.is_open:
            self.transport.abortConnection()  # type: ignore[union-attr]


def _whole_message(message: OutboundMessage) -> bytes | None:
    """The message as one BDAT chunk, or None when it should go with DATA.

    BDAT sends the bytes as they are (RFC 3030), so only a message whose lines all end in
    CRLF qualifies (DATA's encoder repairs the others); one with header fields to leave out
    or larger than CONTENT_WRITE_BYTES is streamed with DATA instead of read whole.
    """
    if message.drop_headers or message.content_size + len(message.prepend) > CONTENT_WRITE_BYTES:
        return None
    with message.open_content() as content:
        data = message.prepend + content.read()
    crlf = data.count(b"\r\n")
    if data.count(b"\n") != crlf or data.count(b"\r") != crlf or not data.endswith(b"\r\n"):
        return None
    return data


def _ssl_error_text(error: object) -> str:
    """One line about a failed handshake: OpenSSL's reasons, or service-identity's message."""
    args = getattr(error, "args", ())
    if args and isinstance(args[0], list):
        reasons = [str(part[2]) for part in args[0] if isinstance(part, tuple) and len(part) == 3]
        if reasons:
            return ", ".join(reasons)
    return " ".join(str(error).split()) or type(error).__name__
