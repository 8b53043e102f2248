"""Queue entries: what the relay remembers about a message besides its bytes.

Owns the shape and the JSON encoding of the envelope (fixed when the message is queued) and
of the entry status (per-recipient delivery outcomes, which change on every attempt). Pure: no
filesystem access here (that is queue/store.py). The encoding is versioned JSON so an
operator can read it and a later release can still load entries written by this one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

ENVELOPE_FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class Recipient:
    """One forward-path with its RCPT TO parameters (NOTIFY, ORCPT: RFC 3461)."""

    address: str
    params: dict[str, str | None] = field(default_factory=dict)

    @property
    def domain(self) -> str:
        """The domain part, lower-cased ("" for a local part alone, e.g. postmaster)."""
        _, at, domain = self.address.rpartition("@")
        return domain.lower() if at else ""


@dataclass(frozen=True, slots=True)
class Envelope:
    """Everything the relay knows about a message apart from its content.

    ``sender`` is the reverse-path without angle brackets ("" is the null sender used by
    bounces). ``mail_params`` holds the MAIL FROM ESMTP parameters as received (SIZE,
    BODY, SMTPUTF8, RET, ENVID). ``arrival_time`` is epoch seconds from the reactor clock.
    ``prepend_headers`` are raw header lines (CRLF-terminated) that hooks added after the
    body was written; delivery sends them before the stored content. ``drop_headers`` are
    ``(lower-case name, value or None)`` rules of header fields that hooks dropped: delivery
    omits the stored fields they match (delivery/headers.py). Entries written before the
    field existed load with none.
    """

    queue_id: str
    sender: str
    recipients: tuple[Recipient, ...]
    arrival_time: float
    mail_params: dict[str, str | None] = field(default_factory=dict)
    client_address: str = ""
    client_port: int = 0
    client_helo: str = ""
    authenticated_as: str | None = None
    listener: str = "smtp"
    tls: str | None = None
    smtputf8: bool = False
    body_8bit: bool = False
    prepend_headers: tuple[str, ...] = ()
    drop_headers: tuple[tuple[str, str | None], ...] = ()

    @property
    def is_bounce(self) -> bool:
        """A message with the null sender: it must never cause a DSN (RFC 5321 §4.5.5)."""
        return self.sender == ""

    def to_json(self) -> bytes:
        """Encode as one line of UTF-8 JSON (no raw newlines)."""
        # Built by hand: dataclasses.asdict deep-copies and costs ~0.1 ms per message.
        data: dict[str, Any] = {f: getattr(self, f) for f in _ENVELOPE_FIELDS}  # JSON values
        data["recipients"] = [{"address": r.address, "params": r.params} for r in self.recipients]
        data["version"] = ENVELOPE_FORMAT_VERSION
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> Envelope:
        """Decode what to_json() wrote.

        :raises ValueError: the bytes are not an envelope this version can read.
        """
        data = json.loads(raw)
        if not isinstance(data, dict) or data.pop("version", None) != ENVELOPE_FORMAT_VERSION:
            raise ValueError("not a twistedrelay envelope (version 1)")
        data["recipients"] = tuple(Recipient(**r) for r in data["recipients"])
        data["prepend_headers"] = tuple(data.get("prepend_headers", ()))
        data["drop_headers"] = tuple((name, value) for name, value in data.get("drop_headers", ()))
        return cls(**data)


STATUS_FORMAT_VERSION = 1

#: Per-recipient outcomes, named as the metric labels and the outcome hooks (STYLE.md).
DELIVERED = "delivered"
DEFERRED = "deferred"
BOUNCED = "bounced"
_OUTCOMES = (DELIVERED, DEFERRED, BOUNCED)


@dataclass(frozen=True, slots=True)
class RecipientStatus:
    """What delivery has learnt about one recipient so far.

    ``outcome`` is delivered, deferred or bounced; delivered and bounced are final (the
    recipient is never tried again). ``reply`` is the last reply or local diagnostic as an
    operator would read it (e.g. "451 4.4.1 connection refused"). ``attempts`` counts the
    attempts that included this recipient.
    """

    address: str
    outcome: str
    reply: str = ""
    attempts: int = 0

    @property
    def is_final(self) -> bool:
        """Delivered or bounced: nothing left to do for this recipient."""
        return self.outcome in (DELIVERED, BOUNCED)


@dataclass(frozen=True, slots=True)
class EntryStatus:
    """The mutable part of a queue entry, kept in a sidecar file next to the entry.

    The envelope never changes after the message is queued; this does. An entry with no
    sidecar has the empty status (no attempt yet, every recipient pending).
    """

    attempts: int = 0
    last_attempt_at: float | None = None
    recipients: tuple[RecipientStatus, ...] = ()

    def for_recipient(self, address: str) -> RecipientStatus | None:
        """The status of one recipient, or None when it was never attempted."""
        for status in self.recipients:
            if status.address == address:
                return status
        return None

    def is_final(self, address: str) -> bool:
        """Whether the recipient was delivered or bounced already."""
        status = self.for_recipient(address)
        return status is not None and status.is_final

    def pending(self, envelope: Envelope) -> tuple[Recipient, ...]:
        """The envelope's recipients that still need delivering, in envelope order."""
        return tuple(r for r in envelope.recipients if not self.is_final(r.address))

    def with_attempt(self, attempted_at: float) -> EntryStatus:
        """A copy that counts one more attempt of the entry, made at ``attempted_at``."""
        return EntryStatus(self.attempts + 1, attempted_at, self.recipients)

    def with_outcome(self, address: str, outcome: str, reply: str) -> EntryStatus:
        """A copy recording one recipient's outcome (its attempt count grows by one).

        :raises ValueError: ``outcome`` is not delivered, deferred or bounced.
        """
        if outcome not in _OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        previous = self.for_recipient(address)
        attempts = previous.attempts + 1 if previous is not None else 1
        updated = RecipientStatus(address, outcome, reply, attempts)
        others = tuple(s for s in self.recipients if s.address != address)
        return EntryStatus(self.attempts, self.last_attempt_at, (*others, updated))

    def to_json(self) -> bytes:
        """Encode as one line of UTF-8 JSON."""
        data: dict[str, Any] = asdict(self)  # Any: JSON values of several types
        data["version"] = STATUS_FORMAT_VERSION
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> EntryStatus:
        """Decode what to_json() wrote.

        :raises ValueError: the bytes are not a status this version can read.
        """
        data = json.loads(raw)
        if not isinstance(data, dict) or data.pop("version", None) != STATUS_FORMAT_VERSION:
            raise ValueError("not a twistedrelay entry status (version 1)")
        recipients = tuple(RecipientStatus(**r) for r in data.pop("recipients", ()))
        return cls(recipients=recipients, **data)


_ENVELOPE_FIELDS = tuple(f.name for f in fields(Envelope))
