"""The messages ``bench send`` sends: sizes, envelopes and content, built fast and numbered.

Owns what goes on the wire inside a transaction, not how it is sent. Every message carries
``X-Sequence: N`` and a unique Message-ID so a sink can count loss and duplicates. Bodies are
lines of 78 letters (never a leading dot, never a bare CR or LF), cut to reach the requested
size, and cached per size, so building a message costs one header format and one join.
Pure: no reactor, no sockets.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from email.utils import formatdate

_LINE = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz\r\n"
_LINE_BYTES = len(_LINE)  # 80: 78 letters and CRLF


@dataclass(frozen=True, slots=True)
class SizeDistribution:
    """Message sizes in bytes with relative weights; one size alone means every message."""

    sizes: tuple[int, ...]
    weights: tuple[float, ...]

    @classmethod
    def parse(cls, text: str) -> SizeDistribution:
        """Parse ``1024`` or ``1024:80,32768:20`` (size:weight, comma separated).

        :raises ValueError: on a size or weight that is not a positive number.
        """
        sizes: list[int] = []
        weights: list[float] = []
        for item in text.split(","):
            size_text, _, weight_text = item.strip().partition(":")
            size = int(size_text)
            weight = float(weight_text) if weight_text else 1.0
            if size <= 0 or weight <= 0:
                raise ValueError(f"sizes and weights must be positive: {item!r}")
            sizes.append(size)
            weights.append(weight)
        return cls(tuple(sizes), tuple(weights))

    def pick(self, rng: random.Random) -> int:
        """One size, drawn by weight."""
        if len(self.sizes) == 1:
            return self.sizes[0]
        return rng.choices(self.sizes, self.weights)[0]


def build_body(size_bytes: int) -> bytes:
    """A body of about ``size_bytes`` (at least one line) of CRLF-terminated letter lines."""
    full, remainder = divmod(max(size_bytes, 2), _LINE_BYTES)
    if remainder == 1:
        # A 1-byte tail cannot be a line: make the last full line one letter longer.
        if full == 0:
            return b"\r\n"
        full -= 1
        remainder = _LINE_BYTES + 1
    tail = b""
    if remainder:
        letters = remainder - 2
        tail = (_LINE[:-2] * 2)[:letters] + b"\r\n"
    return _LINE * full + tail


@dataclass(frozen=True, slots=True)
class Message:
    """One message ready to send: envelope and content (wire form, ends with CRLF)."""

    sequence: int
    sender: bytes
    recipients: tuple[bytes, ...]
    content: bytes


class MessageBuilder:
    """Builds numbered messages with recipients spread over domains.

    :param recipient_template: ``str.format`` template with ``{n}`` (1-based recipient index
        within the message) and ``{k}`` (1-based domain number), e.g.
        ``rcpt{n}@d{k}.example.test``.
    """

    def __init__(
        self,
        *,
        sender: str = "bench@example.test",
        recipient_template: str = "rcpt{n}@d{k}.example.test",
        recipients_per_message: int = 1,
        domains: int = 1,
        sizes: SizeDistribution | None = None,
        run_id: str = "run",
        rng: random.Random | None = None,
    ) -> None:
        self.sender = sender.encode()
        self.recipient_template = recipient_template
        self.recipients_per_message = max(1, recipients_per_message)
        self.domains = max(1, domains)
        self.sizes = sizes or SizeDistribution((1024,), (1.0,))
        self.run_id = run_id
        self._rng = rng or random.Random()
        self._bodies: dict[int, bytes] = {}
        self._recipients: dict[int, tuple[bytes, ...]] = {}
        self._date = formatdate(localtime=False, usegmt=True).encode()

    def recipients_for(self, sequence: int) -> tuple[bytes, ...]:
        """The recipients of message ``sequence``; the domain rotates with the sequence."""
        # They depend only on the sequence modulo the domain count: build each set once.
        rotation = sequence % self.domains
        recipients = self._recipients.get(rotation)
        if recipients is None:
            recipients = self._recipients[rotation] = tuple(
                self.recipient_template.format(
                    n=n + 1, k=(rotation + n) % self.domains + 1
                ).encode()
                for n in range(self.recipients_per_message)
            )
        return recipients

    def build(self, sequence: int) -> Message:
        """Message number ``sequence`` with a size drawn from the distribution."""
        recipients = self.recipients_for(sequence)
        header = b"".join(
            (
                b"From: <",
                self.sender,
                b">\r\nTo: <",
                recipients[0],
                b">\r\nSubject: bench message ",
                b"%d" % sequence,
                b"\r\nDate: ",
                self._date,
                b"\r\nMessage-ID: <%d.%s@bench.example.test>" % (sequence, self.run_id.encode()),
                b"\r\nX-Sequence: %d\r\n\r\n" % sequence,
            )
        )
        size = self.sizes.pick(self._rng)
        body_size = size - len(header)
        body = self._bodies.get(body_size)
        if body is None:
            body = self._bodies[body_size] = build_body(body_size)
        return Message(sequence, self.sender, recipients, header + body)
