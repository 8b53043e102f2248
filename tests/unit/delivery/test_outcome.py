"""delivery.outcome: the table from what happened to delivered/deferred/bounced."""

from __future__ import annotations

import pytest

from twistedrelay import resolver
from twistedrelay.delivery.outcome import (
    ConnectionFailure,
    Outcome,
    Result,
    apply_lifetime,
    classify_connection_failure,
    classify_dns_failure,
    classify_reply,
    is_expired,
    next_attempt_delay,
)
from twistedrelay.smtp import replies
from twistedrelay.smtp.replies import Reply


@pytest.mark.parametrize(
    ("reply", "result", "status"),
    [
        (Reply(250, "2.0.0", "Ok: queued as X"), Result.DELIVERED, "2.0.0"),
        (Reply(250, None, "Ok"), Result.DELIVERED, "2.0.0"),
        (Reply(251, "2.1.5", "will forward"), Result.DELIVERED, "2.1.5"),
        (Reply(450, "4.2.1", "Mailbox busy"), Result.DEFERRED, "4.2.1"),
        (Reply(421, None, "closing"), Result.DEFERRED, "4.0.0"),
        (Reply(550, "5.1.1", "No such user"), Result.BOUNCED, "5.1.1"),
        (Reply(554, None, "rejected"), Result.BOUNCED, "5.0.0"),
        (Reply(550, "4.1.1", "class disagrees"), Result.BOUNCED, "5.1.1"),
        (Reply(451, "5.7.1", "class disagrees"), Result.DEFERRED, "4.7.1"),
        (replies.CONNECTION_LOST, Result.DEFERRED, "4.4.2"),
        (replies.SMTPUTF8_NOT_OFFERED, Result.BOUNCED, "5.6.7"),
        (replies.MESSAGE_TOO_BIG_FOR_HOST, Result.BOUNCED, "5.3.4"),
        (replies.TLS_REQUIRED_NOT_OFFERED, Result.DEFERRED, "4.7.4"),
    ],
)
def test_reply_classification(reply, result, status):
    """2xx delivers, 4xx defers, 5xx bounces; the status follows the reply code's class."""
    outcome = classify_reply(reply)
    assert (outcome.result, outcome.status, outcome.reply) == (result, status, reply)


def test_multiline_reply_diagnostic_is_one_line():
    """Log lines and DSN fields never carry a raw newline from a host's reply."""
    outcome = classify_reply(Reply(550, "5.1.1", "No such\nuser here"))
    assert outcome.diagnostic == "550 5.1.1 No such user here"


@pytest.mark.parametrize(
    ("failure", "status"),
    [
        (ConnectionFailure.REFUSED, "4.4.1"),
        (ConnectionFailure.CONNECT_TIMEOUT, "4.4.1"),
        (ConnectionFailure.UNREACHABLE, "4.4.1"),
        (ConnectionFailure.LOST, "4.4.2"),
        (ConnectionFailure.TIMEOUT, "4.4.2"),
        (ConnectionFailure.TLS_FAILED, "4.7.5"),
    ],
)
def test_connection_failures_are_deferred(failure, status):
    """Refused, timed out, lost: always a deferral with RFC 3463 X.4.1/X.4.2."""
    outcome = classify_connection_failure(failure, "mx.example[192.0.2.1]:25")
    assert (outcome.result, outcome.status) == (Result.DEFERRED, status)
    assert outcome.diagnostic.endswith(": mx.example[192.0.2.1]:25")
    assert outcome.reply is None


@pytest.mark.parametrize(
    ("error", "result", "status"),
    [
        (resolver.NullMX("example.com"), Result.BOUNCED, "5.1.10"),
        (resolver.NoSuchDomain("example.com"), Result.BOUNCED, "5.1.2"),
        (resolver.NoMailHost("example.com"), Result.BOUNCED, "5.4.4"),
        (resolver.DNSTemporaryError("example.com", "SERVFAIL"), Result.DEFERRED, "4.4.3"),
    ],
)
def test_every_resolver_error_maps_to_an_outcome(error, result, status):
    """Null MX, NXDOMAIN, no address bounce; SERVFAIL and timeouts defer."""
    outcome = classify_dns_failure(error)
    assert (outcome.result, outcome.status) == (result, status)
    assert "example.com" in outcome.diagnostic


def test_resolver_error_kinds_are_all_known():
    """A new resolver error class cannot be added without a mapping here."""
    for cls in resolver.ResolverError.__subclasses__():
        classify_dns_failure(cls("x"))


def test_unknown_dns_failure_kind_is_refused():
    """An unknown kind is a programming error, not silently deferred."""
    error = resolver.ResolverError("x")
    with pytest.raises(ValueError):
        classify_dns_failure(error)


DEFERRED = Outcome(Result.DEFERRED, "4.2.1", "450 4.2.1 Mailbox busy", Reply(450, "4.2.1", "busy"))
LIFETIME = 432000.0


def test_deferral_past_lifetime_becomes_expired_bounce():
    """Older than maximal_queue_lifetime: bounced with 4.4.7 and the last error kept."""
    outcome = apply_lifetime(
        DEFERRED, arrival_time=1000.0, now=1000.0 + LIFETIME, maximal_queue_lifetime=LIFETIME
    )
    assert (outcome.result, outcome.status) == (Result.BOUNCED, "4.4.7")
    assert "expired after 5.0 days" in outcome.diagnostic
    assert outcome.diagnostic.endswith("450 4.2.1 Mailbox busy")
    assert outcome.reply == DEFERRED.reply


def test_deferral_within_lifetime_is_unchanged():
    """One second short of the lifetime the message is still deferred."""
    assert apply_lifetime(DEFERRED, 1000.0, 1000.0 + LIFETIME - 1, LIFETIME) is DEFERRED
    assert not is_expired(1000.0, 1000.0 + LIFETIME - 1, LIFETIME)
    assert is_expired(1000.0, 1000.0 + LIFETIME, LIFETIME)


@pytest.mark.parametrize("result", [Result.DELIVERED, Result.BOUNCED])
def test_lifetime_never_changes_a_final_outcome(result):
    """A delivery or a bounce stays what it is, however old the message."""
    outcome = Outcome(result, "2.0.0", "x")
    assert apply_lifetime(outcome, 0.0, 10 * LIFETIME, LIFETIME) is outcome


@pytest.mark.parametrize(
    ("age", "delay"),
    [(0, 300), (10, 300), (300, 300), (600, 600), (2000, 2000), (4000, 4000), (99999, 4000)],
)
def test_backoff_is_age_clamped_between_minimal_and_maximal(age, delay):
    """Postfix-style: the delay is the message's age, no less than minimal, no more than maximal."""
    assert next_attempt_delay(1000.0, 1000.0 + age, 300.0, 4000.0) == delay


def test_backoff_grows_exponentially_across_retries():
    """Retrying at each computed time doubles the delay until it reaches the maximum."""
    arrival, now, delays = 0.0, 0.0, []
    for _ in range(8):
        delay = next_attempt_delay(arrival, now, 300.0, 4000.0)
        delays.append(delay)
        now += delay
    assert delays == [300, 300, 600, 1200, 2400, 4000, 4000, 4000]


def test_backoff_jitter_is_added_as_given():
    """The caller's jitter is added, so tests stay deterministic and retries spread out."""
    assert next_attempt_delay(0.0, 0.0, 300.0, 4000.0, jitter=12.5) == 312.5
