"""Message content: DATA (after ``354``) and BDAT chunks → message bytes, and why to reject.

Owns RFC 5321 §4.1.1.4 and §4.5.2 for the inbound side: the end-of-data indicator
``<CRLF>.<CRLF>``, dot-unstuffing, and the checks that can only be made on the message
content (bare CR or LF, size, header section size, Received count, line length), which BDAT content
(RFC 3030, ChunkDecoder) gets too: its framing is the chunk sizes the session counts, so
it has no end indicator and no stuffing. It does not write anything anywhere: decoded
bytes are returned to the caller, chunk by chunk.

Invariants:

- Only ``<CRLF>.<CRLF>`` ends DATA. ``<LF>.<LF>``, ``<CR>.<LF>``, ``<LF>.<CRLF>`` and
  ``<CRLF>.<LF>`` never do, so a message cannot smuggle a second one past us (SMTP
  smuggling, 2023). A bare CR or bare LF anywhere makes the message rejected, but the
  decoder keeps consuming up to the real end so the session stays in step with the client.
- The result does not depend on how the input is split into chunks: at most four bytes
  (a proper prefix of ``<CRLF>.<CRLF>``) are carried from one ``feed`` to the next.
- Work is done with ``bytes.find``/``count``/``replace`` on whole chunks, never with a
  Python loop over bytes or lines of the body.
- Once an error is known, no more decoded bytes are returned (the message will not be
  queued, so nothing needs to be held).
"""

from __future__ import annotations

import re

from twistedrelay.smtp import replies
from twistedrelay.smtp.replies import Reply

_END = b"\r\n.\r\n"
_DOT_LINE = b"\r\n."
# Proper prefixes of the end-of-data indicator, longest first: the tail we must hold back.
_END_PREFIXES = (b"\r\n.\r", b"\r\n.", b"\r\n", b"\r")
# A Received field, in any case, also in the obsolete form with space before the colon
# (RFC 5322 §4.5.3 obs-optional), so that it cannot be used to pass the hop count.
_RECEIVED_FIELD = re.compile(rb"^received[ \t]*:", re.MULTILINE | re.IGNORECASE)
_CR, _LF = 13, 10
_CR_MASK = bytes(1 if byte == _CR else 0 for byte in range(256))
_LF_MASK = bytes(1 if byte == _LF else 0 for byte in range(256))


