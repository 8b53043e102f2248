"""PNG chart of a harness run: throughput by scenario, twistedrelay vs Postfix.

matplotlib is an optional extra (``pip install 'twistedrelay[chart]'``); without it the
harness skips the chart. Run by itself to redraw a saved run:
``python benchmarks/chart.py benchmarks/out/results.json benchmarks/out/throughput.png``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SYSTEMS = (
    ("relay-1w", "twistedrelay, 1 worker", "#9ecae1"),
    ("relay-2w", "twistedrelay, 2 workers", "#3182bd"),
    ("postfix", "Postfix", "#e6550d"),
)
FIGURES = (
    ("acceptance", "inbound acceptance"),
    ("end_to_end", "end to end (until the sink has all)"),
)


def write_chart(results: list[dict[str, Any]], path: Path, title: str = "") -> bool:
    """Draw grouped bars of messages/s per scenario and system into ``path``.

    :returns: False when matplotlib is not installed (nothing is written).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: render to a file only
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    # Rate-limited runs (1k-half) measure latency, not capacity: leave them out.
    results = [result for result in results if not result.get("rate")]
    scenarios = list(dict.fromkeys(result["scenario"] for result in results))
    systems = [system for system in SYSTEMS if any(r["system"] == system[0] for r in results)]
    width = 0.8 / max(1, len(systems))
    figure, axes = plt.subplots(1, len(FIGURES), figsize=(6 * len(FIGURES), 4.5), squeeze=False)
    for axis, (key, label) in zip(axes[0], FIGURES, strict=True):
        for offset, (system, system_label, colour) in enumerate(systems):
            values = []
            for scenario in scenarios:
                found = [r for r in results if r["scenario"] == scenario and r["system"] == system]
                values.append((found[0][key]["messages_per_second"] or 0) if found else 0)
            positions = [
                index + (offset - (len(systems) - 1) / 2) * width for index in range(len(scenarios))
            ]
            bars = axis.bar(positions, values, width, label=system_label, color=colour)
            axis.bar_label(bars, fmt="%.0f", fontsize=7)
        axis.set_xticks(range(len(scenarios)), scenarios)
        axis.set_ylabel("messages/s")
        axis.set_title(label)
        axis.margins(y=0.25)  # room above the tallest bar for the legend
        axis.legend(fontsize=8, loc="upper left", ncols=len(systems))
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def main(argv: list[str]) -> int:
    """Redraw the chart of a saved results.json."""
    if len(argv) != 2:
        print("usage: chart.py RESULTS.json OUT.png", file=sys.stderr)
        return 2
    document = json.loads(Path(argv[0]).read_text())
    if not write_chart(document["results"], Path(argv[1])):
        print("chart: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
