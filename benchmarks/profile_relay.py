"""Run one bounded load through the relay and report acceptance, end to end and CPU.

The reproducible measurement behind benchmarks/PERFORMANCE.md: a sink, ``twistd -n
twistedrelay`` (N workers, fsync on, route "*" to the sink) and ``twistedrelay bench send``,
all on loopback, in a fresh temporary directory. Prints one JSON line. With ``--py-spy``
it also records a py-spy profile of every worker (and the master) while the load runs.

Usage: .venv/bin/python benchmarks/profile_relay.py [--workers 2] [--messages 5000]
    [--connections 20] [--size 1024] [--py-spy DIR [--gil]]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from load.procs import stop_process

VENV_BIN = Path(sys.executable).parent
TIMEOUT_SECONDS = 300.0


def free_port() -> int:
    """A loopback port the kernel considers free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition, timeout: float, what: str):  # noqa: ANN001, ANN201
    """Poll ``condition`` until it is truthy or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def children(pid: int) -> list[int]:
    """Direct children of a process (the master's workers)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry))
    return sorted(found)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds a process used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def syscalls(pid: int) -> tuple[int, int]:
    """(read-like, write-like) system calls a process made so far (/proc/PID/io)."""
    fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(fields["syscr"]), int(fields["syscw"])


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set size (VmHWM) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--size", default="1024")
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--py-spy", type=Path, default=None, help="write profiles here")
    parser.add_argument(
        "--gil", action="store_true", help="py-spy: only threads holding the GIL (CPU in Python)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="trperf-"))
    smtp_port, sink_port = free_port(), free_port()
    stats_file = work / "sink.json"
    sink = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "twistedrelay.bench.sink",
            "--listen",
            f"127.0.0.1:{sink_port}",
            "--stats-file",
            str(stats_file),
            "--report-interval",
            "0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    config = work / "relay.toml"
    config.write_text(
        'hostname = "relay.example.test"\n'
        f'[smtp]\nlisten = ["127.0.0.1:{smtp_port}"]\n'
        '[relay]\nmynetworks = ["127.0.0.0/8"]\n'
        f'[queue]\ndirectory = "{work / "queue"}"\n'
        f"[workers]\ncount = {args.workers}\n"
        '[metrics]\nlisten = "127.0.0.1:0"\n'
        f'[delivery]\nroutes = {{ "*" = "127.0.0.1:{sink_port}" }}\n'
    )
    relay = subprocess.Popen(
        [
            str(VENV_BIN / "twistd"),
            "--nodaemon",
            "--pidfile",
            str(work / "twistd.pid"),
            "--logfile",
            str(work / "twistd.log"),
            "twistedrelay",
            "--config",
            str(config),
        ],
        cwd=work,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    spies: list[subprocess.Popen[bytes]] = []
    try:

        def greets() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", smtp_port), timeout=2) as conn:
                    return conn.recv(512).startswith(b"220 ")
            except OSError:
                return False

        wait_until(greets, 30, "the relay's greeting")
        wait_until(lambda: len(children(relay.pid)) >= args.workers, 30, "the workers")
        time.sleep(1.0)  # let every worker finish starting
        workers = children(relay.pid)
        pids = [relay.pid, *workers]
        cpu_before = {pid: cpu_seconds(pid) for pid in pids}
        io_before = {pid: syscalls(pid) for pid in pids}
        if args.py_spy is not None:
            args.py_spy.mkdir(parents=True, exist_ok=True)
            for pid in pids:
                name = "master" if pid == relay.pid else f"worker-{pid}"
                spies.append(
                    subprocess.Popen(
                        [
                            str(VENV_BIN / "py-spy"),
                            "record",
                            "--pid",
                            str(pid),
                            "--format",
                            "raw",
                            "--output",
                            str(args.py_spy / f"{name}.txt"),
                            "--duration",
                            "600",
                            "--nonblocking",
                            *(["--gil"] if args.gil else []),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
            time.sleep(1.0)
        started = time.monotonic()
        send = subprocess.run(
            [
                str(VENV_BIN / "twistedrelay"),
                "bench",
                "send",
                "--target",
                f"127.0.0.1:{smtp_port}",
                "--connections",
                str(args.connections),
                "--messages",
                str(args.messages),
                "--size",
                args.size,
                "--rate",
                str(args.rate),
                "--json",
                "--quiet",
                "--timeout",
                str(TIMEOUT_SECONDS),
            ],
            capture_output=True,
            check=True,
            timeout=TIMEOUT_SECONDS + 10,
        )
        load = json.loads(send.stdout)

        def sink_stats() -> dict | None:
            try:
                stats = json.loads(stats_file.read_text())
            except (OSError, ValueError):
                return None
            return stats if stats["messages"] >= load["messages_accepted"] else None

        final = wait_until(sink_stats, TIMEOUT_SECONDS, "the sink to receive everything")
        # The stats file is written every second: take the sink's own first-to-last span.
        end_to_end = load["messages_accepted"] / (time.monotonic() - started)
        for spy in spies:
            spy.send_signal(signal.SIGINT)
        for spy in spies:
            spy.wait(30)
        cpu_split = {
            pid: [
                now - before for now, before in zip(cpu_seconds(pid), cpu_before[pid], strict=True)
            ]
            for pid in pids
        }
        cpu = {pid: round(sum(split), 2) for pid, split in cpu_split.items()}
        system_seconds = sum(split[1] for split in cpu_split.values())
        io = {
            pid: [
                round((a - b) / args.messages, 1)
                for a, b in zip(syscalls(pid), io_before[pid], strict=True)
            ]
            for pid in pids
        }
        log_text = (work / "twistd.log").read_text("utf-8", "replace")
        report = {
            "workers": args.workers,
            "messages": args.messages,
            "connections": args.connections,
            "size": args.size,
            "acceptance_msgs_per_s": load["messages_per_second"],
            "acceptance_latency_ms": load["latency_ms"],
            "errors": load["errors"],
            "end_to_end_msgs_per_s": round(end_to_end, 1),
            "sink_rate_msgs_per_s": final.get("messages_per_second"),
            "sink_connections": final.get("connections_total"),
            "cpu_seconds": {"master": cpu[relay.pid], "workers": [cpu[p] for p in workers]},
            "cpu_ms_per_message": round(1000 * sum(cpu.values()) / args.messages, 2),
            "system_cpu_ms_per_message": round(1000 * system_seconds / args.messages, 2),
            "reads_writes_per_message": {
                "master": io[relay.pid],
                "workers": [io[p] for p in workers],
            },
            "peak_rss_mb": [round(peak_rss_mb(p), 1) for p in pids],
            "tracebacks": len(re.findall("Traceback", log_text)),
        }
        print(json.dumps(report))
    finally:
        for spy in spies:
            if spy.poll() is None:
                spy.kill()
        for proc in (relay, sink):
            stop_process(proc, timeout_seconds=15)
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
