"""Numbers for the bench tools: latency percentiles and the sink's loss/duplicate tracker.

Owns the arithmetic shared by ``bench send`` and ``bench sink``; no I/O, no reactor.
Percentiles use the nearest-rank method on the sorted samples, so every figure reported is
a latency that was actually measured.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of already-sorted values.

    :param sorted_values: samples in ascending order.
    :param fraction: the percentile as a fraction, e.g. 0.99 for p99.
    :returns: the smallest sample such that at least ``fraction`` of samples are <= it, or
        0.0 when there are no samples.
    """
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize_latencies(seconds: Sequence[float]) -> dict[str, float]:
    """Summarize latency samples given in seconds as milliseconds (p50, p90, p99, max, mean).

    :returns: a dict with keys ``p50``, ``p90``, ``p99``, ``max``, ``mean`` (milliseconds,
        rounded to microseconds) and ``count``.
    """
    ordered = sorted(seconds)
    count = len(ordered)

    def ms(value: float) -> float:
        return round(value * 1000.0, 3)

    return {
        "count": count,
        "p50": ms(percentile(ordered, 0.50)),
        "p90": ms(percentile(ordered, 0.90)),
        "p99": ms(percentile(ordered, 0.99)),
        "max": ms(ordered[-1]) if ordered else 0.0,
        "mean": ms(sum(ordered) / count) if count else 0.0,
    }


class SequenceTracker:
    """Counts unique messages, duplicate deliveries and gaps from a per-message sequence value.

    A duplicate is the same sequence value delivered to the same recipient twice, so a relay
    that splits one message into one transaction per destination domain is not flagged.
    Integer values also give ``missing``: the gaps between the lowest and highest value seen
    (loss at the very end of a run shows only as a message count below the sender's).
    """

    def __init__(self) -> None:
        self._values: set[bytes] = set()
        self._deliveries: set[tuple[bytes, bytes]] = set()
        self._integers: set[int] = set()
        self.duplicates = 0
        self.without_value = 0

    def record(self, value: bytes | None, recipients: Sequence[bytes]) -> None:
        """Record one accepted message carrying ``value`` for ``recipients``."""
        if value is None:
            self.without_value += 1
            return
        if value not in self._values:
            self._values.add(value)
            if value.isdigit():
                self._integers.add(int(value))
        for recipient in recipients:
            key = (value, recipient.lower())
            if key in self._deliveries:
                self.duplicates += 1
            else:
                self._deliveries.add(key)

    def report(self) -> dict[str, int | None]:
        """The counts as a JSON-ready dict."""
        integers = self._integers
        missing = (max(integers) - min(integers) + 1 - len(integers)) if integers else 0
        return {
            "unique_messages": len(self._values),
            "duplicate_deliveries": self.duplicates,
            "missing": missing,
            "without_value": self.without_value,
            "lowest": min(integers) if integers else None,
            "highest": max(integers) if integers else None,
        }


def extract_header(head: bytes, name_lower: bytes) -> bytes | None:
    """The stripped value of the first header ``name`` in a message head, or None.

    :param head: the start of the message (at least its header section, when it fits).
    :param name_lower: the header name in lower case, without the colon.
    """
    end = head.find(b"\r\n\r\n")
    section = b"\r\n" + (head if end < 0 else head[: end + 2])
    start = section.lower().find(b"\r\n" + name_lower + b":")
    if start < 0:
        return None
    start += len(name_lower) + 3
    stop = section.find(b"\r\n", start)
    return section[start : stop if stop >= 0 else len(section)].strip()
