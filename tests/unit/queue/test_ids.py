"""Queue IDs: format, ordering, arrival time and uniqueness within one process."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twistedrelay.queue.ids import (
    QUEUE_ID_LENGTH,
    QueueIdGenerator,
    arrival_time_of,
    is_queue_id,
)

NOW_NS = 1_760_000_000_123_456_000


def test_id_is_twenty_uppercase_hex_characters():
    """An ID is grep-friendly: fixed length, upper-case hex only."""
    queue_id = QueueIdGenerator(lambda: NOW_NS, lambda: 4242).new_id()
    assert len(queue_id) == QUEUE_ID_LENGTH == 20
    assert is_queue_id(queue_id)
    assert queue_id == f"{NOW_NS // 1000:013X}{4242:06X}0"


def test_arrival_time_of_returns_the_encoded_microseconds():
    """The master can compute an entry's age from its ID without stat()."""
    queue_id = QueueIdGenerator(lambda: NOW_NS, lambda: 1).new_id()
    assert arrival_time_of(queue_id) == pytest.approx(NOW_NS / 1e9, abs=1e-6)


def test_arrival_time_of_rejects_a_non_id():
    """A file name that is not an ID is refused, not misread."""
    with pytest.raises(ValueError):
        arrival_time_of("not-an-id")


def test_ids_in_the_same_microsecond_stay_unique_and_increasing():
    """A frozen clock still yields strictly increasing IDs (the counter, then borrowing)."""
    generator = QueueIdGenerator(lambda: NOW_NS, lambda: 7)
    ids = [generator.new_id() for _ in range(100)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 100


def test_a_clock_stepping_back_does_not_repeat_or_reorder_ids():
    """IDs keep increasing when the wall clock jumps backwards (e.g. an NTP step)."""
    times = iter([NOW_NS, NOW_NS - 10_000_000_000, NOW_NS - 5_000_000_000])
    generator = QueueIdGenerator(lambda: next(times), lambda: 7)
    ids = [generator.new_id() for _ in range(3)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 3


def test_a_forked_child_uses_its_own_pid():
    """After a fork (new PID) the PID field changes, so parent and child never collide."""
    pids = iter([100, 200])
    generator = QueueIdGenerator(lambda: NOW_NS, lambda: next(pids))
    first, second = generator.new_id(), generator.new_id()
    assert first[13:19] == f"{100:06X}"
    assert second[13:19] == f"{200:06X}"


def test_real_generator_makes_a_hundred_thousand_distinct_sorted_ids():
    """With the real clock and PID, IDs are unique and ordered by creation."""
    generator = QueueIdGenerator()
    ids = [generator.new_id() for _ in range(100_000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)


@given(st.text(max_size=30))
def test_is_queue_id_accepts_only_the_exact_format(text):
    """Anything other than 20 upper-case hex characters is not an ID (paths are safe)."""
    expected = len(text) == 20 and all(c in "0123456789ABCDEF" for c in text)
    assert is_queue_id(text) == expected
