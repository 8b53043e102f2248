"""Envelope.drop_headers: stored with the envelope, and optional for older entries."""

from __future__ import annotations

import json

from twistedrelay.queue.entry import Envelope, Recipient

ENVELOPE = Envelope(
    queue_id="0123456789ABCDEF0123",
    sender="alice@example.org",
    recipients=(Recipient("bob@example.net"),),
    arrival_time=1700000000.0,
    drop_headers=(("x-originating-ip", "192.0.2.7"), ("x-mailer", None)),
)


def test_drop_headers_survive_the_json_round_trip():
    """The (name, value or None) pairs come back as the same tuple of tuples."""
    assert Envelope.from_json(ENVELOPE.to_json()) == ENVELOPE


def test_an_entry_written_without_drop_headers_still_loads():
    """An envelope from before the field existed loads with no drop rules."""
    data = json.loads(ENVELOPE.to_json())
    del data["drop_headers"]
    loaded = Envelope.from_json(json.dumps(data).encode())
    assert loaded.drop_headers == ()
    assert loaded.sender == ENVELOPE.sender
