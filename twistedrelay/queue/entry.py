"""Queue entries: the envelope stored with each message, and its on-disk encoding.

Owns the shape of what the relay remembers about a message besides its bytes. Pure: no
filesystem access here (that is queue/store.py). The encoding is versioned JSON so an
operator can read it and a later release can still load entries written by this one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
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
    body was written; delivery sends them before the stored content.
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

    @property
    def is_bounce(self) -> bool:
        """A message with the null sender: it must never cause a DSN (RFC 5321 §4.5.5)."""
        return self.sender == ""

    def to_json(self) -> bytes:
        """Encode as one line of UTF-8 JSON (no raw newlines)."""
        data: dict[str, Any] = asdict(self)
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
        return cls(**data)
