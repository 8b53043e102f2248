"""Delivery outcomes: what a reply, a connection failure or a DNS failure means for a recipient.

Owns the mapping from "what happened" to delivered, deferred or bounced, with the DSN
status code (RFC 3463) and the diagnostic text that logs and DSNs carry, plus the retry
clock: queue lifetime expiry and the backoff before the next attempt. Pure: values in,
values out. Deliberately not here: the queue operations that act on an outcome
(queue/store.py), DSN building (bounce.py).

API::

    classify_reply(reply)                         -> Outcome   2xx/4xx/5xx
    classify_connection_failure(failure, detail)  -> Outcome   always deferred (4.4.1/4.4.2/4.7.5)
    classify_dns_failure(error)                   -> Outcome   null MX/NXDOMAIN/no host: bounced
    apply_lifetime(outcome, arrival_time, now, maximal_queue_lifetime) -> Outcome
    next_attempt_delay(arrival_time, now, minimal_backoff, maximal_backoff, jitter) -> seconds

Invariant: an outcome is ``bounced`` only for a permanent failure (5xx reply, a DNS answer
that proves the domain cannot receive mail) or a message past ``maximal_queue_lifetime``;
everything else that did not deliver is ``deferred``.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Protocol

from twistedrelay.smtp.replies import Reply

_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")


class Result(enum.StrEnum):
    """The three outcomes; the values are the metric label and hook names of DESIGN."""

    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one recipient in one attempt.

    ``status`` is the RFC 3463 code for the DSN's Status field. ``diagnostic`` is one line
    for the mail log and the DSN. ``reply`` is the mail host's reply when there was one
    (the DSN then carries ``Diagnostic-Code: smtp; ...``).
    """

    result: Result
    status: str
    diagnostic: str
    reply: Reply | None = None


class ConnectionFailure(enum.Enum):
    """Why a connection to a mail host did not carry the transaction through.

    The Twisted adapter maps its exceptions onto these (ConnectionRefusedError → REFUSED,
    a connect timeout → CONNECT_TIMEOUT, ConnectionLost/ConnectionDone → LOST, a stage
    timeout → TIMEOUT, an SSL error → TLS_FAILED).
    """

    REFUSED = "refused"
    CONNECT_TIMEOUT = "connect timeout"
    UNREACHABLE = "unreachable"
    LOST = "lost"
    TIMEOUT = "timeout"
    TLS_FAILED = "tls failed"


# RFC 3463: X.4.1 "No answer from host", X.4.2 "Bad connection", X.7.5 "Cryptographic failure".
_CONNECTION_STATUS = {
    ConnectionFailure.REFUSED: ("4.4.1", "Connection refused"),
    ConnectionFailure.CONNECT_TIMEOUT: ("4.4.1", "Connection timed out"),
    ConnectionFailure.UNREACHABLE: ("4.4.1", "Network is unreachable"),
    ConnectionFailure.LOST: ("4.4.2", "Lost connection"),
    ConnectionFailure.TIMEOUT: ("4.4.2", "Conversation timed out"),
    ConnectionFailure.TLS_FAILED: ("4.7.5", "TLS handshake failed"),
}


class DNSFailure(Protocol):
    """What classify_dns_failure needs of a resolver.ResolverError.

    Structural, so that this pure module does not import the resolver's I/O half.
    """

    @property
    def kind(self) -> str:
        """null_mx, no_such_domain, no_mail_host or temporary."""

    @property
    def name(self) -> str:
        """The name that was looked up."""

    @property
    def detail(self) -> str:
        """More about the failure, for the diagnostic ("" when nothing)."""


# kind → (permanent?, status, text). RFC 7505 §4.3 null MX: 5.1.10; RFC 3463 X.1.2 bad
# destination system address, X.4.4 unable to route, X.4.3 directory server failure.
_DNS_STATUS = {
    "null_mx": (True, "5.1.10", "Domain does not accept mail (null MX)"),
    "no_such_domain": (True, "5.1.2", "Host or domain name not found"),
    "no_mail_host": (True, "5.4.4", "No address records for the mail host"),
    "temporary": (False, "4.4.3", "Temporary DNS failure"),
}


def classify_reply(reply: Reply) -> Outcome:
    """2xx → delivered, 4xx → deferred, 5xx → bounced, with the reply's enhanced code.

    A missing enhanced code becomes X.0.0; one whose class disagrees with the reply code
    takes the reply code's class (a "550 4.1.1" is permanent: the basic code rules).
    """
    if reply.code < 400:
        result, klass = Result.DELIVERED, "2"
    elif reply.code < 500:
        result, klass = Result.DEFERRED, "4"
    else:
        result, klass = Result.BOUNCED, "5"
    status = f"{klass}.0.0"
    if reply.enhanced and _ENHANCED.fullmatch(reply.enhanced):
        status = klass + reply.enhanced[1:]
    return Outcome(result, status, " ".join(str(reply).split("\n")), reply)


def classify_connection_failure(failure: ConnectionFailure, detail: str = "") -> Outcome:
    """A connection that failed before a reply decided the recipient: always deferred.

    :param detail: e.g. the mail host ("mx1.example.com[192.0.2.1]:25").
    """
    status, text = _CONNECTION_STATUS[failure]
    return Outcome(Result.DEFERRED, status, f"{text}: {detail}" if detail else text)


def classify_dns_failure(error: DNSFailure) -> Outcome:
    """A resolver error (resolver.NullMX, NoSuchDomain, NoMailHost, DNSTemporaryError).

    :raises ValueError: an unknown ``kind``.
    """
    try:
        permanent, status, text = _DNS_STATUS[error.kind]
    except KeyError:
        raise ValueError(f"unknown DNS failure kind {error.kind!r}") from None
    diagnostic = f"{text}: {error.name}" + (f" ({error.detail})" if error.detail else "")
    return Outcome(Result.BOUNCED if permanent else Result.DEFERRED, status, diagnostic)


def is_expired(arrival_time: float, now: float, maximal_queue_lifetime: float) -> bool:
    """Whether a message has been queued for ``maximal_queue_lifetime`` seconds or more."""
    return now - arrival_time >= maximal_queue_lifetime


def apply_lifetime(
    outcome: Outcome, arrival_time: float, now: float, maximal_queue_lifetime: float
) -> Outcome:
    """Turn a deferral of a message past its lifetime into a bounce.

    The status becomes 4.4.7 "delivery time expired" (RFC 3463; the DSN's Action is
    failed) and the diagnostic keeps the last error, as Postfix does.
    """
    if outcome.result is not Result.DEFERRED:
        return outcome
    if not is_expired(arrival_time, now, maximal_queue_lifetime):
        return outcome
    days = (now - arrival_time) / 86400
    diagnostic = f"Delivery time expired after {days:.1f} days in queue; last error: "
    return Outcome(Result.BOUNCED, "4.4.7", diagnostic + outcome.diagnostic, outcome.reply)


def next_attempt_delay(
    arrival_time: float,
    now: float,
    minimal_backoff: float,
    maximal_backoff: float,
    jitter: float = 0.0,
) -> float:
    """Seconds until the next attempt, Postfix-style exponential backoff.

    The delay is the message's age clamped to [minimal_backoff, maximal_backoff]: each
    retry roughly doubles the age, so the delays grow exponentially up to the maximum.

    :param jitter: seconds added by the caller (e.g. ``rng.uniform(0, minimal_backoff / 10)``)
        so that messages deferred together do not all come back at the same instant;
        passing it in keeps this function deterministic under test.
    """
    age = now - arrival_time
    return min(max(age, minimal_backoff), maximal_backoff) + jitter
