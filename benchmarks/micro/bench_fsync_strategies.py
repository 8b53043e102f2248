"""Durable files per second on this disk, by the way a batch of new files is flushed.

Run: ``.venv/bin/python benchmarks/micro/bench_fsync_strategies.py [--directory DIR]
[--files 3000] [--strategies fdatasync,recycle] [--in-queue FILES]``

One thread creates 1,200-byte files in DIR/tmp in batches, makes them durable, renames them
into DIR/q and fsyncs DIR/q once per batch; files renamed two batches earlier (or, with
``--in-queue N``, once N newer files are in DIR/q) are unlinked (a spool's steady create
and delete). Strategies:

- ``fdatasync``: per file write, fdatasync, rename (what the relay's commit lane does);
- ``sync_file_range``: start writeback of every file of the batch
  (``SYNC_FILE_RANGE_WRITE``), then fdatasync each and rename: one journal commit can
  cover the batch's block allocations;
- ``syncfs``: write every file, one ``syncfs()`` of the file system, rename every file;
- ``recycle``: as fdatasync, but a removed file is renamed back to DIR/tmp and the next
  file overwrites it (write, ftruncate, fdatasync) instead of creating one: the relay's
  spare files (twistedrelay/queue/spares.py).

Prints files/s and the CPU microseconds (user, system) per file for batches of 1, 10 and
30. Linux only (ctypes calls into libc for sync_file_range and syncfs).

Measured on the 2-core development VM (ext4 on virtio, PERFORMANCE.md round 4), batch 10:
fdatasync 2,279 files/s (24 µs user, 181 µs system per file), sync_file_range 3,485 (18,
123), syncfs 5,463 (7, 82). In the relay under load the differences shrank: CPU per
message 1.055 (fdatasync), 1.098 (sync_file_range), 0.967 ms (syncfs), alternating runs.
Round 6 (``--strategies fdatasync,recycle --in-queue 1000 --files 20000``, batch 10):
see PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import shutil
import tempfile
import time

_libc = ctypes.CDLL(None, use_errno=True)
_SYNC_FILE_RANGE_WRITE = 2
_DATA = os.urandom(1200)


def _check(result: int, what: str) -> None:
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")


def _run(base: str, strategy: str, batch: int, total: int, in_queue: int) -> str:
    tmp, queue = os.path.join(base, "tmp"), os.path.join(base, "q")
    os.makedirs(tmp)
    os.makedirs(queue)
    queue_fd = os.open(queue, os.O_RDONLY | os.O_DIRECTORY)
    renamed: list[str] = []
    spares: list[str] = []
    usage_before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for first in range(0, total, batch):
        names = [f"m{first + i}" for i in range(batch)]
        fds = []
        for name in names:
            if spares:
                source = os.path.join(tmp, spares.pop())
                fd = os.open(source, os.O_WRONLY)
                os.write(fd, _DATA)
                os.ftruncate(fd, len(_DATA))
            else:
                source = os.path.join(tmp, name)
                fd = os.open(source, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.write(fd, _DATA)
            if strategy in ("fdatasync", "recycle"):
                os.fdatasync(fd)
                os.close(fd)
                os.rename(source, os.path.join(queue, name))
            else:
                fds.append(fd)
        if strategy == "sync_file_range":
            for fd in fds:
                range_start, range_length = ctypes.c_longlong(0), ctypes.c_longlong(0)
                _check(
                    _libc.sync_file_range(fd, range_start, range_length, _SYNC_FILE_RANGE_WRITE),
                    "sync_file_range",
                )
            for fd in fds:
                os.fdatasync(fd)
        elif strategy == "syncfs":
            _check(_libc.syncfs(queue_fd), "syncfs")
        for fd in fds:
            os.close(fd)
        if strategy not in ("fdatasync", "recycle"):
            for name in names:
                os.rename(os.path.join(tmp, name), os.path.join(queue, name))
        os.fsync(queue_fd)
        renamed.extend(names)
        while len(renamed) > (in_queue or 2 * batch):
            name = renamed.pop(0)
            if strategy == "recycle":
                os.rename(os.path.join(queue, name), os.path.join(tmp, "spare-" + name))
                spares.append("spare-" + name)
            else:
                os.unlink(os.path.join(queue, name))
    elapsed = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    os.close(queue_fd)
    user = (usage.ru_utime - usage_before.ru_utime) / total * 1e6
    system = (usage.ru_stime - usage_before.ru_stime) / total * 1e6
    return (
        f"{strategy:16s} batch {batch:3d}: {total / elapsed:7.0f} files/s, "
        f"{user:4.0f} µs user, {system:4.0f} µs system per file"
    )


def main() -> None:
    """Run every strategy and batch size in a fresh directory each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--directory", default=None, help="on the disk to measure")
    parser.add_argument("--files", type=int, default=3000)
    parser.add_argument("--strategies", default="fdatasync,sync_file_range,syncfs,recycle")
    parser.add_argument(
        "--in-queue", type=int, default=0, help="files in the queue (0: two batches)"
    )
    args = parser.parse_args()
    for strategy in args.strategies.split(","):
        for batch in (1, 10, 30):
            base = tempfile.mkdtemp(prefix="fsync-bench-", dir=args.directory)
            try:
                print(_run(base, strategy, batch, args.files, args.in_queue), flush=True)
            finally:
                shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
