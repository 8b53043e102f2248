"""The harness's results as markdown: the figures, our/Postfix ratios, issue 6's targets.

Works on the JSON-ready result dicts that ``benchmarks/run.py`` writes, so a saved
results.json can be turned into the same tables again (``run.py --report results.json``).
"""

from __future__ import annotations

from typing import Any

SYSTEM_LABELS = {
    "relay-1w": "twistedrelay, 1 worker",
    "relay-2w": "twistedrelay, 2 workers",
    "postfix": "Postfix",
}
HALF_RATE_P99_TARGET_MS = 50.0
WORKER_RSS_TARGET_MB = 150.0


def _number(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def _spread(repeats: list[dict[str, Any]], key: str) -> str:
    """ " (min–max)" of one figure over repeated runs."""
    values = [run[key] or 0 for run in repeats]
    return f" ({min(values):,.0f}–{max(values):,.0f})"


def find(results: list[dict[str, Any]], scenario: str, system: str) -> dict[str, Any] | None:
    """The result of one scenario on one system, if it ran."""
    for result in results:
        if result["scenario"] == scenario and result["system"] == system:
            return result
    return None


def ratio(results: list[dict[str, Any]], scenario: str, system: str, figure: str) -> float | None:
    """ours / Postfix for ``figure`` ("acceptance" or "end_to_end" messages/s)."""
    ours, postfix = find(results, scenario, system), find(results, scenario, "postfix")
    if ours is None or postfix is None:
        return None
    mine, theirs = ours[figure]["messages_per_second"], postfix[figure]["messages_per_second"]
    if not mine or not theirs:
        return None
    return float(mine) / float(theirs)


def figures_table(results: list[dict[str, Any]]) -> str:
    """One row per scenario and system."""
    lines = [
        "| scenario | system | accepted msg/s | accept latency p50 / p90 / p99 ms "
        "| end-to-end msg/s | delivery delay mean / p99 ms | CPU s per 1k msg "
        "| peak RSS MB (largest process) | peak MB, all processes (anon / RSS) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for result in results:
        acceptance, e2e = result["acceptance"], result["end_to_end"]
        latency, delay = acceptance["latency_ms"], result["delivery_delay"]
        memory = result["memory"]
        accept_text = _number(acceptance["messages_per_second"])
        e2e_text = _number(e2e["messages_per_second"])
        repeats = result.get("repeats", [])
        if len(repeats) > 1:
            accept_text += _spread(repeats, "acceptance_messages_per_second")
            e2e_text += _spread(repeats, "end_to_end_messages_per_second")
        if not e2e["complete"]:
            e2e_text += f" (incomplete: {e2e['recipients_delivered']}/{e2e['recipients_expected']})"
        rate = f" @ {result['rate']:.0f}/s" if result.get("rate") else ""
        system = SYSTEM_LABELS.get(result["system"], result["system"])
        lines.append(
            f"| {result['scenario']}{rate} | {system} "
            f"| {accept_text} "
            f"| {_number(latency['p50'], 1)} / {_number(latency['p90'], 1)} / "
            f"{_number(latency['p99'], 1)} "
            f"| {e2e_text} "
            f"| {_number(delay['mean_ms'])} / {_number(delay['p99_ms'])} "
            f"| {_number(result['cpu']['seconds_per_1000_messages'], 2)} "
            f"| {_number(memory['max_process_peak_rss_mb'])} ({memory['largest_role']}) "
            f"| {_number(memory['tree_anon_rss_peak_mb'])} / "
            f"{_number(memory['tree_rss_peak_mb'])} |"
        )
    return "\n".join(lines)


def ratios_table(results: list[dict[str, Any]]) -> str:
    """ours/Postfix for acceptance and end-to-end throughput, per scenario."""
    lines = [
        "| scenario | acceptance 1 worker / Postfix | acceptance 2 workers / Postfix "
        "| end-to-end 1 worker / Postfix | end-to-end 2 workers / Postfix |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    # A rate-limited run's throughput is its set rate: no ratio to take.
    scenarios = list(dict.fromkeys(r["scenario"] for r in results if not r.get("rate")))
    for scenario in scenarios:
        cells = [
            ratio(results, scenario, system, figure)
            for figure in ("acceptance", "end_to_end")
            for system in ("relay-1w", "relay-2w")
        ]
        lines.append(
            f"| {scenario} | "
            + " | ".join("–" if cell is None else f"{cell:.2f}×" for cell in cells)
            + " |"
        )
    return "\n".join(lines)


def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 6's targets: what each asks, what was measured, met or not (None: not measured)."""
    rows: list[dict[str, Any]] = []

    def ratio_row(text: str, scenario: str, figure: str, at_least: float) -> None:
        value = ratio(results, scenario, "relay-2w", figure)
        rows.append(
            {
                "target": text,
                "measured": None if value is None else f"{value:.2f}× Postfix",
                "met": None if value is None else value >= at_least,
                "by": None if value is None else f"{value / at_least:.2f}× the target",
            }
        )

    ratio_row("end-to-end, 1 KiB × 1 rcpt, 2 workers ≥ 2× Postfix", "1k", "end_to_end", 2.0)
    ratio_row("acceptance, 1 KiB × 1 rcpt, 2 workers ≥ 3× Postfix", "1k", "acceptance", 3.0)
    for scenario in ("32k", "1k-10rcpt"):
        for figure in ("acceptance", "end_to_end"):
            ratio_row(
                f"{scenario} {figure.replace('_', '-')} ahead of Postfix", scenario, figure, 1.0
            )
    half = find(results, "1k-half", "relay-2w")
    p99 = float(half["acceptance"]["latency_ms"]["p99"]) if half else None
    rows.append(
        {
            "target": f"acceptance p99 ≤ {HALF_RATE_P99_TARGET_MS:.0f} ms at half the maximum rate "
            "(2 workers)",
            "measured": None
            if half is None or p99 is None
            else f"{p99:.1f} ms at {half['rate']:.0f} msg/s",
            "met": None if p99 is None else p99 <= HALF_RATE_P99_TARGET_MS,
            "by": _margin(p99, HALF_RATE_P99_TARGET_MS),
        }
    )
    for system in ("relay-1w", "relay-2w"):
        idle = find(results, "1k-idle", system)
        if idle is None:
            continue
        workers = {
            role: mb
            for role, mb in idle["memory"]["peak_rss_mb_by_role"].items()
            if role.startswith("worker")
        }
        peak = max(workers.values(), default=None)
        rows.append(
            {
                "target": f"peak RSS ≤ {WORKER_RSS_TARGET_MB:.0f} MB per worker with 1,000 idle "
                f"sessions ({SYSTEM_LABELS[system]})",
                "measured": None if peak is None else f"{peak:.0f} MB",
                "met": None if peak is None else peak <= WORKER_RSS_TARGET_MB,
                "by": _margin(peak, WORKER_RSS_TARGET_MB),
            }
        )
    return rows


def _margin(value: float | None, limit: float) -> str | None:
    """How far a measured value is under (headroom) or over an upper limit."""
    if not value:
        return None
    if value <= limit:
        return f"{limit / value:.2f}× headroom"
    return f"{value / limit:.2f}× over"


def targets_table(rows: list[dict[str, Any]]) -> str:
    """The targets as a markdown table."""
    lines = ["| target | measured | met | margin |", "| --- | --- | --- | --- |"]
    for row in rows:
        met = {None: "not measured", True: "yes", False: "**no**"}[row["met"]]
        lines.append(f"| {row['target']} | {row['measured'] or '–'} | {met} | {row['by'] or '–'} |")
    return "\n".join(lines)


def machine_lines(machine: dict[str, Any]) -> str:
    """The machine and software a run was taken on, as a markdown list."""
    return "\n".join(f"- {key}: {value}" for key, value in machine.items())


def markdown(document: dict[str, Any]) -> str:
    """The whole report of one run."""
    results = document["results"]
    repeat = document.get("options", {}).get("repeat", 1)
    note = (
        f"Each row is the median of {repeat} runs by end-to-end throughput; "
        "(min–max) over the runs."
        if repeat > 1
        else "One run per row."
    )
    parts = [
        "## Machine",
        machine_lines(document["machine"]),
        "",
        f"Command: `{document['command']}`",
        "",
        "## Figures",
        note,
        "",
        figures_table(results),
        "",
        "## Ours / Postfix",
        ratios_table(results),
        "",
        "## Issue 6 targets",
        targets_table(targets(results)),
    ]
    if document.get("skipped"):
        parts += ["", "## Skipped", *(f"- {line}" for line in document["skipped"])]
    return "\n".join(parts) + "\n"
