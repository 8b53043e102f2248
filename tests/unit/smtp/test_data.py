"""Tests for twistedrelay.smtp.data.DataDecoder: end of data, unstuffing, limits, chunking."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from twistedrelay.smtp import replies
from twistedrelay.smtp.data import ChunkDecoder, DataDecoder
from twistedrelay.smtp.replies import Reply

BIG = 1 << 30


def decode(
    chunks: list[bytes],
    max_size: int = BIG,
    max_received: int = 50,
    max_header_size: int = BIG,
    max_line_length: int = 0,
) -> tuple[bytes, int | None, Reply | None, int, bytes]:
    """Feed chunks until the end; return body, end index, error, size and the rest."""
    decoder = DataDecoder(max_size, max_received, max_header_size, max_line_length)
    body = bytearray()
    for number, chunk in enumerate(chunks):
        decoded, end = decoder.feed(chunk)
        body += decoded
        if end is not None:
            rest = chunk[end:] + b"".join(chunks[number + 1 :])
            return bytes(body), end, decoder.error, decoder.size, rest
    return bytes(body), None, decoder.error, decoder.size, b""


def outcome(chunks: list[bytes], **limits: int) -> tuple[bytes, bool, Reply | None, int, bytes]:
    """Like decode, with "ended" instead of the chunk-relative end index.

    The body only counts when there is no error: chunks given before an error is found
    depend on the chunking and are discarded by the caller.
    """
    body, end, error, size, rest = decode(chunks, **limits)
    return (body if error is None else b""), end is not None, error, size, rest


def splits(data: bytes) -> list[list[bytes]]:
    """The input whole, one byte at a time, and split in two at every point."""
    result = [[data], [data[i : i + 1] for i in range(len(data))]]
    result += [[data[:i], data[i:]] for i in range(1, len(data))]
    return result


def test_simple_message_and_pipelined_rest() -> None:
    """The message ends at CRLF.CRLF; bytes after it are returned as the rest."""
    body, end, error, size, rest = decode([b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n"])
    assert body == b"Subject: x\r\n\r\nhello\r\n"
    assert error is None
    assert size == len(body)
    assert rest == b"QUIT\r\n"


def test_empty_message() -> None:
    """``.<CRLF>`` right after 354 is an empty message."""
    body, end, error, size, rest = decode([b".\r\nNOOP\r\n"])
    assert (body, end, error, size, rest) == (b"", 3, None, 0, b"NOOP\r\n")


def test_dot_unstuffing() -> None:
    """RFC 5321 §4.5.2: a leading dot is removed, on the first line too."""
    body, *_ = decode([b"..first\r\n\r\n..\r\n...\r\nmid.dle\r\n.\r\n"])
    assert body == b".first\r\n\r\n.\r\n..\r\nmid.dle\r\n"


def test_every_split_gives_the_same_result() -> None:
    """Terminator, CRLF and dot-stuffing split over chunks are found (chunk-size invariance)."""
    data = b"Received: a\r\nX: y\r\n\r\n..dot\r\nline\r\n.\r\nRSET\r\n"
    expected = outcome([data])
    assert expected[1:3] == (True, None)
    for chunks in splits(data):
        assert outcome(chunks) == expected


def test_data_without_end_never_ends() -> None:
    """Without CRLF.CRLF there is no end, however it is split."""
    data = b"a\r\n.\r" + b"b\r\n..\r\n"
    for chunks in splits(data):
        assert decode(chunks)[1] is None


def test_bare_lf_rejects_and_keeps_reading_to_the_end() -> None:
    """A bare LF makes the message rejected, but DATA still ends at the real CRLF.CRLF."""
    body, end, error, size, rest = decode([b"a\nb\r\n.\r\nNOOP\r\n"])
    assert error == replies.BARE_LINE_ENDING
    assert body == b""
    assert rest == b"NOOP\r\n"


def test_bare_cr_rejects() -> None:
    """A bare CR anywhere makes the message rejected, in every split."""
    data = b"header: v\r\n\r\nbody\rmore\r\n.\r\n"
    for chunks in splits(data):
        assert decode(chunks)[2] == replies.BARE_LINE_ENDING


def test_bare_lf_at_chunk_boundary_is_found() -> None:
    """A LF starting a chunk after a chunk not ending in CR is bare."""
    assert decode([b"abc", b"\ndef\r\n.\r\n"])[2] == replies.BARE_LINE_ENDING
    assert decode([b"abc\r", b"\ndef\r\n.\r\n"])[2] is None


def test_no_chunks_after_an_error() -> None:
    """After the error is known nothing more is returned, so nothing is held."""
    decoder = DataDecoder(BIG, 50, BIG)
    # The CRLF is held back: it may start the end-of-data indicator.
    assert decoder.feed(b"ok line\r\n") == (b"ok line", None)
    assert decoder.feed(b"bad\n") == (b"", None)
    assert decoder.feed(b"more\r\n") == (b"", None)
    assert decoder.feed(b".\r\n")[1] == 3


def test_size_limit() -> None:
    """More decoded bytes than max_size is MESSAGE_TOO_BIG; the limit itself is fine."""
    message = b"x" * 98 + b"\r\n"
    assert decode([message + b".\r\n"], max_size=100)[2] is None
    body, end, error, size, _ = decode([message, b"y\r\n", b".\r\n"], max_size=100)
    assert error == replies.MESSAGE_TOO_BIG
    assert message.startswith(body)
    assert size == 103


def test_size_counts_decoded_bytes() -> None:
    """Dot-stuffing dots are not counted toward the size."""
    assert decode([b"..\r\n.\r\n"], max_size=3)[2] is None


def test_received_headers_counted_in_header_section_only() -> None:
    """51 Received: headers is TOO_MANY_HOPS; 50 is fine; body lines do not count."""
    fifty = b"".join(b"Received: from hop%d\r\n" % i for i in range(50))
    ok = fifty + b"Subject: x\r\n\r\n" + b"Received: in body\r\n" * 10 + b".\r\n"
    too_many = fifty + b"RECEIVED: one more\r\n\r\nbody\r\n.\r\n"
    for chunks in splits(ok)[:2] + [[ok[:i], ok[i:]] for i in range(0, len(ok), 7)]:
        assert decode(chunks)[2] is None
    for chunks in splits(too_many)[:2] + [[too_many[:i], too_many[i:]] for i in range(1, 999, 7)]:
        assert decode(chunks)[2] == replies.TOO_MANY_HOPS


def test_received_only_at_line_start() -> None:
    """``X-Received:`` and folded text mentioning received: are not hops."""
    message = b"X-Received: a\r\nSubject: received: b\r\n\r\n.\r\n"
    decoder_result = decode([message], max_received=0)
    assert decoder_result[2] is None
    assert decode([b"Received: a\r\n\r\n.\r\n"], max_received=0)[2] == replies.TOO_MANY_HOPS


def test_received_in_the_obsolete_form_counts_too() -> None:
    """RFC 5322 §4.5.3 allows space before the colon: ``Received :`` is a hop as well."""
    for field in (b"Received : a", b"received\t: a", b"RECEIVED \t : a"):
        assert decode([field + b"\r\n\r\n.\r\n"], max_received=0)[2] == replies.TOO_MANY_HOPS
    assert decode([b" Received : folded\r\n\r\n.\r\n"], max_received=0)[2] is None


def test_header_section_size_limit() -> None:
    """A header section over max_header_size is HEADERS_TOO_BIG; a big body is not."""
    headers = b"X: " + b"a" * 200 + b"\r\n"
    assert decode([headers + b"\r\n" + b"b" * 5000 + b"\r\n.\r\n"], max_header_size=300)[2] is None
    message = headers * 2 + b"\r\n.\r\n"
    for chunks in ([message], [message[:100], message[100:]]):
        assert decode(chunks, max_header_size=300)[2] == replies.HEADERS_TOO_BIG
    # No empty line at all: the header section never ends, the limit still applies.
    endless = b"X: " + b"a" * 1000
    assert decode([endless, b"\r\n.\r\n"], max_header_size=300)[2] == replies.HEADERS_TOO_BIG


def test_message_without_body_is_fine() -> None:
    """A message of only headers (no empty line) is accepted."""
    assert decode([b"Subject: x\r\n.\r\n"]) == (b"Subject: x\r\n", 15, None, 12, b"")


def test_line_length_counts_the_crlf_and_not_a_stuffed_dot() -> None:
    """RFC 5321 §4.5.3.1.6: 1,000 octets with the CRLF, the transparency dot not counted."""
    longest = b"x" * 998 + b"\r\n"
    assert decode([b"Subject: a\r\n\r\n" + longest + b".\r\n"], max_line_length=1000)[2] is None
    assert decode([b"." + b"." + longest[1:] + b".\r\n"], max_line_length=1000)[2] is None
    too_long = [b"Subject: a\r\n\r\nx" + longest + b".\r\n"]
    assert decode(too_long, max_line_length=1000)[2] == replies.TEXT_LINE_TOO_LONG
    assert decode(too_long, max_line_length=0)[2] is None  # 0: no limit
    header = b"Subject: " + b"y" * 990 + b"\r\n\r\nbody\r\n"
    assert decode([header + b".\r\n"], max_line_length=1000)[2] == replies.TEXT_LINE_TOO_LONG
    assert chunk_outcome([b"a" * 999 + b"\r", b"\n"], max_line_length=1000)[1] == (
        replies.TEXT_LINE_TOO_LONG
    )
    assert chunk_outcome([b"a" * 998 + b"\r", b"\n"], max_line_length=1000)[1] is None


def test_a_long_line_cut_into_many_chunks_is_found() -> None:
    """The unfinished line's length carries from chunk to chunk."""
    chunks = [b"Subject: a\r\n\r\n"] + [b"z" * 100] * 10 + [b"\r\n.\r\n"]
    assert decode(chunks, max_line_length=1000)[2] == replies.TEXT_LINE_TOO_LONG
    assert decode(chunks, max_line_length=1003)[2] is None


