"""Trace headers: the Received: line the relay prepends to every message it queues.

Pure. RFC 5321 §4.4 says what a Received header carries (who sent it, who received it,
with which protocol, the queue ID and the time); RFC 3848 names the protocol (ESMTP,
ESMTPS, ESMTPA, ESMTPSA) and RFC 6531 §4.3 its UTF8SMTP variants. Values that come from
the client are made printable so they cannot break the header.
"""

from __future__ import annotations

import email.utils

_date_cache: tuple[int, str] = (-1, "")


def protocol_name(extended: bool, tls: bool, authenticated: bool, smtputf8: bool) -> str:
    """The ``with`` clause: SMTP after HELO, else ESMTP/UTF8SMTP with S (TLS) and A (AUTH)."""
    if not extended:
        return "SMTP"
    base = "UTF8SMTP" if smtputf8 else "ESMTP"
    return base + ("S" if tls else "") + ("A" if authenticated else "")


def build_received_header(
    *,
    helo: str | None,
    client_address: str,
    hostname: str,
    protocol: str,
    queue_id: str,
    date_epoch: float,
    tls: str | None = None,
    recipient: str | None = None,
) -> bytes:
    """One folded Received header field, CRLF-terminated.

    :param helo: the client's HELO/EHLO name (None: "unknown").
    :param tls: the TLS description (version and cipher), None in clear text.
    :param recipient: named in a ``for`` clause; give it only when there is one recipient,
        so a message to many does not list them all to each.
    """
    tls_clause = f"\r\n\t(using {tls})" if tls else ""  # our OpenSSL's words, not the client's
    for_clause = f"\r\n\tfor <{printable(recipient)}>" if recipient else ""
    date = _format_date(date_epoch)
    header = (
        f"Received: from {printable(helo or 'unknown')} ([{client_address}]){tls_clause}\r\n"
        f"\tby {hostname} (twistedrelay) with {protocol} id {queue_id}{for_clause}; {date}\r\n"
    )
    return header.encode("utf-8", "replace")


def _format_date(epoch: float) -> str:
    """RFC 5322 date in local time; formatted once per second (it showed in profiles)."""
    global _date_cache
    second = int(epoch)
    if _date_cache[0] != second:
        _date_cache = (second, email.utils.formatdate(second, localtime=True))
    return _date_cache[1]


def printable(text: str) -> str:
    """``text`` with control characters and comment delimiters replaced, at most 255 chars."""
    return "".join(c if c.isprintable() and c not in "()\\" else "?" for c in text)[:255]
