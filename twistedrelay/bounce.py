"""Bounces: the RFC 3464 delivery status notification sent back to a message's sender.

Owns the bytes of a DSN. Pure: the caller passes the envelope, the failed recipients, the
original headers, the reporting host name and the clock, and queues the result like any
message, with the null sender and ``envelope.sender`` as the only recipient. Deliberately
not here: deciding that a recipient failed (delivery/outcome.py) and queueing.

Invariant: never a DSN for a message with the null sender (RFC 5321 §4.5.5; RFC 3464 §2):
:func:`should_bounce` says so and :func:`build_dsn` refuses.

API::

    if should_bounce(envelope):
        failed = [FailedRecipient.from_outcome(recipient, outcome, remote_mta="mx.example")]
        dsn = build_dsn(envelope, failed, extract_headers(content), "relay.example", now)

The DSN is multipart/report; report-type=delivery-status (RFC 6522): a text/plain
explanation, a message/delivery-status part (RFC 3464 §2.2-2.3: Reporting-MTA,
X-Queue-ID, Original-Envelope-Id, Arrival-Date; per recipient Final-Recipient,
Original-Recipient, Action: failed, Status, Remote-MTA, Diagnostic-Code, Last-Attempt-Date)
and the original headers (text/rfc822-headers). An SMTPUTF8 message gets the RFC 6533
types (message/global-delivery-status, message/global-headers, utf-8 address type).
Lines end in CRLF.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

from twistedrelay.delivery.outcome import Outcome
from twistedrelay.queue.entry import Envelope, Recipient
from twistedrelay.smtp.replies import Reply

SUBJECT = "Undelivered Mail Returned to Sender"
MAX_FIELD_TEXT = 900
"""Longest diagnostic text kept in a header field (RFC 5322 §2.1.1: lines ≤ 998)."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_XTEXT_HEX = re.compile(r"\+([0-9A-Fa-f]{2})")


@dataclass(frozen=True, slots=True)
class FailedRecipient:
    """One recipient the DSN reports on.

    ``status`` is the RFC 3463 code, ``diagnostic`` one line of explanation. ``reply`` is
    the mail host's reply when one decided the failure (it becomes ``Diagnostic-Code:
    smtp; ...``). ``remote_mta`` is the host name of the mail host that answered.
    """

    recipient: Recipient
    status: str
    diagnostic: str
    reply: Reply | None = None
    remote_mta: str | None = None

    @classmethod
    def from_outcome(
        cls, recipient: Recipient, outcome: Outcome, remote_mta: str | None = None
    ) -> FailedRecipient:
        """The report line for a recipient whose outcome is bounced."""
        return cls(recipient, outcome.status, outcome.diagnostic, outcome.reply, remote_mta)


def should_bounce(envelope: Envelope) -> bool:
    """Whether a failure of this message may be reported: never for the null sender."""
    return not envelope.is_bounce


