"""The load harness: twistedrelay (1 and 2 workers) and Postfix, same machine, same run, same sink.

For each scenario and each system: start the system (relay: ``twistd -n twistedrelay`` with
a generated relay.toml; Postfix: a private instance), point it at one shared
``twistedrelay bench sink``, drive it with ``twistedrelay bench send`` (20 connections), and
measure inbound acceptance (rate and latency), end-to-end throughput (from the first
message sent until the sink has every recipient), delivery delay, CPU per 1,000 messages
and peak RSS. Then stop the system by PID and go on. Writes results.json, results.md and
throughput.png (with matplotlib) into --out and prints the markdown.

Every wait is bounded, every port is a kernel-chosen loopback port, and every process the
harness starts is stopped by PID in a ``finally`` (Ctrl-C and SIGTERM included).

Run: ``.venv/bin/python benchmarks/run.py [--scenarios 1k,32k] [--messages 5000]
[--no-postfix] [--workers 1,2] [--out benchmarks/out]`` (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from chart import write_chart
from load import measure, report
from load.postfix import PostfixInstance, ensure_postfix, postfix_role, postfix_version
from load.procs import ResourceSampler, machine_busy_seconds, tree_cpu_seconds, wait_until
from load.relay import RelayInstance, relay_role
from load.sender import Scenario, run_send
from load.sink import SinkRunner

SCENARIOS = {
    scenario.name: scenario
    for scenario in (
        Scenario("1k", 1024, description="1 KiB × 1 recipient"),
        Scenario("32k", 32768, description="32 KiB × 1 recipient"),
        Scenario(
            "1k-10rcpt",
            1024,
            recipients=10,
            domains=5,
            description="1 KiB × 10 recipients over 5 domains",
        ),
        Scenario(
            "1k-idle", 1024, hold_idle=1000, description="1 KiB while 1,000 idle sessions are held"
        ),
        Scenario(
            "1k-half",
            1024,
            rate_fraction=0.5,
            description="1 KiB × 1 recipient at half the same system's 1k acceptance rate",
        ),
    )
}
#: the scenario whose acceptance rate sets the rate of the rate-limited ones
MAX_RATE_SCENARIO = "1k"
#: file descriptors: 1,000 idle sessions plus senders, in the generator and in the relay
OPEN_FILES_WANTED = 65536


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The harness's options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma list, run in this order (default and choices: {','.join(SCENARIOS)})",
    )
    bound = parser.add_mutually_exclusive_group()
    bound.add_argument(
        "--messages", type=int, default=5000, help="messages per scenario and system"
    )
    bound.add_argument("--duration", type=float, default=0.0, help="seconds of load instead")
    parser.add_argument("--connections", type=int, default=20, help="sending connections")
    parser.add_argument("--workers", default="1,2", help="relay worker counts to run, comma list")
    parser.add_argument("--no-postfix", action="store_true", help="run the relay only")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"), help="output directory")
    parser.add_argument(
        "--send-timeout", type=float, default=180.0, help="hard limit of one load run, seconds"
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=180.0,
        help="how long to wait after the load for the sink to have everything, seconds",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of each scenario and system; the table shows the median by end-to-end",
    )
    parser.add_argument(
        "--load-chunking",
        action="store_true",
        help="the load generator sends with BDAT (both systems offer CHUNKING); default DATA",
    )
    parser.add_argument("--keep", action="store_true", help="keep the run directory (queues, logs)")
    parser.add_argument("--report", type=Path, help="only print the tables of a saved results.json")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; choose from {list(SCENARIOS)}")
    args.scenario_list = [SCENARIOS[name] for name in names]
    try:
        args.worker_counts = [int(value) for value in args.workers.split(",") if value.strip()]
    except ValueError:
        parser.error("--workers takes a comma list of integers, e.g. 1,2")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.messages <= 0 and not args.duration:
        parser.error("--messages must be positive")
    return args


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE (inherited by everything started here); the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES_WANTED if hard == resource.RLIM_INFINITY else min(OPEN_FILES_WANTED, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    return soft


def machine_info(with_postfix: bool) -> dict[str, Any]:
    """The machine and the software versions of this run."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    import twisted

    info = {
        "date (UTC)": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
        "CPUs (nproc)": os.cpu_count(),
        "CPU model": model or "unknown",
        "kernel": platform.release(),
        "Python": platform.python_version(),
        "Twisted": twisted.__version__,
        "open files limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "load average at start (1/5/15 min)": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }
    if with_postfix:
        info["Postfix"] = postfix_version()
    info["twistedrelay revision"] = source_revision()
    return info


def source_revision() -> str:
    """The git commit of the relay's code, flagged when twistedrelay/ has uncommitted changes."""
    top = Path(__file__).resolve().parent.parent

    def git(*argv: str) -> str:
        try:
            result = subprocess.run(
                ["git", "-C", str(top), *argv], capture_output=True, check=False, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return result.stdout.decode().strip()

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "unknown"
    dirty = git("status", "--porcelain", "--", "twistedrelay")
    return commit + (" + uncommitted changes in twistedrelay/" if dirty else "")


class TerminatedError(Exception):
    """SIGTERM arrived: unwind through every ``finally`` like Ctrl-C does."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise TerminatedError(signum)


class Harness:
    """One harness run: the sink, the scenarios, the results."""

    def __init__(
        self, args: argparse.Namespace, root: Path, cleanups: contextlib.ExitStack
    ) -> None:
        self.args = args
        self.root = root
        self.cleanups = cleanups
        self.results: list[dict[str, Any]] = []
        self.skipped: list[str] = []
        self.sink = SinkRunner(root)

    def log(self, text: str) -> None:
        """A progress line on stderr."""
        print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    def systems(self, with_postfix: bool) -> list[str]:
        """The systems to run, relay worker counts first."""
        systems = [f"relay-{count}w" for count in self.args.worker_counts]
        return systems + (["postfix"] if with_postfix else [])

    def run(self, with_postfix: bool) -> None:
        """Every scenario on every system, ``--repeat`` times, systems interleaved."""
        self.sink.start()
        self.cleanups.callback(self.sink.stop)
        self.log(f"sink listening on 127.0.0.1:{self.sink.port}")
        for scenario in self.args.scenario_list:
            rates = {
                system: self.rate_for(scenario, system) for system in self.systems(with_postfix)
            }
            runs: dict[str, list[dict[str, Any]]] = {}
            # Interleave the systems in each round, so that a busy spell of the machine
            # hits all of them rather than one.
            for attempt in range(self.args.repeat):
                for system, rate in rates.items():
                    if rate is None:
                        continue
                    try:
                        result = self.run_one(system, scenario, rate, attempt)
                    except RuntimeError as error:
                        self.log(f"{scenario.name} on {system} failed: {error}")
                        self.skipped.append(f"{scenario.name} on {system}: {str(error)[:300]}")
                        continue
                    runs.setdefault(system, []).append(result)
            self.results.extend(median_run(results) for results in runs.values())

    def rate_for(self, scenario: Scenario, system: str) -> float | None:
        """The scenario's sending rate on ``system`` (0: unlimited; None: cannot run)."""
        if not scenario.rate_fraction:
            return 0.0
        base = report.find(self.results, MAX_RATE_SCENARIO, system)
        if base is None or not base["acceptance"]["messages_per_second"]:
            self.skipped.append(
                f"{scenario.name} on {system}: needs the {MAX_RATE_SCENARIO} scenario's "
                "acceptance rate first"
            )
            return None
        return float(base["acceptance"]["messages_per_second"]) * scenario.rate_fraction

    @contextlib.contextmanager
    def system_under_test(self, system: str, directory: Path) -> Iterator[Any]:
        """Start one system; stop it by PID whatever happens."""
        instance: RelayInstance | PostfixInstance
        if system == "postfix":
            instance = PostfixInstance(directory, sink_port=self.sink.port)
        else:
            workers = int(system.removeprefix("relay-").removesuffix("w"))
            instance = RelayInstance(directory, sink_port=self.sink.port, workers=workers)
        with contextlib.ExitStack() as stack:
            stack.callback(instance.stop)
            instance.start()
            yield instance

    def run_one(
        self, system: str, scenario: Scenario, rate: float, attempt: int = 0
    ) -> dict[str, Any]:
        """One scenario on one system: the result dict of results.json."""
        directory = self.root / f"{scenario.name}-{system}-{attempt + 1}"
        directory.mkdir()
        self.log(
            f"{scenario.name} on {system}: starting" + (f" (rate {rate:.0f}/s)" if rate else "")
        )
        role: Callable[..., str] = postfix_role if system == "postfix" else relay_role
        with self.system_under_test(system, directory) as instance:
            if not wait_until(self.sink.counters, 10.0):
                raise RuntimeError("the sink reports no counters")
            baseline = self.sink.counters().get("recipients", 0)
            baseline_bdat = self.sink.counters().get("messages_bdat", 0)
            # Other work on the machine skews every figure: record how busy it was.
            load_before = os.getloadavg()[0]
            sampler = ResourceSampler(lambda: instance.pid, role)
            cpu_before = tree_cpu_seconds(instance.pid)
            busy_before = machine_busy_seconds()
            sampler.start()
            try:
                sent = run_send(
                    instance.smtp_port,
                    scenario,
                    directory=directory,
                    messages=self.args.messages,
                    duration_seconds=self.args.duration,
                    connections=self.args.connections,
                    rate=rate,
                    timeout_seconds=self.args.send_timeout,
                    chunking=self.args.load_chunking,
                )
                expected = int(sent.report["recipients_accepted"])
                done_at = self.sink.wait_for_recipients(
                    baseline + expected, self.args.drain_timeout
                )
                cpu_seconds = tree_cpu_seconds(instance.pid) - cpu_before
                busy_seconds = machine_busy_seconds() - busy_before
            finally:
                sampler.stop()
            delivered = self.sink.counters().get("recipients", 0) - baseline
            # Which systems sent with BDAT (the sink offers CHUNKING; benchmarks/README.md).
            delivered_bdat = self.sink.counters().get("messages_bdat", 0) - baseline_bdat
            metrics_text = instance.metrics_text() if isinstance(instance, RelayInstance) else ""
        log_path = instance.maillog if isinstance(instance, PostfixInstance) else instance.log_path
        accepted = int(sent.report["messages_accepted"])
        e2e_seconds = done_at - sent.started_at if done_at is not None else None
        samples = measure.parse_metrics(metrics_text)
        result: dict[str, Any] = {
            "load_average_before": round(load_before, 2),
            "scenario": scenario.name,
            "description": scenario.description,
            "system": system,
            "rate": rate,
            "acceptance": {
                "messages_per_second": sent.report["messages_per_second"],
                "latency_ms": sent.report["latency_ms"],
                "messages_accepted": accepted,
                "messages_attempted": sent.report["messages_attempted"],
                "errors": sent.report["errors"],
                "timed_out": sent.report["timed_out"],
                "idle": sent.report["idle"],
                "elapsed_seconds": sent.report["elapsed_seconds"],
            },
            "end_to_end": {
                "complete": done_at is not None,
                "seconds": None if e2e_seconds is None else round(e2e_seconds, 3),
                "messages_per_second": round(accepted / e2e_seconds, 1) if e2e_seconds else None,
                "recipients_expected": expected,
                "recipients_delivered": delivered,
                "messages_delivered_with_bdat": delivered_bdat,
            },
            "delivery_delay": measure.delay_summary(measure.log_delays(log_path)),
            "cpu": {
                "seconds": round(cpu_seconds, 2),
                # All CPUs, same window: the system under test, the generator, the sink,
                # the harness, and anything else running on the machine.
                "machine_busy_seconds": round(busy_seconds, 2),
                "seconds_per_1000_messages": round(cpu_seconds / accepted * 1000, 3)
                if accepted
                else None,
            },
            "memory": sampler.summary(),
            "workdir": str(directory),
        }
        if samples:
            result["relay_metrics"] = {
                "delivery_seconds": measure.histogram_summary(
                    samples, "twistedrelay_delivery_seconds"
                ),
                "deliveries": {
                    outcome: measure.metric(
                        samples, "twistedrelay_deliveries_total", result=outcome
                    )
                    for outcome in ("delivered", "deferred", "bounced")
                },
                "messages_received": measure.metric(
                    samples, "twistedrelay_messages_received_total"
                ),
            }
        e2e = result["end_to_end"]
        p99 = sent.report["latency_ms"]["p99"]
        self.log(
            f"{scenario.name} on {system}: accepted {accepted} at "
            f"{sent.report['messages_per_second']:.0f}/s (p99 {p99} ms), "
            f"end to end {e2e['messages_per_second']}/s, "
            f"delivered {delivered}/{expected} recipients, CPU {cpu_seconds:.1f} s"
        )
        time.sleep(1.0)  # let the machine settle (page cache writeback, exiting processes)
        return result


def median_run(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median end-to-end throughput, carrying every run's headline figures.

    :param results: the repeats of one scenario on one system (at least one).
    """

    def e2e(result: dict[str, Any]) -> float:
        return float(result["end_to_end"]["messages_per_second"] or 0.0)

    chosen = dict(sorted(results, key=e2e)[(len(results) - 1) // 2])
    chosen["repeats"] = [
        {
            "acceptance_messages_per_second": result["acceptance"]["messages_per_second"],
            "acceptance_p99_ms": result["acceptance"]["latency_ms"]["p99"],
            "end_to_end_messages_per_second": result["end_to_end"]["messages_per_second"],
            "cpu_seconds_per_1000_messages": result["cpu"]["seconds_per_1000_messages"],
            "machine_busy_seconds": result["cpu"]["machine_busy_seconds"],
            "load_average_before": result["load_average_before"],
        }
        for result in results
    ]
    return chosen


def write_outputs(document: dict[str, Any], out: Path) -> str:
    """results.json, results.md and throughput.png in ``out``; the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(document, indent=2) + "\n")
    text = report.markdown(document)
    (out / "results.md").write_text(text)
    if write_chart(
        document["results"], out / "throughput.png", "messages/s by scenario (higher is better)"
    ):
        text += f"\nChart: {out / 'throughput.png'}\n"
    else:
        text += "\nChart skipped: matplotlib is not installed (pip install matplotlib).\n"
    return text


def main(argv: list[str]) -> int:
    """Run the harness; 0 when every requested run produced a result."""
    args = parse_args(argv)
    if args.report is not None:
        print(report.markdown(json.loads(args.report.read_text())), end="")
        return 0
    signal.signal(signal.SIGTERM, _on_sigterm)
    # Ctrl-C must unwind through the cleanups even when started in the background of a
    # script (where SIGINT arrives ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    raise_open_files_limit()
    skipped: list[str] = []
    with_postfix = not args.no_postfix
    if with_postfix:
        reason = ensure_postfix()
        if reason is not None:
            print(f"bench: Postfix skipped: {reason}", file=sys.stderr)
            skipped.append(f"Postfix: {reason}")
            with_postfix = False
    root = Path(tempfile.mkdtemp(prefix="twistedrelay-bench-"))
    root.chmod(0o755)  # Postfix's unprivileged processes must reach their queue inside
    document: dict[str, Any] = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(with_postfix),
        "options": {
            "messages": args.messages,
            "duration": args.duration,
            "connections": args.connections,
            "workers": args.worker_counts,
            "repeat": args.repeat,
            "load_chunking": args.load_chunking,
        },
    }
    harness: Harness | None = None
    try:
        with contextlib.ExitStack() as cleanups:
            harness = Harness(args, root, cleanups)
            harness.run(with_postfix)
    except (KeyboardInterrupt, TerminatedError):
        print("bench: interrupted; every process was stopped", file=sys.stderr)
        return 130
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"bench: run directory kept: {root}", file=sys.stderr)
    document["results"] = harness.results
    document["skipped"] = skipped + harness.skipped
    print(write_outputs(document, args.out), end="")
    return 0 if not document["skipped"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
