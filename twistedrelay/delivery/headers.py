"""Header drops: omitting header fields of a stored message while it is sent.

Owns the delivery half of the data hook's ``drop_header`` decision (docs/hooks.md). The
body is streamed to the queue file before the data hook runs, so a dropped field stays in
the stored file; the envelope carries ``drop_headers`` and delivery leaves the matching
fields out of the header section it sends. Pure: bytes in, bytes out, fed in chunks of any
size.

Invariant: only the header section changes. A field is a line that starts with a name and
a colon plus its folded continuation lines (RFC 5322 §2.2, §2.2.3); everything from the
empty line that ends the header section on (or from the first line that is not a header
field, where a lenient parser starts the body too) passes through untouched.

A rule ``(name, value)`` matches a field whose name equals ``name`` case-insensitively and,
when ``value`` is not None, whose value, unfolded and whitespace-collapsed as hooks see it
in ``DataContext.headers``, equals ``value``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TypeAlias

DropRule: TypeAlias = tuple[str, str | None]

# RFC 5322 §3.6.8: a field name is printable US-ASCII except the colon; obsolete syntax
# (§4.5) allows white space before the colon.
_NAME = re.compile(rb"[!-9;-~]*[ \t]*")
_WSP = b" \t"
_COLON = ord(":")
_SURROGATE_ESCAPE = re.compile("[\udc80-\udcff]")


def normalise_value(value: str) -> str:
    """A rule's value in the form the envelope stores and delivery compares.

    Hooks see ``DataContext.headers`` values with every non-ASCII byte shown as U+FFFD
    (the inbound parser reads headers as ASCII). A value carrying surrogate escapes instead
    (bytes decoded with ``surrogateescape``) gets the same treatment, which also keeps it
    storable as JSON.
    """
    return _SURROGATE_ESCAPE.sub("\ufffd", value)


def build_drop_rules(drops: Iterable[tuple[str, str | None]]) -> tuple[DropRule, ...]:
    """Normalise a decision's ``drop_headers`` for the envelope: lower-case names, clean values."""
    return tuple(
        (name.lower(), None if value is None else normalise_value(value)) for name, value in drops
    )


def field_value(raw_value: bytes) -> str:
    """The value part of a raw field (after the colon), unfolded and whitespace-collapsed.

    Decoded as the inbound parser shows it to hooks (ASCII, each other byte U+FFFD) and
    collapsed with ``str.split`` as ``parse_header_section`` does.
    """
    return " ".join(raw_value.decode("ascii", "replace").split())


class DropRules:
    """Drop rules by lower-case field name, to test fields against (HeaderFilter, hooks)."""

    def __init__(self, rules: Iterable[tuple[str, str | None]]) -> None:
        self._values: dict[str, set[str | None]] = {}
        for name, value in rules:
            self._values.setdefault(name.lower(), set()).add(value)

    def __bool__(self) -> bool:
        return bool(self._values)

    def drops(self, name: str, value: str) -> bool:
        """Whether a field ``name: value`` (value as hooks see it) is dropped."""
        values = self._values.get(name.lower())
        return values is not None and (None in values or value in values)


class HeaderFilter:
    """Streams a message and omits the header fields that match the drop rules.

    Feed the content in chunks of any size; each call returns the bytes to send so far.
    At most one field (the one whose continuation lines may still arrive) is held back.

    :param rules: ``(name, value or None)`` pairs; names are compared case-insensitively.
    """

    def __init__(self, rules: Iterable[tuple[str, str | None]]) -> None:
        self._rules = DropRules(rules)
        self._buffer = bytearray()
        self._search_from = 0
        self._in_header = bool(self._rules)

    def feed(self, chunk: bytes) -> bytes:
        """The bytes of ``chunk`` (and of earlier held-back data) that may be sent now."""
        if not self._in_header:
            if not self._buffer:
                return chunk
            self._buffer += chunk
            return self._take_all()
        self._buffer += chunk
        out = bytearray()
        while self._in_header:
            starts_field = _starts_field(self._buffer)
            if starts_field is None:
                break
            if not starts_field:
                # The empty line, or a line that is no header field: the body starts here.
                self._in_header = False
                break
            end = self._field_end()
            if end is None:
                break
            field = bytes(self._buffer[:end])
            del self._buffer[:end]
            self._search_from = 0
            if not self._is_dropped(field):
                out += field
        if not self._in_header:
            out += self._take_all()
        return bytes(out)

    def finish(self) -> bytes:
        """The held-back rest at the end of the content (the last field, if it is kept)."""
        rest = self._take_all()
        if self._in_header and _starts_field(rest) and self._is_dropped(rest):
            rest = b""
        self._in_header = False
        return rest

    def _take_all(self) -> bytes:
        data = bytes(self._buffer)
        self._buffer.clear()
        self._search_from = 0
        return data

    def _field_end(self) -> int | None:
        """The offset just past the current field's last CRLF, or None until it is known.

        A field ends at a CRLF followed by anything but WSP (RFC 5322 §2.2.3: a folded
        line starts with WSP), so the byte after the CRLF must have arrived.
        """
        buffer = self._buffer
        while True:
            crlf = buffer.find(b"\r\n", self._search_from)
            if crlf < 0 or crlf + 2 >= len(buffer):
                if crlf >= 0:
                    self._search_from = crlf
                else:
                    self._search_from = max(0, len(buffer) - 1)
                return None
            if buffer[crlf + 2] not in _WSP:
                return crlf + 2
            self._search_from = crlf + 2

    def _is_dropped(self, field: bytes) -> bool:
        name, _, value = field.partition(b":")
        return self._rules.drops(name.strip(_WSP).decode("ascii", "replace"), field_value(value))


def _starts_field(data: bytes | bytearray) -> bool | None:
    """Whether ``data`` starts with a field name and its colon; None: not known yet."""
    match = _NAME.match(data)
    assert match is not None  # the pattern matches the empty string
    end = match.end()
    if end == len(data):
        return None
    return data[end] == _COLON and bool(match.group().strip(_WSP))


def drop_header_fields(message: bytes, rules: Iterable[tuple[str, str | None]]) -> bytes:
    """``message`` (or a prefix of it) without the header fields the rules match."""
    header_filter = HeaderFilter(rules)
    return header_filter.feed(message) + header_filter.finish()