class _ContentChecks:
    """The checks of message content, whatever framed it (DATA or BDAT).

    ``line_endings`` takes raw regions that never split a CRLF and never start right after
    a CR; ``account`` takes the decoded bytes, in order, and returns them, or b"" once the
    message is known to be refused.
    """

    def __init__(
        self, max_size: int, max_received_headers: int, max_header_size: int, max_line_length: int
    ) -> None:
        self._max_size = max_size
        self._max_received = max_received_headers
        self._max_header_size = max_header_size
        self._max_line = max_line_length
        self._line_length = 0  # octets of the current, unfinished line so far
        self.size = 0
        self._error: Reply | None = None
        self.bare_line_ending = False
        self._in_headers = True
        # Decoded bytes of the current, unfinished header line (starts at a line start).
        self._header_line = b""
        self._received = 0

    @property
    def error(self) -> Reply | None:
        """Why the message must be rejected, or None. A bare CR/LF takes precedence."""
        if self.bare_line_ending:
            return replies.BARE_LINE_ENDING
        return self._error

    def line_endings(self, region: bytes) -> None:
        """Note a bare CR or LF in ``region``."""
        if (
            region
            and not self.bare_line_ending
            and (
                # The byte before the region is never CR (a CR at the end is carried), so a LF
                # first is bare; a CR last can only be the end of the final region.
                region[0] == _LF
                or region[-1] == _CR
                # Every CR must be followed by LF and every LF preceded by CR: the LF positions
                # shifted back by one are exactly the CR positions (two C passes and a memcmp).
                or region.translate(_LF_MASK)[1:] != region.translate(_CR_MASK)[:-1]
            )
        ):
            self.bare_line_ending = True

    def account(self, decoded: bytes) -> bytes:
        """Count ``decoded`` toward the limits; return it, or b"" once refused."""
        self.size += len(decoded)
        if self._error is None and self.size > self._max_size:
            self._error = replies.MESSAGE_TOO_BIG
        if self._in_headers and self._error is None:
            self._scan_headers(decoded)
        if self._max_line and self._error is None:
            self._measure_lines(decoded)
        if self._error is not None or self.bare_line_ending:
            return b""
        return decoded

    def _measure_lines(self, decoded: bytes) -> None:
        """Refuse a line longer than the limit, its CRLF included (RFC 5321 §4.5.3.1.6).

        From a line's start, the last LF within the limit's reach starts the next line to
        check: one ``rfind`` per limit's worth of bytes, however short the lines are.
        """
        limit = self._max_line
        start = -self._line_length  # where the unfinished line began, before this piece
        end = len(decoded)
        while end - start >= limit:
            newline = decoded.rfind(b"\n", max(start, 0), start + limit)
            if newline < 0:
                self._error = replies.TEXT_LINE_TOO_LONG
                return
            start = newline + 1
        # Less than a limit is left: only where the last line begins matters.
        last_newline = decoded.rfind(b"\n", max(start, 0))
        if last_newline >= 0:
            start = last_newline + 1
        self._line_length = end - start

    def _scan_headers(self, decoded: bytes) -> None:
        """Count Received: fields and measure the header section (RFC 5322 §2.2)."""
        text = self._header_line + decoded
        size_before = self.size - len(decoded) - len(self._header_line)
        if text.startswith(b"\r\n"):
            header_end = 0
        else:
            found = text.find(b"\n\r\n")
            header_end = found + 1 if found >= 0 else -1
        if header_end >= 0:
            complete = text[:header_end]
            self._in_headers = False
            self._header_line = b""
            if size_before + header_end > self._max_header_size:
                self._error = replies.HEADERS_TOO_BIG
        else:
            last_newline = text.rfind(b"\n")
            complete = text[:last_newline] if last_newline >= 0 else b""
            self._header_line = text[last_newline + 1 :]
            if size_before + len(text) > self._max_header_size:
                self._error = replies.HEADERS_TOO_BIG
                self._in_headers = False
                self._header_line = b""
        if complete:
            # A match cannot span the last newline, so lines that are not complete yet are
            # counted on a later chunk, exactly once.
            self._received += len(_RECEIVED_FIELD.findall(complete))
            if self._received > self._max_received and self._error is None:
                self._error = replies.TOO_MANY_HOPS


class _CheckedContent:
    """What DataDecoder and ChunkDecoder share: the content checks and their verdict.

    :param max_size: decoded bytes allowed; more → ``MESSAGE_TOO_BIG``.
    :param max_received_headers: Received: header fields allowed in the header section;
        more → ``TOO_MANY_HOPS`` (RFC 5321 §6.3 loop detection).
    :param max_header_size: bytes allowed before the empty line ending the header section;
        more → ``HEADERS_TOO_BIG``.
    :param max_line_length: octets allowed in a line with its CRLF, not counting a dot
        added for transparency (0: no limit); more → ``TEXT_LINE_TOO_LONG``.
    """

    def __init__(
        self,
        max_size: int,
        max_received_headers: int,
        max_header_size: int,
        max_line_length: int = 0,
    ) -> None:
        self._checks = _ContentChecks(
            max_size, max_received_headers, max_header_size, max_line_length
        )

    @property
    def error(self) -> Reply | None:
        """Why the message must be rejected, or None. A bare CR/LF takes precedence."""
        return self._checks.error