def _longest_line_over(body: bytes, limit: int) -> bool:
    """The oracle: a line with its LF longer than ``limit``, or an unfinished one as long."""
    *lines, unfinished = body.split(b"\n")
    return any(len(line) + 1 > limit for line in lines) or len(unfinished) >= limit


@given(st.lists(st.sampled_from([b"\r\n", b"a", b"bcdefgh", b".."]), max_size=40), st.data())
def test_line_limit_agrees_with_the_oracle_however_chunked(
    pieces: list[bytes], data: st.DataObject
) -> None:
    """With DATA and BDAT, in any chunking, a line over the limit is found, and only then."""
    message = b"".join(pieces) + b"\r\n"
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    stuffed = (b"." if stuffed.startswith(b".") else b"") + stuffed + b".\r\n"
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stuffed)), max_size=6)))
    bounds = [0, *cuts, len(stuffed)]
    chunks = [stuffed[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    expected = replies.TEXT_LINE_TOO_LONG if _longest_line_over(message, 12) else None
    assert decode(chunks, max_line_length=12)[2] == expected
    assert (
        chunk_outcome(
            [message[a:b] for a, b in zip(bounds, bounds[1:], strict=False)], max_line_length=12
        )[1]
        == expected
    )


@st.composite
def message_and_chunks(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """Random content, and the same content cut at random points."""
    pieces = st.sampled_from([b"\r\n", b".", b"\r", b"\n", b"a", b"Received: x", b"\r\n.\r\n"])
    data = b"".join(draw(st.lists(pieces, max_size=40)))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    bounds = [0, *cuts, len(data)]
    return data, [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@given(message_and_chunks())
def test_chunking_never_changes_the_result(case: tuple[bytes, list[bytes]]) -> None:
    """Random content split at random points decodes exactly as when fed whole."""
    data, chunks = case
    assert outcome(chunks, max_received=2) == outcome([data], max_received=2)


@given(st.binary(max_size=300))
def test_random_bytes_only_end_at_crlf_dot_crlf(data: bytes) -> None:
    """Any input ends exactly after the first CRLF.CRLF (counting the virtual leading CRLF)."""
    end = decode([data])[1]
    first = (b"\r\n" + data).find(b"\r\n.\r\n")
    assert end == (None if first < 0 else first + 3)


# BDAT content (RFC 3030): ChunkDecoder


def chunk_outcome(chunks: list[bytes], **limits: int) -> tuple[bytes, Reply | None, int]:
    """Feed BDAT pieces and finish; return body (only without an error), error and size."""
    decoder = ChunkDecoder(
        limits.get("max_size", BIG),
        limits.get("max_received", 50),
        limits.get("max_header_size", BIG),
        limits.get("max_line_length", 0),
    )
    body = b"".join(decoder.feed(chunk) for chunk in chunks) + decoder.finish()
    return (body if decoder.error is None else b""), decoder.error, decoder.size


def test_chunk_content_is_the_message_as_is() -> None:
    """No dot-unstuffing and no end indicator: "." lines and CRLF.CRLF are content."""
    message = b"Subject: x\r\n\r\n.hello\r\n.\r\n..\r\n"
    assert chunk_outcome([message]) == (message, None, len(message))


def test_chunk_content_gets_the_checks_of_data() -> None:
    """Bare LF or CR, size, header size and the Received count refuse as with DATA."""
    assert chunk_outcome([b"a\nb\r\n"])[1] == replies.BARE_LINE_ENDING
    assert chunk_outcome([b"a\r", b"b\r\n"])[1] == replies.BARE_LINE_ENDING
    assert chunk_outcome([b"ab\r"])[1] == replies.BARE_LINE_ENDING  # a CR at the very end
    assert chunk_outcome([b"x" * 11], max_size=10)[1] == replies.MESSAGE_TOO_BIG
    assert chunk_outcome([b"Received: a\r\n" * 3 + b"\r\n"], max_received=2)[1] == (
        replies.TOO_MANY_HOPS
    )
    assert chunk_outcome([b"Subject: " + b"x" * 20 + b"\r\n\r\n"], max_header_size=10)[1] == (
        replies.HEADERS_TOO_BIG
    )


def test_a_crlf_split_between_chunks_is_not_bare() -> None:
    """A CR ending one BDAT chunk and the LF starting the next make one CRLF."""
    assert chunk_outcome([b"a\r", b"\nb\r", b"\n"]) == (b"a\r\nb\r\n", None, 6)


@given(message_and_chunks())
def test_chunk_splits_never_change_the_result(case: tuple[bytes, list[bytes]]) -> None:
    """BDAT content checked in random pieces gives what it gives whole."""
    data, chunks = case
    assert chunk_outcome(chunks, max_received=2) == chunk_outcome([data], max_received=2)


@given(message_and_chunks())
def test_bdat_and_data_agree_on_a_message(case: tuple[bytes, list[bytes]]) -> None:
    """The same message sent with BDAT (as is) or DATA (stuffed) is accepted or refused alike."""
    data, _ = case
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    stuffed = (b"." if data.startswith(b".") else b"") + data.replace(b"\r\n.", b"\r\n..")
    body, ended, data_error, _, rest = outcome([stuffed + b".\r\n"], max_received=2)
    assert ended and rest == b""
    assert chunk_outcome([data], max_received=2)[:2] == (body, data_error)
