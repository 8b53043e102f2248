"""The inbound SMTP server on Twisted: a thin adapter around ``ServerSession``.

Owns the I/O of inbound sessions: moving bytes between the transport and the sans-IO
session, timeouts, connection limits, STARTTLS, and carrying out the decisions the session
asks for (relay permission, hook plugins, AUTH, writing and committing the queue file). It
owns no protocol rule: those are in server_session.py.

Invariant: ``250 queued as`` is written only after ``QueueStore`` reports the entry durable;
any failure before that removes the partial file and answers 4xx.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Any, TypeVar
from typing import Protocol as TypingProtocol

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IPushProducer,
)
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from typing_extensions import override
from zope.interface import implementer

from twistedrelay.auth import Authenticator, LoginThrottle, UsersFileError
from twistedrelay.config import Config
from twistedrelay.delivery.headers import build_drop_rules
from twistedrelay.eventlog import MailLog
from twistedrelay.hooks import (
    ConnectContext,
    DataContext,
    Decision,
    DisconnectContext,
    HeloContext,
    HookContext,
    HookRunner,
    MailContext,
    Notes,
    QueueContext,
    RcptContext,
    Verdict,
)
from twistedrelay.metrics import RelayMetrics
from twistedrelay.policy import RelayPolicy
from twistedrelay.queue.entry import Envelope, Recipient
from twistedrelay.queue.incoming import IncomingMessage, QueueWriteError
from twistedrelay.queue.store import ClaimedEntry, QueueStore
from twistedrelay.smtp import replies
from twistedrelay.smtp.admission import Admission
from twistedrelay.smtp.replies import Reply
from twistedrelay.smtp.sasl import Credentials, SASLError, SASLExchange
from twistedrelay.smtp.server_session import (
    Auth,
    AuthContinuation,
    Close,
    DataAborted,
    DataChunk,
    DataEnd,
    DataStart,
    Event,
    Helo,
    MailFrom,
    Output,
    RcptTo,
    ServerSession,
    SessionSettings,
    StartTLS,
)
from twistedrelay.smtp.trace import build_received_header, protocol_name
from twistedrelay.tls import ServerTLS, describe_tls

_log = Logger(namespace="twistedrelay.smtp")

LISTENER_MODES = ("smtp", "submission", "submissions")
#: Input one session may hold while a decision is pending before reading pauses. Pausing
#: at every decision cost about 8 epoll_ctl calls per message, yet clients seldom send
#: more than the next pipelined commands ahead; the bound keeps a flood's memory small.
HELD_INPUT_LIMIT = 64 * 1024


class NewClaims(TypingProtocol):
    """The delivery side that takes new mail claimed at commit (DeliveryService)."""

    def owner_for_new(self) -> str | None:
        """The owner to commit new mail to in active/, or None (commit to incoming/)."""

    def claimed_new(self, claimed: ClaimedEntry) -> None:
        """Deliver an entry committed into active/<owner>/."""


@dataclass
class InboundParts:
    """The collaborators every inbound session of one worker shares (built by app.py).

    ``on_queued(queue_id)`` tells the delivery side of this worker that an entry is durable
    in ``incoming/``, so it is claimed at once instead of at the next queue scan. With
    ``new_claims`` (the worker's delivery), new mail is committed straight into
    ``active/<owner>/`` and handed over claimed instead (no rename, no read-back).
    """

    config: Config
    reactor: Any
    store: QueueStore
    policy: RelayPolicy
    hooks: HookRunner
    maillog: MailLog
    metrics: RelayMetrics
    on_queued: Callable[[str], None]
    new_claims: NewClaims | None = None
    server_tls: ServerTLS | None = None
    authenticator: Authenticator | None = None
    throttle: LoginThrottle = field(default_factory=LoginThrottle)
    admission: Admission = field(default_factory=Admission)


class SMTPServerFactory(ServerFactory):
    """Builds one SMTPServerProtocol per connection on one listener, within the limits.

    :param listener: "smtp" (port 25: relay and inbound), "submission" (587: AUTH
        required) or "submissions" (465: implicit TLS, AUTH required).
    """

    noisy = False

    def __init__(self, parts: InboundParts, listener: str) -> None:
        if listener not in LISTENER_MODES:
            raise ValueError(f"unknown listener mode {listener!r}")
        self.parts = parts
        self.listener = listener
        self.sessions: set[SMTPServerProtocol] = set()
        self.draining = False

    @override
    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        host = str(getattr(addr, "host", ""))
        refusal = self._refusal_for(host)
        if refusal is not None:
            # One line per refused connection, for fail2ban and the like.
            self.parts.maillog.rejected("CONNECT", host, refusal)
            return _RefusingProtocol(refusal)
        protocol = SMTPServerProtocol(self, host, int(getattr(addr, "port", 0)))
        return protocol

    def _refusal_for(self, host: str) -> Reply | None:
        if self.draining:
            return replies.SHUTTING_DOWN
        parts = self.parts
        return parts.admission.refusal_for(host, parts.reactor.seconds(), parts.config.smtp)

    def session_started(self, protocol: SMTPServerProtocol) -> None:
        """Count a session against the worker's limits."""
        self.sessions.add(protocol)
        self.parts.admission.started(protocol.client_address)

    def session_ended(self, protocol: SMTPServerProtocol) -> None:
        """Release a session's place in the worker's limits."""
        self.sessions.discard(protocol)
        self.parts.admission.ended(protocol.client_address)

    def close_idle_sessions(self) -> None:
        """At shutdown: say 421 to every session that is not in the middle of a message."""
        self.draining = True
        for protocol in list(self.sessions):
            protocol.close_if_idle()

    def close_all_sessions(self) -> None:
        """At the end of the shutdown grace period: close every session, discarding drafts."""
        for protocol in list(self.sessions):
            protocol.close_now(replies.SHUTTING_DOWN)


@implementer(IPushProducer)
class _ReplyBackpressure:
    """The session as its transport's producer: reading stops while replies cannot leave."""

    def __init__(self, protocol: SMTPServerProtocol) -> None:
        self._protocol = protocol

    def pauseProducing(self) -> None:  # noqa: N802 (IPushProducer's name)
        self._protocol.pause_reading("replies")

    def resumeProducing(self) -> None:  # noqa: N802 (IPushProducer's name)
        self._protocol.resume_reading("replies")

    def stopProducing(self) -> None:  # noqa: N802 (IPushProducer's name)
        """The connection is gone; connectionLost cleans up."""


class _RefusingProtocol(Protocol):
    """Answers a connection over the limits with one 421 and closes it."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply

    @override
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.reply.to_bytes())
        self.transport.loseConnection()


_Result = TypeVar("_Result")


def _one_write(
    method: Callable[..., _Result],
) -> Callable[..., _Result]:
    """Make an entry point of SMTPServerProtocol send its replies in one transport write.

    A pipelined group (MAIL, RCPT…, DATA) is answered in one TCP segment, as RFC 2920 §3.2
    suggests, and with one system call: the transport writes at once
    (twistedrelay.transport), so separate writes would each be a send and a packet. While
    a decision of the group is still being made (a hook, the commit of a message sent with
    BDAT), the replies before it wait for it: a pipelining client reads none of them
    before it has all, and a first small segment sent alone would hold the next one back
    for the client's delayed ACK (Nagle's algorithm: 40 ms on Linux).
    """

    @functools.wraps(method)
    def entry_point(self: SMTPServerProtocol, *args: Any) -> _Result:
        if self._coalescing:
            return method(self, *args)
        self._coalescing = True
        try:
            return method(self, *args)
        finally:
            self._coalescing = False
            if not self._waiting:
                self._send_output()

    return entry_point


@implementer(IHandshakeListener, IHalfCloseableProtocol)
class SMTPServerProtocol(Protocol):
    """One inbound SMTP session: ServerSession ↔ transport, decisions, queue file."""

    def __init__(self, factory: SMTPServerFactory, client_address: str, client_port: int) -> None:
        self.factory = factory
        self.parts = factory.parts
        self.client_address = client_address
        self.client_port = client_port
        self.listener = factory.listener
        self.tls: str | None = None
        self.session = ServerSession(self._settings())
        self.notes = Notes()
        self._message: IncomingMessage | None = None
        self._queue_id: str | None = None
        self._waiting = False
        self._held = 0  # bytes received while the current decision is pending
        # Why reading from the client is paused: "hook" (the connect hook is deciding),
        # "held" (HELD_INPUT_LIMIT while a decision is pending), "replies" (the client
        # does not read what we send: the transport's buffer is full).
        self._pauses: set[str] = set()
        self._watching_replies = False
        self._closed = False
        self._input_ended = False  # the client shut its sending side
        self._idle_timer: IDelayedCall | None = None
        self._data_timer: IDelayedCall | None = None
        self._data_command = "DATA"  # or BDAT: how the message in progress is sent
        self._sasl: SASLExchange | None = None
        self._auth_identity: str | None = None
        self._messages_queued = 0
        self._add_headers: tuple[str, ...] = ()
        self._coalescing = False  # inside an entry point: replies collect in _output
        self._output: list[bytes] = []

    # -- Twisted callbacks ----------------------------------------------------------------

    @override
    @_one_write
    def connectionMade(self) -> None:
        if self.listener != "submissions":
            self._watch_replies()  # with implicit TLS: once the handshake is done
        self.factory.session_started(self)
        self.parts.metrics.session_opened(self.listener)
        self.parts.maillog.connect(self.client_address, self.client_port, self.listener)
        if self.listener == "submissions":
            # Implicit TLS: the handshake comes first; handshakeCompleted() names the cipher.
            self.tls = "TLS"
            self.session.tls_started(self._settings())
        self._reset_idle_timer()
        if not self.parts.hooks.has_hook("connect"):
            self._write(self.session.greeting(), 220)
            return
        self._waiting = True
        self.pause_reading("hook")
        ctx = ConnectContext(**self._hook_fields())
        self.parts.hooks.run("connect", ctx).addCallback(self._connect_decided, ctx)

    @_one_write
    def _connect_decided(self, decision: Decision, ctx: ConnectContext) -> None:
        self._waiting = False
        if self._closed:
            return
        if decision.verdict in (Verdict.PROCEED, Verdict.ACCEPT):
            self.resume_reading("hook")
            self._write(self.session.greeting(), 220)
            self._pump(b"")
            self._close_if_input_ended()
            return
        reply = decision.reply or replies.SERVICE_NOT_AVAILABLE
        self._rejected("CONNECT", reply, detail=_hook_detail(decision, ctx))
        self.close_now(reply)

    @override
    @_one_write
    def dataReceived(self, data: bytes) -> None:
        if not self._waiting:
            self._pump(data)
        else:
            # A decision is pending: the session only buffers (replies stay in order).
            self.session.receive(data)
            self._held += len(data)
            if self._held > HELD_INPUT_LIMIT:
                self.pause_reading("held")

    def readConnectionLost(self) -> None:  # noqa: N802 (Twisted's name)
        """The client shut its sending side (``shutdown(SHUT_WR)``, ``nc -N``): answer, then close.

        What it sent before is still answered: a message whose end arrived is still
        committed and its 250 sent, so that the client does not send it again; a message
        cut off is discarded. Twisted would otherwise close both sides at once.
        """
        self._input_ended = True
        self._close_if_input_ended()

    def writeConnectionLost(self) -> None:  # noqa: N802 (Twisted's name)
        """Our sending side is shut (IHalfCloseableProtocol; TCP never reports it): close."""
        self.close_now(None)

    @property
    def reading_paused_for(self) -> frozenset[str]:
        """Why reading from the client is paused now (empty: it is not)."""
        return frozenset(self._pauses)

    def pause_reading(self, reason: str) -> None:
        """Stop reading from the client for ``reason`` (see ``_pauses``)."""
        if not self._pauses and not self._closed:
            self.transport.pauseProducing()  # type: ignore[union-attr]
        self._pauses.add(reason)

    def resume_reading(self, reason: str) -> None:
        """``reason`` no longer holds; read again when no other reason does."""
        if reason in self._pauses:
            self._pauses.discard(reason)
            if not self._pauses and not self._closed:
                self.transport.resumeProducing()  # type: ignore[union-attr]

    def _close_if_input_ended(self) -> None:
        if self._input_ended and not self._waiting:
            self.close_now(None)

    @override
    def connectionLost(self, reason: Failure | None = None) -> None:
        self._closed = True
        for timer in (self._idle_timer, self._data_timer):
            if timer is not None and timer.active():
                timer.cancel()
        if self._message is not None:
            self._message.discard()
            self._message = None
        self.factory.session_ended(self)
        self.parts.metrics.session_closed()
        self.parts.maillog.disconnect(
            self.client_address,
            f"messages={self._messages_queued} errors={self.session.error_count}",
        )
        if self.parts.hooks.has_hook("disconnect"):
            self.parts.hooks.run(
                "disconnect",
                DisconnectContext(
                    **self._hook_fields(),
                    messages=self._messages_queued,
                    errors=self.session.error_count,
                ),
            )

    # -- the loop -------------------------------------------------------------------------

    def _pump(self, data: bytes) -> None:
        """Feed the session and act on its events until it needs an asynchronous decision."""
        while not self._closed:
            pending: Event | None = None
            events = self.session.receive(data)
            if events:
                # A command (or message data) came whole: the client is not idle. Bytes
                # that complete nothing do not count, so one byte every few seconds
                # cannot hold a connection for ever (slowloris).
                self._reset_idle_timer()
            for event in events:
                if isinstance(event, DataChunk):
                    if self._message is not None:
                        self._message.write(event.data)
                elif isinstance(event, DataAborted):
                    self._cancel_data_timer()
                    self._discard_message()
                elif isinstance(event, Output):
                    self._write(event.data)
                elif isinstance(event, Close):
                    self._close()
                    return
                else:
                    pending = event
            data = b""
            if pending is None:
                return
            try:
                decision = self._decide(pending)
            except Exception:
                # A bug must cost the client one 451, never the session or the worker.
                decision = self._internal_error(Failure())
            if isinstance(decision, defer.Deferred):
                self._waiting = True
                self._held = 0
                decision.addErrback(self._internal_error)
                decision.addCallback(self._decided, pending)
                return
            self._answer(decision, pending)

    @_one_write
    def _decided(self, reply: Reply, event: Event) -> None:
        self._waiting = False
        if self._closed:
            return
        self.resume_reading("held")
        self._answer(reply, event)
        self._pump(b"")
        self._close_if_input_ended()

    def _answer(self, reply: Reply, event: Event) -> None:
        identity = self._auth_identity if reply.code == 235 else None
        out = self.session.respond(reply, authenticated_as=identity)
        if out:  # nothing for the 354 that lets BDAT chunks in
            self._write(out, reply.code)
        if isinstance(event, StartTLS) and reply.code == 220:
            self._start_tls()

    def _internal_error(self, failure: Failure) -> Reply:
        _log.failure(
            "internal error in an SMTP session from {client}", failure, client=self.client_address
        )
        self._discard_message()
        return replies.PLUGIN_ERROR

    def _write(self, data: bytes, code: int | None = None) -> None:
        if self._closed:
            return
        if self._coalescing:
            self._output.append(data)
        else:
            self.transport.write(data)  # type: ignore[union-attr]
        metrics = self.parts.metrics
        if code is not None:
            metrics.reply_sent(code)
            return
        # Output may hold several replies (pipelining): count each final line.
        start = 0
        while start < len(data):
            end = data.find(b"\r\n", start)
            if end < 0:
                break
            if end - start > 3 and data[start + 3] == 32:  # "250 ..." ends a reply
                metrics.reply_sent(int(data[start : start + 3]))
            start = end + 2

    # -- decisions ------------------------------------------------------------------------

    def _decide(self, event: Event) -> Reply | defer.Deferred[Reply]:
        if isinstance(event, Helo):
            return self._run_hook(
                "helo",
                replies.OK,
                lambda: HeloContext(**self._hook_fields(), extended=event.extended),
            )
        if isinstance(event, MailFrom):
            return self._on_mail(event)
        if isinstance(event, RcptTo):
            return self._on_rcpt(event)
        if isinstance(event, DataStart):
            return self._on_data_start(event)
        if isinstance(event, DataEnd):
            return self._on_data_end(event)
        if isinstance(event, StartTLS):
            if self.parts.server_tls is None or self.tls is not None:
                return replies.TLS_NOT_AVAILABLE
            return replies.READY_TO_START_TLS
        if isinstance(event, Auth):
            return self._on_auth(event)
        if isinstance(event, AuthContinuation):
            return self._on_auth_line(event.line)
        raise AssertionError(f"unexpected event {event!r}")

    def _run_hook(
        self, hook: str, accepted: Reply, build: Callable[[], HookContext]
    ) -> Reply | defer.Deferred[Reply]:
        """Run a deciding hook when any plugin has it; map its Decision to a reply."""
        if not self.parts.hooks.has_hook(hook):
            return accepted
        ctx = build()
        return self.parts.hooks.run(hook, ctx).addCallback(
            self._reply_for_decision, accepted, hook.upper(), ctx
        )

    def _reply_for_decision(
        self, decision: Decision, accepted: Reply, stage: str, ctx: HookContext
    ) -> Reply:
        """The reply for a hook's decision; a refusal is logged with the deciding plugin."""
        if decision.verdict in (Verdict.PROCEED, Verdict.ACCEPT):
            return accepted
        reply = decision.reply or replies.PLUGIN_ERROR
        sender = ctx.sender if isinstance(ctx, MailContext | RcptContext | DataContext) else None
        recipient = ctx.recipient if isinstance(ctx, RcptContext) else None
        self._rejected(stage, reply, sender, recipient, _hook_detail(decision, ctx))
        if decision.verdict is Verdict.DISCONNECT:
            self.parts.reactor.callLater(0, self.close_now, None)
        return reply

    def _on_mail(self, event: MailFrom) -> Reply | defer.Deferred[Reply]:
        auth = self.parts.config.auth
        user = self.session.authenticated_as
        if (
            user is not None
            and auth.restrict_sender
            and self.parts.authenticator is not None
            and event.sender
            and not self._may_send_as(user, event.sender)
        ):
            self._rejected("MAIL", replies.SENDER_NOT_OWNED, sender=event.sender)
            return replies.SENDER_NOT_OWNED
        return self._run_hook(
            "mail",
            replies.SENDER_OK,
            lambda: MailContext(**self._hook_fields(), sender=event.sender, params=event.params),
        )

    def _may_send_as(self, user: str, sender: str) -> bool:
        assert self.parts.authenticator is not None
        try:
            return self.parts.authenticator.may_send_as(user, sender)
        except UsersFileError as e:
            _log.error("users file unusable: {error}", error=e)
            return False

    def _on_rcpt(self, event: RcptTo) -> Reply | defer.Deferred[Reply]:
        # Core relay policy first; its refusal is final (plugins may only narrow it).
        refusal = self.parts.policy.check_recipient(
            self.client_address, self.session.is_authenticated, event.recipient
        )
        if refusal is not None:
            self._rejected("RCPT", refusal, recipient=event.recipient)
            return refusal
        return self._run_hook(
            "rcpt",
            replies.RECIPIENT_OK,
            lambda: RcptContext(
                **self._hook_fields(),
                recipient=event.recipient,
                sender=self.session.sender or "",
                params=event.params,
                accepted=tuple(r for r, _ in self.session.recipients),
            ),
        )

    def _on_data_start(self, event: DataStart) -> Reply:
        # A creation error surfaces at commit(), which answers 451/452 after DATA.
        self._data_command = "BDAT" if event.chunked else "DATA"
        message = self.parts.store.open_message()
        queue_id = message.queue_id
        self._queue_id, self._message = queue_id, message
        message.write(self._received_header(queue_id))
        data_timeout = self.parts.config.smtp.data_timeout
        if data_timeout:
            self._data_timer = self.parts.reactor.callLater(data_timeout, self._timed_out)
        return replies.START_MAIL_INPUT

    def _cancel_data_timer(self) -> None:
        if self._data_timer is not None and self._data_timer.active():
            self._data_timer.cancel()

    def _on_data_end(self, event: DataEnd) -> Reply | defer.Deferred[Reply]:
        self._cancel_data_timer()
        message, queue_id = self._message, self._queue_id
        if message is None or queue_id is None:
            return replies.LOCAL_ERROR
        if event.error is not None:
            self._discard_message()
            self._rejected(self._data_command, event.error, sender=self.session.sender)
            return event.error
        if not self.parts.hooks.has_hook("data"):
            return self._commit(message, queue_id, "incoming", ())
        context = DataContext(
            **self._hook_fields(),
            sender=self.session.sender or "",
            recipients=tuple(r for r, _ in self.session.recipients),
            headers=parse_header_section(message.read_back()),
            size=message.size,
            message_reader=message.read_back,
        )
        return self.parts.hooks.run("data", context).addCallback(
            self._after_data_hook, message, queue_id, context
        )

    def _after_data_hook(
        self, decision: Decision, message: IncomingMessage, queue_id: str, ctx: DataContext
    ) -> Reply | defer.Deferred[Reply]:
        if decision.verdict in (Verdict.REJECT, Verdict.TEMPFAIL, Verdict.DISCONNECT):
            self._discard_message()
            return self._reply_for_decision(decision, replies.OK, self._data_command, ctx)
        hold_reason = ""
        if decision.verdict is Verdict.HOLD:
            hold_reason = f"{decision.reason or 'data hook'}; {_hook_detail(decision, ctx)}"
        return self._commit(
            message,
            queue_id,
            "hold" if hold_reason else "incoming",
            decision.header_lines(),
            hold_reason,
            build_drop_rules(decision.drop_headers),
        )

    def _commit(
        self,
        message: IncomingMessage,
        queue_id: str,
        state: str,
        added: tuple[str, ...],
        hold_reason: str = "",
        dropped: tuple[tuple[str, str | None], ...] = (),
    ) -> defer.Deferred[Reply]:
        envelope = self._envelope(queue_id, added, dropped)
        size = message.size
        new_claims = self.parts.new_claims
        owner = None
        if new_claims is not None and state == "incoming":
            owner = new_claims.owner_for_new()

        def durable(claimed: ClaimedEntry | None) -> Reply:
            self._message = None
            self._messages_queued += 1
            self.parts.metrics.message_received(size)
            self.parts.maillog.queued(
                queue_id, envelope.sender, size, len(envelope.recipients), self.client_address
            )
            if claimed is not None and new_claims is not None:
                new_claims.claimed_new(claimed)
            elif state == "incoming":
                self.parts.on_queued(queue_id)
            else:
                self.parts.maillog.held(queue_id, hold_reason or "data hook")
            if self.parts.hooks.has_hook("queue"):
                self.parts.hooks.run("queue", QueueContext.for_envelope(envelope))
            return replies.queued_as(queue_id)

        def failed(failure: Failure) -> Reply:
            self._message = None
            if failure.check(QueueWriteError):
                _log.error(
                    "{queue_id}: queue file write error: {error}",
                    queue_id=queue_id,
                    error=failure.value,
                )
                return failure.value.reply  # type: ignore[union-attr, no-any-return]
            return self._internal_error(failure)

        if owner is None:
            return message.commit(envelope, state).addCallbacks(lambda _: durable(None), failed)
        return self.parts.store.commit_claimed(message, envelope, owner).addCallbacks(
            durable, failed
        )

    def _envelope(
        self,
        queue_id: str,
        added_headers: tuple[str, ...],
        dropped_headers: tuple[tuple[str, str | None], ...] = (),
    ) -> Envelope:
        session = self.session
        policy = self.parts.policy
        params = dict(session.mail_params)
        return Envelope(
            queue_id=queue_id,
            sender=session.sender or "",
            recipients=tuple(
                Recipient(policy.queued_recipient(r), dict(p)) for r, p in session.recipients
            ),
            arrival_time=self.parts.reactor.seconds(),
            mail_params=params,
            client_address=self.client_address,
            client_port=self.client_port,
            client_helo=session.helo_name or "",
            authenticated_as=session.authenticated_as,
            listener=self.listener,
            tls=self.tls,
            smtputf8="SMTPUTF8" in params,
            body_8bit=(params.get("BODY") or "").upper() == "8BITMIME",
            prepend_headers=added_headers,
            drop_headers=dropped_headers,
        )

    def _received_header(self, queue_id: str) -> bytes:
        session = self.session
        recipients = session.recipients
        return build_received_header(
            helo=session.helo_name,
            client_address=self.client_address,
            hostname=self.parts.config.hostname,
            protocol=protocol_name(
                session.extended,
                self.tls is not None,
                session.is_authenticated,
                "SMTPUTF8" in session.mail_params,
            ),
            queue_id=queue_id,
            date_epoch=self.parts.reactor.seconds(),
            tls=self.tls,
            recipient=recipients[0][0] if len(recipients) == 1 else None,
        )

    # -- STARTTLS and AUTH ----------------------------------------------------------------

    def _start_tls(self) -> None:
        assert self.parts.server_tls is not None
        self._send_output()  # the 220 goes in clear, before the handshake
        self.transport.startTLS(self.parts.server_tls)  # type: ignore[union-attr]
        self.tls = "TLS"
        self.session.tls_started(self._settings())
        self.notes = Notes()

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: the TLS handshake is done (STARTTLS or implicit TLS)."""
        self.tls = describe_tls(self.transport) or "TLS"
        self.parts.metrics.tls_handshake("inbound", True)
        if not self._watching_replies:  # implicit TLS (STARTTLS: watching since the start)
            self._watch_replies()

    def _watch_replies(self) -> None:
        """Stop reading while replies cannot leave (the transport pauses this producer).

        So a client that sends commands and never reads the replies cannot make us buffer
        them without end. Not before an implicit TLS handshake: the TLS layer pauses its
        producer until the handshake is done, and it cannot finish without reading.
        (After STARTTLS, Twisted moves the producer to the TLS layer itself.)
        """
        self._watching_replies = True
        self.transport.registerProducer(_ReplyBackpressure(self), True)  # type: ignore[union-attr]

    def _on_auth(self, event: Auth) -> Reply | defer.Deferred[Reply]:
        if self.parts.authenticator is None or not self._auth_offered():
            if self.parts.authenticator is not None and self.tls is None:
                return replies.ENCRYPTION_REQUIRED_FOR_AUTH
            return replies.COMMAND_NOT_IMPLEMENTED
        try:
            self._sasl = SASLExchange(event.mechanism, event.initial_response)
            return self._auth_step(self._sasl.start())
        except SASLError as e:
            self._sasl = None
            return e.reply

    def _on_auth_line(self, line: str) -> Reply | defer.Deferred[Reply]:
        if self._sasl is None:
            return replies.BAD_SEQUENCE
        try:
            return self._auth_step(self._sasl.respond(line))
        except SASLError as e:
            self._sasl = None
            return e.reply

    def _auth_step(self, step: Reply | Credentials) -> Reply | defer.Deferred[Reply]:
        if isinstance(step, Reply):
            return step
        self._sasl = None
        assert self.parts.authenticator is not None
        throttle, reactor = self.parts.throttle, self.parts.reactor
        delay = throttle.begin(self.client_address, reactor.seconds())
        if delay is None:  # a throttled check from this address is running: one at a time
            self.parts.maillog.auth(self.client_address, step.username, ok=False)
            return replies.AUTH_TEMPORARY_FAILURE
        authenticator = self.parts.authenticator
        # Slow down password guessing from this address: the wait comes before the check,
        # so that answers cut short by closing the connection gain nothing.
        checked = (
            deferLater(reactor, delay, authenticator.authenticate, step.username, step.password)
            if delay > 0
            else authenticator.authenticate(step.username, step.password)
        )

        def succeeded(identity: str) -> Reply:
            self.parts.maillog.auth(self.client_address, identity, ok=True)
            self._auth_identity = identity
            return replies.AUTH_SUCCEEDED

        def failed(failure: Failure) -> defer.Deferred[Reply] | Reply:
            throttle.record_failure(self.client_address, self.parts.reactor.seconds())
            self.parts.maillog.auth(self.client_address, step.username, ok=False)
            if not failure.check(UnauthorizedLogin):
                _log.failure("authentication backend failed", failure)
                return replies.AUTH_TEMPORARY_FAILURE
            return replies.AUTH_FAILED

        def done(reply: Reply) -> Reply:
            throttle.end(self.client_address)
            return reply

        return checked.addCallbacks(succeeded, failed).addCallback(done)

    def _auth_offered(self) -> bool:
        if self.parts.authenticator is None:
            return False
        if self.tls is not None:
            return True
        return self.parts.config.auth.allow_plaintext_on_loopback and _is_loopback(
            self.client_address
        )

    def _settings(self) -> SessionSettings:
        smtp = self.parts.config.smtp
        return SessionSettings(
            hostname=self.parts.config.hostname,
            max_message_size=smtp.max_message_size,
            max_recipients=smtp.max_recipients,
            max_received_headers=smtp.max_received_headers,
            max_header_size=smtp.max_header_size,
            max_line_length=smtp.max_line_length,
            max_text_line_length=smtp.max_text_line_length,
            max_errors=smtp.max_errors,
            chunking=smtp.chunking,
            starttls_offered=self.parts.server_tls is not None and self.tls is None,
            auth_mechanisms=("PLAIN", "LOGIN") if self._auth_offered() else (),
            auth_requires_tls=self.parts.authenticator is not None,
            auth_required=self.listener != "smtp",
        )

    # -- timeouts and closing -------------------------------------------------------------

    def _reset_idle_timer(self) -> None:
        timeout = self.parts.config.smtp.command_timeout
        if not timeout:
            return
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.reset(timeout)
        else:
            self._idle_timer = self.parts.reactor.callLater(timeout, self._timed_out)

    def _timed_out(self) -> None:
        self.close_now(replies.IDLE_TIMEOUT)

    def close_if_idle(self) -> None:
        """Shutdown: close now unless a message is being received or committed."""
        if self._message is None and not self._waiting:
            self.close_now(replies.SHUTTING_DOWN)

    @_one_write
    def close_now(self, reply: Reply | None) -> None:
        """Say ``reply`` (if any) and close; a message not yet durable is discarded."""
        if self._closed:
            return
        if reply is not None:
            self._write(reply.to_bytes(), reply.code)
        self._discard_message()
        self._close()

    def _close(self) -> None:
        if self.transport is not None:
            self._send_output()
            if self._watching_replies:
                # A transport whose producer is paused resumes it when its buffer drains
                # instead of closing: the close must not wait on a producer.
                self._watching_replies = False
                self.transport.unregisterProducer()  # type: ignore[attr-defined]
            self.transport.loseConnection()

    def _send_output(self) -> None:
        if self._output:
            data = b"".join(self._output)
            self._output.clear()
            if not self._closed:
                self.transport.write(data)  # type: ignore[union-attr]

    def _discard_message(self) -> None:
        if self._message is not None:
            self._message.discard()
            self._message = None

    # -- helpers --------------------------------------------------------------------------

    def _hook_fields(self) -> dict[str, Any]:
        return {
            "client_address": self.client_address,
            "client_port": self.client_port,
            "listener": self.listener,
            "tls": self.tls,
            "helo_name": self.session.helo_name or "",
            "authenticated_as": self.session.authenticated_as,
            "now": self.parts.reactor.seconds(),
            "notes": self.notes,
        }

    def _rejected(
        self,
        stage: str,
        reply: Reply,
        sender: str | None = None,
        recipient: str | None = None,
        detail: str = "",
    ) -> None:
        self.parts.maillog.rejected(
            stage,
            self.client_address,
            reply,
            sender=sender if sender is not None else self.session.sender,
            recipient=recipient,
            detail=detail,
        )


def _is_loopback(address: str) -> bool:
    """127.0.0.0/8, ::1, or an IPv4-mapped 127.x: traffic that never left the host."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _hook_detail(decision: Decision, ctx: HookContext) -> str:
    """For the mail log: the plugin whose verdict won, and what plugins recorded."""
    detail = f"plugin={decision.decided_by or '-'}"
    if ctx.results:
        detail += f" results=({ctx.results.format()})"
    return detail


def parse_header_section(message: bytes) -> tuple[tuple[str, str], ...]:
    """The header fields of a stored message as (name, unfolded value) pairs, in order."""
    parsed = BytesHeaderParser(policy=compat32).parsebytes(message)
    return tuple((name, " ".join(str(value).split())) for name, value in parsed.items())
