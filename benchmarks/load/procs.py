"""Processes of a benchmark run: start them in their own session, measure them, stop them by PID.

CPU and memory come from /proc (proc(5)), so the harness measures the relay and Postfix the
same way without instrumenting either. A process tree is a root PID and every process whose
parent chain leads to it. Its CPU time is the sum of utime+stime+cutime+cstime over the
tree: a child that exited and was reaped moves its time into its parent's cutime/cstime,
so a delta between two samples counts every process of the window once (Postfix's smtpd
and cleanup processes come and go during a run).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class ProcStat:
    """The fields of /proc/PID/stat the harness uses."""

    pid: int
    ppid: int
    pgid: int
    comm: str
    state: str
    cpu_ticks: int  # utime + stime + cutime + cstime
    start_ticks: int  # start time since boot: with the PID, a process's identity


def read_stat(pid: int) -> ProcStat | None:
    """The stat of one process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name is in parentheses and may hold spaces: split after the last ")".
    comm = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state) of proc(5): ppid 4, pgrp 5, utime 14 .. cstime 17, starttime 22.
    cpu = sum(int(value) for value in fields[11:15])
    return ProcStat(pid, int(fields[1]), int(fields[2]), comm, fields[0], cpu, int(fields[19]))


def all_stats() -> dict[int, ProcStat]:
    """The stat of every process on the machine, by PID."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = read_stat(int(entry))
            if stat is not None:
                stats[stat.pid] = stat
    return stats


def process_tree(root: int, stats: dict[int, ProcStat] | None = None) -> list[ProcStat]:
    """``root`` and all its living descendants (an empty list when ``root`` is gone)."""
    stats = all_stats() if stats is None else stats
    if root not in stats:
        return []
    children: dict[int, list[int]] = {}
    for stat in stats.values():
        children.setdefault(stat.ppid, []).append(stat.pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(stats[pid])
        todo.extend(children.get(pid, ()))
    return found


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds (user + system, reaped children included) used so far by ``root``'s tree."""
    return sum(stat.cpu_ticks for stat in process_tree(root)) / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs have spent busy (not idle or iowait) since boot, from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = [int(value) for value in fields[:8]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / CLOCK_TICKS


def _status_kb(pid: int, keys: Sequence[str]) -> dict[str, int]:
    """Some ``VmXXX: N kB`` lines of /proc/PID/status."""
    values = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key in keys:
                    values[key] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError, IndexError):
        pass
    return values


def cmdline(pid: int) -> list[str]:
    """The arguments of a process (empty when it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


class ResourceSampler:
    """Polls a process tree in a thread: peak RSS per process and of the whole tree.

    The tree's sum of VmRSS counts shared pages (libraries, program text) once per process,
    which inflates it for Postfix's hundreds of identical smtpd processes; the sum of
    RssAnon (private anonymous memory: heaps, stacks) is the fairer total.

    :param root: returns the tree's root PID (0 while unknown).
    :param role: names a process from its stat and arguments (e.g. "worker 1", "smtpd");
        peaks are reported per role as the largest of that role's processes.
    :param interval_seconds: time between polls.
    """

    def __init__(
        self,
        root: Callable[[], int],
        role: Callable[[ProcStat, list[str]], str],
        interval_seconds: float = 0.25,
    ) -> None:
        self._root = root
        self._role = role
        self._interval = interval_seconds
        self._roles: dict[tuple[int, int], str] = {}
        self._peak_kb: dict[tuple[int, int], int] = {}
        self.tree_rss_peak_kb = 0
        self.tree_anon_peak_kb = 0
        self.most_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="resource-sampler", daemon=True)

    def start(self) -> None:
        """Start polling."""
        self._thread.start()

    def stop(self) -> None:
        """Poll once more and stop (bounded wait for the thread)."""
        self._stop.set()
        self._thread.join(10.0)
        self.sample()

    def _run(self) -> None:
        pause = self._interval
        while not self._stop.wait(pause):
            began = time.monotonic()
            self.sample()
            # Reading 1,000 processes' files costs CPU the systems under test need: keep the
            # sampler under a tenth of one core.
            pause = max(self._interval, 10 * (time.monotonic() - began))

    def sample(self) -> None:
        """Read VmHWM/VmRSS of every process of the tree once."""
        root = self._root()
        if not root:
            return
        total = anon = 0
        members = process_tree(root)
        self.most_processes = max(self.most_processes, len(members))
        for stat in members:
            key = (stat.pid, stat.start_ticks)
            if key not in self._roles:
                self._roles[key] = self._role(stat, cmdline(stat.pid))
            values = _status_kb(stat.pid, ("VmHWM", "VmRSS", "RssAnon"))
            total += values.get("VmRSS", 0)
            anon += values.get("RssAnon", 0)
            peak = max(values.get("VmHWM", 0), values.get("VmRSS", 0))
            self._peak_kb[key] = max(self._peak_kb.get(key, 0), peak)
        self.tree_rss_peak_kb = max(self.tree_rss_peak_kb, total)
        self.tree_anon_peak_kb = max(self.tree_anon_peak_kb, anon)

    def summary(self) -> dict[str, Any]:
        """Peaks in MB: per role (largest process of the role), largest process, whole tree."""
        by_role: dict[str, int] = {}
        for key, peak in self._peak_kb.items():
            role = self._roles[key]
            by_role[role] = max(by_role.get(role, 0), peak)
        return {
            "peak_rss_mb_by_role": {
                role: round(kb / 1024, 1) for role, kb in sorted(by_role.items())
            },
            "max_process_peak_rss_mb": round(max(by_role.values(), default=0) / 1024, 1),
            "largest_role": max(by_role, key=by_role.__getitem__, default=""),
            "tree_rss_peak_mb": round(self.tree_rss_peak_kb / 1024, 1),
            "tree_anon_rss_peak_mb": round(self.tree_anon_peak_kb / 1024, 1),
            "processes_seen": len(self._peak_kb),
            "most_processes_at_once": self.most_processes,
        }


def start_process(
    argv: Sequence[str],
    *,
    cwd: Path,
    stdout: IO[Any] | int | None = None,
    stderr: IO[Any] | int | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new session, so that it and its children form one process group."""
    return subprocess.Popen(
        list(argv),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        env=env,
        start_new_session=True,
    )


def stop_process(
    proc: subprocess.Popen[bytes], timeout_seconds: float = 20.0, sig: int = signal.SIGTERM
) -> int | None:
    """Signal the process by PID, wait (bounded), then SIGKILL its whole process group.

    :returns: its exit status, or None when it had to be killed.
    """
    status = proc.poll()
    if status is None:
        try:
            proc.send_signal(sig)
            status = proc.wait(timeout_seconds)
        except subprocess.TimeoutExpired:
            status = None
    # Its session's group may still hold children (workers) that outlived it.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(10.0)
    except subprocess.TimeoutExpired:
        pass
    return status


def kill_leftovers(snapshot: Iterable[ProcStat]) -> list[int]:
    """SIGKILL every process of ``snapshot`` still alive (same PID and start time).

    :returns: the PIDs that were killed.
    """
    killed = []
    for old in snapshot:
        now = read_stat(old.pid)
        if now is not None and now.start_ticks == old.start_ticks and now.state not in "ZX":
            try:
                os.kill(old.pid, signal.SIGKILL)
                killed.append(old.pid)
            except ProcessLookupError:
                pass
    return killed


def wait_until(condition: Callable[[], Any], timeout_seconds: float, interval: float = 0.05) -> Any:
    """Poll ``condition`` until it is truthy (its value) or ``timeout_seconds`` pass (None)."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)