class DataDecoder(_CheckedContent):
    """Decodes one message's DATA section from a stream of chunks.

    The stream is treated as if it began with ``<CRLF>`` (the end of the DATA command
    line), so ``.<CRLF>`` as the very first line is an empty message and a leading ``.``
    on the first line is unstuffed like any other. The limits are _CheckedContent's.
    """

    # The virtual CRLF that ends the DATA command line: carried in, then cut from the output.
    _carry = b"\r\n"
    _skip = 2

    @property
    def size(self) -> int:
        """Decoded message bytes seen so far (counted even after an error)."""
        return self._checks.size

    def feed(self, data: bytes) -> tuple[bytes, int | None]:
        """Decode the next chunk of the DATA stream.

        :param data: raw bytes as received.
        :returns: ``(decoded, end)``: the decoded (dot-unstuffed) message bytes this chunk
            completes (possibly empty), and the index in ``data`` just after the
            ``<CRLF>.<CRLF>`` indicator, or None when the end has not been seen yet. Bytes
            of ``data`` from ``end`` on are not part of the message (pipelined commands).
            After the end, the decoder must not be fed again.
        """
        carried = len(self._carry)
        buffer = self._carry + data if carried else data
        # One search answers both "is there a dot line to unstuff?" and "can DATA end
        # here?": most chunks have neither, and then nothing else is searched for.
        first_dot_line = buffer.find(_DOT_LINE)
        end_at = buffer.find(_END, first_dot_line) if first_dot_line >= 0 else -1
        if end_at >= 0:
            # The CRLF before "." ends the message's last line and belongs to the message.
            region = buffer[: end_at + 2]
            self._carry = b""
            end: int | None = end_at + len(_END) - carried
        else:
            hold = 0
            for prefix in _END_PREFIXES:
                if buffer.endswith(prefix):
                    hold = len(prefix)
                    break
            region = buffer[: len(buffer) - hold]
            self._carry = buffer[len(buffer) - hold :]
            end = None
        # The terminator's own dot is outside the region: only earlier dot lines count.
        has_dot_lines = 0 <= first_dot_line < (end_at if end_at >= 0 else len(buffer))
        return self._decode(region, has_dot_lines), end

    def _decode(self, region: bytes, has_dot_lines: bool) -> bytes:
        """Check and unstuff a region that starts at a line start or mid-line, never mid-CRLF."""
        if not region:
            return b""
        self._checks.line_endings(region)
        # RFC 5321 §4.5.2: a leading "." on a line is removed.
        decoded = region.replace(_DOT_LINE, b"\r\n") if has_dot_lines else region
        if self._skip:
            decoded = decoded[self._skip :]
            self._skip = 0
        return self._checks.account(decoded)


class ChunkDecoder(_CheckedContent):
    """Checks one message's BDAT content (RFC 3030) as its chunks arrive.

    BDAT content is counted, not delimited, and not dot-stuffed: it is the message as is.
    It gets DATA's checks all the same, bare CR or LF included, so that whether a message
    is accepted does not depend on how the client chose to send it. A CR at the end of one
    piece is held until the next shows whether LF follows. The limits are _CheckedContent's.
    """

    _carry = b""

    @property
    def size(self) -> int:
        """Message bytes seen so far (counted even after an error)."""
        return self._checks.size + len(self._carry)

    def feed(self, data: bytes) -> bytes:
        """Check the next piece of content; return the message bytes it completes."""
        buffer = self._carry + data if self._carry else data
        hold = 1 if buffer.endswith(b"\r") else 0
        self._carry = buffer[len(buffer) - hold :]
        return self._take(buffer[: len(buffer) - hold])

    def finish(self) -> bytes:
        """The end of the last chunk: a CR still held is a bare one."""
        carry, self._carry = self._carry, b""
        return self._take(carry)

    def _take(self, region: bytes) -> bytes:
        if not region:
            return b""
        self._checks.line_endings(region)
        return self._checks.account(region)
