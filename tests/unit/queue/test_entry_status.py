"""EntryStatus: per-recipient outcomes and their JSON encoding."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twistedrelay.queue.entry import (
    BOUNCED,
    DEFERRED,
    DELIVERED,
    EntryStatus,
    Envelope,
    Recipient,
)


def _envelope() -> Envelope:
    recipients = tuple(Recipient(f"user{i}@example.net") for i in range(3))
    return Envelope("0" * 20, "sender@example.org", recipients, 1.0)


def test_empty_status_leaves_every_recipient_pending():
    """No sidecar yet means nothing was delivered."""
    envelope = _envelope()
    assert EntryStatus().pending(envelope) == envelope.recipients


def test_delivered_and_bounced_recipients_are_not_pending():
    """Final outcomes drop out of pending(); deferred ones stay, in envelope order."""
    envelope = _envelope()
    status = (
        EntryStatus()
        .with_outcome("user0@example.net", DELIVERED, "250 2.0.0 Ok")
        .with_outcome("user1@example.net", BOUNCED, "550 5.1.1 unknown")
        .with_outcome("user2@example.net", DEFERRED, "451 4.4.1 timeout")
    )
    assert status.pending(envelope) == (envelope.recipients[2],)
    assert status.is_final("user0@example.net")
    assert not status.is_final("user2@example.net")


def test_outcomes_count_attempts_per_recipient_and_keep_the_last_reply():
    """A recipient deferred twice then delivered has three attempts and the 250 reply."""
    status = EntryStatus()
    for outcome, reply in [(DEFERRED, "451 a"), (DEFERRED, "451 b"), (DELIVERED, "250 c")]:
        status = status.with_outcome("a@example.net", outcome, reply)
    recipient = status.for_recipient("a@example.net")
    assert recipient is not None
    assert (recipient.outcome, recipient.reply, recipient.attempts) == (DELIVERED, "250 c", 3)
    assert len(status.recipients) == 1


def test_with_attempt_counts_entry_attempts():
    """Each delivery run of the entry is counted with its time."""
    status = EntryStatus().with_attempt(10.0).with_attempt(20.0)
    assert (status.attempts, status.last_attempt_at) == (2, 20.0)


def test_unknown_outcome_is_refused():
    """Only the three outcome words of the metrics contract exist."""
    with pytest.raises(ValueError):
        EntryStatus().with_outcome("a@example.net", "lost", "")


def test_from_json_refuses_other_versions():
    """A sidecar from an unknown format version is not misread."""
    with pytest.raises(ValueError):
        EntryStatus.from_json(b'{"version": 99, "attempts": 0}')


@given(
    st.integers(min_value=0, max_value=1000),
    st.none() | st.floats(allow_nan=False, allow_infinity=False),
    st.lists(
        st.tuples(
            st.text(min_size=1, max_size=40),
            st.sampled_from([DELIVERED, DEFERRED, BOUNCED]),
            st.text(max_size=80),
        ),
        max_size=5,
    ),
)
def test_status_json_round_trips(attempts, last_attempt_at, outcomes):
    """to_json() then from_json() gives back the same status, one line of UTF-8."""
    status = EntryStatus(attempts, last_attempt_at)
    for address, outcome, reply in outcomes:
        status = status.with_outcome(address, outcome, reply)
    raw = status.to_json()
    assert b"\n" not in raw
    assert EntryStatus.from_json(raw) == status