def extract_headers(content: bytes) -> bytes:
    """The header section of a message: everything before the first empty line."""
    for separator in (b"\r\n\r\n", b"\n\n"):
        end = content.find(separator)
        if end >= 0:
            return content[: end + len(separator) // 2]
    return content


def build_dsn(
    envelope: Envelope,
    failed: Sequence[FailedRecipient],
    original_headers: bytes,
    reporting_mta: str,
    now: float,
) -> bytes:
    """Build the DSN for ``failed`` recipients of the message ``envelope`` describes.

    :param original_headers: the message's header section (see :func:`extract_headers`).
    :param reporting_mta: this relay's host name (From: MAILER-DAEMON@ it, Reporting-MTA).
    :param now: epoch seconds: Date, Last-Attempt-Date, and the Message-ID.
    :returns: the whole message, CRLF line endings.
    :raises ValueError: the envelope has the null sender, or ``failed`` is empty.
    """
    if not should_bounce(envelope):
        raise ValueError("never bounce a message with the null sender (RFC 5321 §4.5.5)")
    if not failed:
        raise ValueError("a DSN needs at least one failed recipient")
    utf8 = envelope.smtputf8 or not _is_ascii(envelope, failed)
    address_type = "utf-8" if utf8 else "rfc822"
    eight_bit = utf8 or not original_headers.isascii()
    digest = hashlib.sha256(
        f"{envelope.queue_id}|{now}|{[f.recipient.address for f in failed]}".encode()
    ).hexdigest()[:20]
    boundary = f"{envelope.queue_id}.{digest}/{reporting_mta}"
    date = _date(now)

    headers = [
        f"From: MAILER-DAEMON@{reporting_mta} (Mail Delivery System)",
        f"To: <{_clean(envelope.sender)}>",
        f"Subject: {SUBJECT}",
        f"Date: {date}",
        f"Message-ID: <{int(now)}.{envelope.queue_id}.{digest}@{reporting_mta}>",
        # RFC 3834 §5: automatic responses say so, so that nobody auto-replies to them.
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
        f"Content-Transfer-Encoding: {'8bit' if eight_bit else '7bit'}",
    ]
    text_charset = "utf-8" if utf8 else "us-ascii"
    parts = [
        "\r\n".join(headers),
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        f"Content-Type: text/plain; charset={text_charset}",
        "",
        _explanation(reporting_mta, failed),
        f"--{boundary}",
        "Content-Description: Delivery report",
        f"Content-Type: message/{'global-' if utf8 else ''}delivery-status",
        "",
        _delivery_status(envelope, failed, reporting_mta, address_type, date),
        f"--{boundary}",
        "Content-Description: Undelivered Message Headers",
        f"Content-Type: {'message/global-headers' if utf8 else 'text/rfc822-headers'}",
        "",
    ]
    head = ("\r\n".join(parts) + "\r\n").encode("utf-8")
    tail = f"\r\n--{boundary}--\r\n".encode("ascii", "replace")
    return head + _crlf(original_headers).rstrip(b"\r\n") + b"\r\n" + tail


def _explanation(reporting_mta: str, failed: Sequence[FailedRecipient]) -> str:
    lines = [
        f"This is the mail system at host {reporting_mta}.",
        "",
        "I'm sorry to have to inform you that your message could not",
        "be delivered to one or more recipients. It's attached below.",
        "",
        "For further assistance, please send mail to postmaster.",
        "",
        "If you do so, please include this problem report. You can",
        "delete your own text from the attached returned message.",
        "",
    ]
    for item in failed:
        host = f" host {_clean(item.remote_mta)} said:" if item.remote_mta else ""
        lines.append(f"<{_clean(item.recipient.address)}>:{host} {_clean(item.diagnostic)}")
    return "\r\n".join(lines) + "\r\n"


def _delivery_status(
    envelope: Envelope,
    failed: Sequence[FailedRecipient],
    reporting_mta: str,
    address_type: str,
    date: str,
) -> str:
    # RFC 3464 §2.2: the per-message fields, then one block per recipient (§2.3),
    # blocks separated by an empty line.
    blocks = []
    message_fields = [f"Reporting-MTA: dns; {reporting_mta}", f"X-Queue-ID: {envelope.queue_id}"]
    envid = _param(envelope.mail_params, "ENVID")
    if envid:
        message_fields.append(f"Original-Envelope-Id: {_clean(_xtext_decode(envid))}")
    message_fields.append(f"Arrival-Date: {_date(envelope.arrival_time)}")
    blocks.append("\r\n".join(message_fields))
    for item in failed:
        fields = [f"Final-Recipient: {address_type}; {_clean(item.recipient.address)}"]
        orcpt = _param(item.recipient.params, "ORCPT")
        if orcpt and ";" in orcpt:
            kind, _, original = orcpt.partition(";")
            fields.append(f"Original-Recipient: {_clean(kind)}; {_clean(_xtext_decode(original))}")
        fields += ["Action: failed", f"Status: {item.status}"]
        if item.remote_mta:
            fields.append(f"Remote-MTA: dns; {_clean(item.remote_mta)}")
        if item.reply is not None:
            fields.append(f"Diagnostic-Code: smtp; {_clean(str(item.reply))}")
        else:
            fields.append(f"Diagnostic-Code: X-twistedrelay; {_clean(item.diagnostic)}")
        fields.append(f"Last-Attempt-Date: {date}")
        blocks.append("\r\n".join(fields))
    return "\r\n\r\n".join(blocks) + "\r\n"


def _param(params: dict[str, str | None], name: str) -> str | None:
    for key, value in params.items():
        if key.upper() == name:
            return value
    return None


def _xtext_decode(text: str) -> str:
    """RFC 3461 §4: "+XX" is the byte with hex value XX."""
    return _XTEXT_HEX.sub(lambda m: chr(int(m.group(1), 16)), text)


def _clean(text: str) -> str:
    """One header-safe line: control characters (CR, LF…) become spaces; length bounded."""
    return _CONTROL.sub(" ", text).strip()[:MAX_FIELD_TEXT]


def _crlf(data: bytes) -> bytes:
    return re.sub(rb"\r?\n|\r", b"\r\n", data)


def _date(epoch_seconds: float) -> str:
    return format_datetime(datetime.fromtimestamp(epoch_seconds, UTC))


def _is_ascii(envelope: Envelope, failed: Sequence[FailedRecipient]) -> bool:
    texts = [envelope.sender]
    for item in failed:
        texts += [item.recipient.address, item.diagnostic, str(item.reply), item.remote_mta or ""]
    return all(text.isascii() for text in texts)
