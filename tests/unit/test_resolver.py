"""resolver's policy half: MX ordering, null MX, implicit MX, duplicates (no network)."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from twistedrelay.resolver import MailHost, build_mail_hosts, is_null_mx, order_mx


def test_mx_records_are_ordered_by_preference():
    """Lower preference first (RFC 5321 §5.1)."""
    records = [(30, "c.example"), (10, "a.example"), (20, "b.example")]
    assert order_mx(records, random.Random(1)) == [
        (10, "a.example"),
        (20, "b.example"),
        (30, "c.example"),
    ]


def test_equal_preferences_are_shuffled_by_the_injected_rng():
    """Equal-preference hosts come in an order the injected random source decides."""
    records = [(10, f"mx{i}.example") for i in range(6)] + [(5, "first.example")]
    orders = {tuple(order_mx(records, random.Random(seed))) for seed in range(20)}
    assert len(orders) > 1
    for order in orders:
        assert order[0] == (5, "first.example")
        assert sorted(order[1:]) == sorted(records[:6])
    assert order_mx(records, random.Random(7)) == order_mx(records, random.Random(7))


def test_duplicate_names_keep_their_most_preferred_entry():
    """A host listed twice is tried once, at its best preference."""
    records = [(20, "a.example"), (10, "a.example"), (15, "b.example")]
    assert order_mx(records, random.Random(0)) == [(10, "a.example"), (15, "b.example")]


def test_root_exchange_among_others_is_dropped():
    """A "." exchange next to real MX records is not a null MX and is not a host."""
    records = [(0, "."), (10, "mx.example")]
    assert not is_null_mx(records)
    assert order_mx(records, random.Random(0)) == [(10, "mx.example")]


def test_null_mx_is_a_single_root_record_with_preference_zero():
    """RFC 7505 §3: exactly one MX, preference 0, exchange ".", is a null MX."""
    assert is_null_mx([(0, ".")])
    assert not is_null_mx([(10, ".")])
    assert not is_null_mx([(0, "mx.example")])
    assert not is_null_mx([])


def test_mail_hosts_follow_mx_order_and_skip_repeated_addresses():
    """Names expand to their addresses in order; an address seen before is not tried twice."""
    exchanges = [(10, "a.example"), (10, "b.example"), (20, "c.example")]
    addresses = {
        "a.example": ["192.0.2.1", "2001:db8::1"],
        "b.example": ["192.0.2.1"],
        "c.example": ["192.0.2.3"],
    }
    assert build_mail_hosts(exchanges, addresses, 25) == [
        MailHost("a.example", "192.0.2.1", 25, 10),
        MailHost("a.example", "2001:db8::1", 25, 10),
        MailHost("c.example", "192.0.2.3", 25, 20),
    ]


def test_names_without_addresses_are_skipped():
    """An MX name with no address records yields no mail host."""
    assert build_mail_hosts([(10, "a.example")], {}, 25) == []


def test_mail_host_prints_as_name_address_port():
    """The log form names the host, its address and port, Postfix-style."""
    assert str(MailHost("mx.example", "192.0.2.1", 25, 10)) == "mx.example[192.0.2.1]:25"


@given(
    st.lists(
        st.tuples(st.integers(0, 65535), st.sampled_from(["a", "b", "c", "d", "."])), max_size=10
    ),
    st.integers(),
)
def test_order_mx_is_sorted_unique_and_complete(records, seed):
    """Whatever the records, the order is non-decreasing in preference, one entry per name."""
    ordered = order_mx(records, random.Random(seed))
    preferences = [p for p, _ in ordered]
    names = [n for _, n in ordered]
    assert preferences == sorted(preferences)
    assert len(names) == len(set(names)) and "." not in names
    assert set(names) == {n for _, n in records} - {"."}
    for preference, name in ordered:
        assert preference == min(p for p, n in records if n == name)
