"""A test driver for ServerSession: feeds chunks, answers every decision, records the wire."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from twistedrelay.smtp import replies
from twistedrelay.smtp.replies import Reply
from twistedrelay.smtp.server_session import (
    DECISION_EVENTS,
    Auth,
    AuthContinuation,
    Close,
    DataAborted,
    DataChunk,
    DataEnd,
    DataStart,
    Event,
    Output,
    ServerSession,
    SessionSettings,
    StartTLS,
)


def accept_everything(event: Event) -> Reply:
    """The decision of a relay that says yes to everything the session asks."""
    if isinstance(event, DataStart):
        return replies.START_MAIL_INPUT
    if isinstance(event, DataEnd):
        return event.error or replies.queued_as("TESTID")
    if isinstance(event, StartTLS):
        return replies.READY_TO_START_TLS
    if isinstance(event, Auth | AuthContinuation):
        return replies.AUTH_SUCCEEDED
    return replies.OK


@dataclass
class Transcript:
    """What a session wrote and which messages it would have queued."""

    wire: bytearray = field(default_factory=bytearray)
    events: list[Event] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)
    rejected: list[Reply] = field(default_factory=list)
    closed: str | None = None
    _body: bytearray = field(default_factory=bytearray)

    @property
    def text(self) -> str:
        """The wire as text, for readable assertions."""
        return self.wire.decode("utf-8", "replace")

    @property
    def codes(self) -> list[str]:
        """The status of each reply line, e.g. ``["220", "250-", "250 ", ...]``."""
        return [line[:4] for line in self.text.split("\r\n") if line]

    @property
    def final_codes(self) -> list[int]:
        """The code of each complete reply (multi-line replies count once)."""
        return [int(line[:3]) for line in self.text.split("\r\n") if line[3:4] == " "]


def drive(
    chunks: Iterable[bytes],
    settings: SessionSettings | None = None,
    decide: Callable[[Event], Reply] = accept_everything,
    session: ServerSession | None = None,
) -> Transcript:
    """Run a session over ``chunks`` the way the Twisted adapter does."""
    session = session or ServerSession(settings or SessionSettings(hostname="mx.test"))
    transcript = Transcript()
    transcript.wire += session.greeting()
    for chunk in chunks:
        events = session.receive(chunk)
        while events:
            for event in events:
                transcript.events.append(event)
                _record(session, transcript, event, decide)
            events = session.receive(b"") if isinstance(events[-1], DECISION_EVENTS) else []
    return transcript


def _record(
    session: ServerSession,
    transcript: Transcript,
    event: Event,
    decide: Callable[[Event], Reply],
) -> None:
    if isinstance(event, Output):
        transcript.wire += event.data
    elif isinstance(event, DataChunk):
        transcript._body += event.data
    elif isinstance(event, DataAborted):
        transcript._body.clear()
    elif isinstance(event, Close):
        transcript.closed = event.reason
    elif isinstance(event, DECISION_EVENTS):
        reply = decide(event)
        if isinstance(event, DataEnd):
            if event.error is None and reply.is_positive:
                transcript.messages.append(bytes(transcript._body))
            elif event.error is not None:
                transcript.rejected.append(event.error)
            transcript._body.clear()
        identity = "user" if reply.code == 235 else None
        transcript.wire += session.respond(reply, authenticated_as=identity)
