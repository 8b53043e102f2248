"""Header drops at delivery: only matching fields of the header section are omitted."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from twistedrelay.delivery.headers import (
    HeaderFilter,
    build_drop_rules,
    drop_header_fields,
    field_value,
)
from twistedrelay.smtp.server import parse_header_section

MESSAGE = (
    b"Received: from client ([127.0.0.1])\r\n\tby relay.example.test; Mon, 1 Jan 2024\r\n"
    b"X-Originating-IP: 192.0.2.7\r\n"
    b"Subject: hello\r\n"
    b"x-originating-ip:   198.51.100.9\r\n"
    b"X-Trace: one\r\n  two\r\n\tthree\r\n"
    b"From: a@example.org\r\n"
    b"\r\n"
    b"X-Originating-IP: in the body, kept\r\n"
    b"Subject: body line\r\n"
)


def test_a_name_rule_drops_every_field_of_that_name_case_insensitively():
    """("x-originating-ip", None) removes both fields, whatever their case; the body is kept."""
    out = drop_header_fields(MESSAGE, [("X-ORIGINATING-IP", None)])
    assert out == MESSAGE.replace(b"X-Originating-IP: 192.0.2.7\r\n", b"", 1).replace(
        b"x-originating-ip:   198.51.100.9\r\n", b""
    )
    assert b"X-Originating-IP: in the body, kept\r\n" in out


def test_a_value_rule_drops_only_the_field_with_that_collapsed_value():
    """A value is compared unfolded and whitespace-collapsed; other values stay."""
    out = drop_header_fields(MESSAGE, [("x-originating-ip", "198.51.100.9")])
    assert b"x-originating-ip" not in out
    assert b"X-Originating-IP: 192.0.2.7\r\n" in out


def test_a_folded_field_is_dropped_with_its_continuation_lines():
    """RFC 5322 §2.2.3: the continuation lines belong to the field and go with it."""
    out = drop_header_fields(MESSAGE, [("x-trace", "one two three")])
    assert b"X-Trace" not in out
    assert b"two" not in out and b"three" not in out
    assert b"198.51.100.9\r\nFrom: a@example.org\r\n\r\n" in out


def test_no_rules_and_no_match_leave_the_message_unchanged():
    """Without a matching rule the bytes are passed through exactly."""
    assert drop_header_fields(MESSAGE, []) == MESSAGE
    assert drop_header_fields(MESSAGE, [("x-absent", None), ("subject", "other")]) == MESSAGE


def test_body_lines_that_look_like_headers_are_never_dropped():
    """Only the header section changes: a "Subject:" line after the empty line stays."""
    out = drop_header_fields(MESSAGE, [("subject", None)])
    assert b"Subject: hello" not in out
    assert out.endswith(b"\r\nSubject: body line\r\n")


def test_a_line_that_is_no_field_ends_the_header_section():
    """Like a lenient parser: after a non-field line everything is body and kept."""
    message = b"Subject: a\r\nnot a header line\r\nSubject: b\r\n"
    assert drop_header_fields(message, [("subject", None)]) == (
        b"not a header line\r\nSubject: b\r\n"
    )


def test_a_message_without_an_empty_line_is_all_header_section():
    """The last field is matched at the end of the content too."""
    message = b"Subject: a\r\nX-Drop: yes\r\n"
    assert drop_header_fields(message, [("x-drop", None)]) == b"Subject: a\r\n"
    assert drop_header_fields(b"X-Drop: yes", [("x-drop", "yes")]) == b""


def test_values_match_what_the_data_hook_saw():
    """Rules built from DataContext.headers values (non-ASCII included) match the stored field."""
    message = b"X-Name:  J\xc3\xbcrgen\r\n  M\xfcller\r\nSubject: s\r\n\r\nbody\r\n"
    rules = build_drop_rules(parse_header_section(message)[:1])
    assert rules == (("x-name", "J\ufffd\ufffdrgen M\ufffdller"),)
    assert drop_header_fields(message, rules) == b"Subject: s\r\n\r\nbody\r\n"
    assert field_value(b" a \r\n\t b ") == "a b"
    # A value with surrogate escapes (bytes decoded with surrogateescape) compares the same.
    escaped = b"J\xc3\xbcrgen".decode("ascii", "surrogateescape")
    assert build_drop_rules([("X-Name", escaped)]) == (("x-name", "J\ufffd\ufffdrgen"),)


@given(
    cuts=st.lists(st.integers(min_value=0, max_value=len(MESSAGE)), max_size=8),
    rules=st.lists(
        st.tuples(
            st.sampled_from(["x-originating-ip", "x-trace", "subject", "from", "received"]),
            st.none() | st.sampled_from(["192.0.2.7", "one two three", "hello"]),
        ),
        max_size=3,
    ),
)
def test_the_output_does_not_depend_on_how_the_content_is_chunked(cuts, rules):
    """Feeding the message in any chunks gives the same bytes as feeding it whole."""
    expected = drop_header_fields(MESSAGE, rules)
    header_filter = HeaderFilter(rules)
    bounds = [0, *sorted(cuts), len(MESSAGE)]
    out = b"".join(
        header_filter.feed(MESSAGE[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)
    )
    assert out + header_filter.finish() == expected


def test_one_byte_at_a_time_holds_back_at_most_one_field():
    """Down to one byte at a time; kept fields are released once the next line starts."""
    header_filter = HeaderFilter([("x-trace", None)])
    sent = b""
    for i in range(len(MESSAGE)):
        sent += header_filter.feed(MESSAGE[i : i + 1])
        if MESSAGE[: i + 1].endswith(b"Subject: hello\r\nx"):
            assert sent.endswith(b"Subject: hello\r\n")
    assert sent + header_filter.finish() == drop_header_fields(MESSAGE, [("x-trace", None)])
