"""Figures from what the systems expose: Prometheus text, and Postfix-style mail log lines.

Delivery latency is measured the same way for both systems: both log one
``to=<…>, relay=…, delay=SECONDS, …, status=sent`` line per delivered recipient (the relay
keeps Postfix's format on purpose), where delay is the time from the message's arrival to
its delivery. For the relay, the histogram ``twistedrelay_delivery_seconds`` from /metrics
is reported as well (its mean is exact; its quantiles are bucket estimates).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
LABEL_RE = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
SENT_DELAY_RE = re.compile(r"\bdelay=([0-9.]+),.*\bstatus=sent\b")


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text exposition → {(name, labels): value} (comments skipped)."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = SAMPLE_RE.match(line)
        if match is None:
            continue
        name, labels, value = match.groups()
        try:
            number = float(value)
        except ValueError:
            continue
        samples[(name, frozenset(LABEL_RE.findall(labels or "")))] = number
    return samples


def metric(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """The value of one sample (0.0 when absent)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def histogram_summary(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str
) -> dict[str, Any]:
    """Count, exact mean, and p50/p99 estimated from the buckets of one unlabelled histogram.

    The estimate interpolates linearly inside the bucket holding the rank, as PromQL's
    histogram_quantile does; it is only as fine as the buckets.
    """
    count = metric(samples, f"{name}_count")
    total = metric(samples, f"{name}_sum")
    buckets = sorted(
        (float(dict(labels)["le"]), value)
        for (sample, labels), value in samples.items()
        if sample == f"{name}_bucket" and "le" in dict(labels)
    )
    summary: dict[str, Any] = {
        "count": int(count),
        "mean_ms": None,
        "p50_ms_est": None,
        "p99_ms_est": None,
    }
    if not count:
        return summary
    summary["mean_ms"] = round(total / count * 1000, 1)
    for key, fraction in (("p50_ms_est", 0.5), ("p99_ms_est", 0.99)):
        rank = fraction * count
        lower_bound, lower_count = 0.0, 0.0
        for bound, cumulative in buckets:
            if cumulative >= rank:
                if math.isinf(bound):
                    estimate = lower_bound
                else:
                    inside = cumulative - lower_count
                    share = (rank - lower_count) / inside if inside else 1.0
                    estimate = lower_bound + (bound - lower_bound) * share
                summary[key] = round(estimate * 1000, 1)
                break
            lower_bound, lower_count = bound, cumulative
    return summary


def sent_delays(lines: Iterable[str]) -> list[float]:
    """The delay= of every ``status=sent`` line (seconds, as logged: 10 ms resolution)."""
    delays = []
    for line in lines:
        match = SENT_DELAY_RE.search(line)
        if match:
            delays.append(float(match.group(1)))
    return delays


def log_delays(path: Path) -> list[float]:
    """:func:`sent_delays` of a log file (empty when it does not exist)."""
    if not path.exists():
        return []
    with open(path, encoding="utf-8", errors="replace") as log:
        return sent_delays(log)


def delay_summary(delays: list[float]) -> dict[str, Any]:
    """Count, mean, p50, p90 and p99 (nearest rank) of delays, in milliseconds."""
    if not delays:
        return {"count": 0, "mean_ms": None, "p50_ms": None, "p90_ms": None, "p99_ms": None}
    ordered = sorted(delays)

    def rank(fraction: float) -> float:
        return round(ordered[max(0, math.ceil(fraction * len(ordered)) - 1)] * 1000, 1)

    return {
        "count": len(ordered),
        "mean_ms": round(sum(ordered) / len(ordered) * 1000, 1),
        "p50_ms": rank(0.5),
        "p90_ms": rank(0.9),
        "p99_ms": rank(0.99),
    }
