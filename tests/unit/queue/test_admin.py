"""The pure parts of ``twistedrelay queue``: qshape age buckets, the table, list lines."""

from __future__ import annotations

import pytest

from twistedrelay.queue.admin import (
    AGE_BUCKETS_MINUTES,
    ListedEntry,
    age_bucket,
    build_shape,
    format_entry,
    format_shape,
    show_queue,
)
from twistedrelay.queue.entry import Envelope, Recipient

QUEUE_ID = "0006123456789ABCDEF0"
NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("age_minutes", "column"),
    [(0, 0), (4.99, 0), (5, 1), (9.9, 1), (10, 2), (639, 7), (640, 8), (1279, 8), (1280, 9)],
)
def test_age_bucket_follows_qshape_columns(age_minutes: float, column: int) -> None:
    """An age falls in the first column whose bound it is below; 1280 min and more is last."""
    assert age_bucket(age_minutes * 60) == column


def test_build_shape_counts_recipients_by_domain_and_age() -> None:
    """Every (domain, age) pair adds one to its domain's row and to TOTAL in its column."""
    shape = build_shape([("a.test", 0), ("a.test", 700), ("b.test", 100_000), ("a.test", 30)])
    columns = len(AGE_BUCKETS_MINUTES) + 1
    assert shape.total == (2, 0, 1, 0, 0, 0, 0, 0, 0, 1)
    assert shape.domains["a.test"] == (2, 0, 1, 0, 0, 0, 0, 0, 0, 0)
    assert shape.domains["b.test"] == (0,) * (columns - 1) + (1,)


def test_format_shape_prints_header_total_and_busiest_domains_first() -> None:
    """The table is qshape's: a T column first, TOTAL, then domains by count, cut at top."""
    shape = build_shape([("few.test", 0), ("many.test", 0), ("many.test", 400 * 60), ("x.test", 0)])
    lines = format_shape(shape, top=2)
    assert lines[0].split() == [
        "T",
        "5",
        "10",
        "20",
        "40",
        "80",
        "160",
        "320",
        "640",
        "1280",
        "1280+",
    ]
    assert lines[1].split() == ["TOTAL", "4", "3", "0", "0", "0", "0", "0", "0", "1", "0", "0"]
    assert lines[2].split() == ["many.test", "2", "1", "0", "0", "0", "0", "0", "0", "1", "0", "0"]
    assert lines[3].split()[0] == "few.test"  # a tie is broken by name; x.test is cut
    assert len(lines) == 4
    assert len({len(line) for line in lines}) == 1  # columns line up


def _entry(state: str, recipients: tuple[str, ...], age_seconds: float) -> ListedEntry:
    envelope = Envelope(
        queue_id=QUEUE_ID,
        sender="s@example.org",
        recipients=tuple(Recipient(r) for r in recipients),
        arrival_time=NOW - age_seconds,
    )
    domains = tuple(r.domain for r in envelope.recipients)
    next_attempt = NOW + 60 if state == "deferred" else None
    return ListedEntry(QUEUE_ID, state, "", envelope, 1234, next_attempt, domains)


def test_show_queue_counts_messages_per_state_and_shapes_each_state() -> None:
    """The report starts with message counts per state and has one table per state."""
    entries = [
        _entry("incoming", ("a@one.test", "b@two.test"), 0),
        _entry("deferred", ("c@one.test",), 3600),
        _entry("deferred", ("d@one.test",), 3600),
    ]
    lines = show_queue(entries, NOW)
    assert lines[0] == "messages: incoming=1 active=0 deferred=2 hold=0"
    deferred = lines.index("deferred (recipients by domain and age in minutes):")
    assert lines[deferred + 2].split() == ["TOTAL", "2", *["0"] * 4, "2", *["0"] * 5]
    assert lines[deferred + 3].split()[:2] == ["one.test", "2"]


def test_format_entry_names_id_state_arrival_size_sender_and_recipients() -> None:
    """A list line carries what an operator greps for; deferred ones add the next attempt."""
    line = format_entry(_entry("deferred", ("a@one.test", "b@two.test"), 0))
    assert line.split() == [
        QUEUE_ID,
        "deferred",
        "2023-11-14T22:13:20Z",
        "1234",
        "<s@example.org>",
        "a@one.test,b@two.test",
        "next_attempt=2023-11-14T22:14:20Z",
    ]
