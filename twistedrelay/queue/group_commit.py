"""Group commit: commits run in batches, one pool job and one directory fsync per batch.

Owns the batching of the accept path's disk work across concurrent SMTP sessions. Making a
new entry durable costs a file create + write + fdatasync + rename, then a fsync of the
directory renamed into (DESIGN.md "The queue on disk"). Doing each in its own pool job
costs a thread hand-off per step (a queue put, a Condition wake-up, a ``callFromThread``
and its waker write) and the GIL traffic that comes with them: about 50 futex calls per
message. So CommitBatcher hands pending commits to a few *lanes*:

- when a lane is free, a commit starts at once in a pool job (idle, this adds no delay);
- when every lane is busy, commits wait; a lane that finishes takes its share of them
  (at most ``ceil(pending / lanes)``, so the lanes stay balanced) in one job;
- one job writes, fdatasyncs and renames each of its commits one after another, then
  waits for a fsync of each directory it renamed into that started after its renames,
  and reports every outcome at once;
- lanes share directory fsyncs (SharedDirectorySync): while one runs, the lanes that
  finish their renames wait for the next one, which covers them all.

A batch of N commits thus costs one hand-off each way and a share of a directory fsync.
One lane is the default: every pool thread that makes a system call must take the GIL back
afterwards (three futex calls, and up to the 5 ms switch interval while the reactor thread
runs Python), so fewer threads doing the accept path's five system calls per message beat
more parallel fdatasyncs. With 2 workers (two lanes in all) the relay accepted 935-1156
msg/s with one lane per worker, 745-895 with two, 524-963 before batching
(benchmarks/PERFORMANCE.md, round 2). More lanes help only where the disk, not the CPU,
is the limit.

Invariant: a commit's Deferred fires only after its file was fdatasync'd and renamed and a
fsync of the directory *started after that rename* succeeded (the same thread does both in
that order). When the directory fsync fails, every commit it covered errbacks with that
error and its renamed entry is removed (best effort): the client gets 4xx and retries, so
keeping the entry would deliver the message twice.

SerialBatcher does the same for work nobody must wait for before replying (removing
delivered entries): one pool job per batch instead of one per item.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, Generic, Protocol, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

_Item = TypeVar("_Item")

#: Concurrent commit jobs (lanes) per store; see the module docstring for why one.
DEFAULT_COMMIT_LANES: Final = 1


class DirectoryOps(Protocol):
    """The two file-system calls a batch needs after its renames (incoming.FileSystem)."""

    def sync_directory(self, path: str) -> None:
        """Make the directory's entries (renames into it) durable."""

    def remove(self, path: str) -> None:
        """Remove a file that may already be gone."""


class SharedDirectorySync:
    """Directory fsyncs shared between pool threads (group commit inside the pool).

    A thread that renamed into a directory calls sync_after_rename(): if no fsync of that
    directory runs, it runs one itself; if one runs, it waits for the *next* one (the
    running one may have started before its rename), which the first waiter to wake runs
    for everyone waiting. Blocking is fine: callers are pool threads.

    :param sync_directory: fsyncs a directory given its path.
    """

    def __init__(self, sync_directory: Callable[[str], None]) -> None:
        self._sync_directory = sync_directory
        self._lock = threading.Condition()
        self._directories: dict[str, _DirectoryState] = {}
        #: Directory fsyncs done so far (read it from the reactor thread: a plain int).
        self.syncs = 0

    def sync_after_rename(self, directory: str) -> None:
        """Return once a fsync of ``directory`` that started after this call succeeded.

        :raises OSError: that fsync failed.
        """
        with self._lock:
            state = self._directories.get(directory)
            if state is None:
                state = self._directories[directory] = _DirectoryState()
            # Syncs are numbered; the one numbered started + 1 starts after this call.
            needed = state.started + 1
            while state.finished < needed:
                if state.running:
                    self._lock.wait()
                    continue
                state.running = True
                state.started += 1
                number = state.started
                self._lock.release()
                error: OSError | None = None
                try:
                    self._sync_directory(directory)
                except OSError as failed:
                    error = failed
                finally:
                    self._lock.acquire()
                state.running = False
                state.finished = number
                self.syncs += 1
                if error is not None:
                    state.errors[number] = error
                    for old in [n for n in state.errors if n < number - 1000]:
                        del state.errors[old]  # nobody waits for those any more
                self._lock.notify_all()
            error = state.errors.get(needed)
        if error is not None:
            raise error


class _DirectoryState:
    """Sync state of one directory: numbered fsyncs started and finished, failures."""

    __slots__ = ("errors", "finished", "running", "started")

    def __init__(self) -> None:
        self.started = 0
        self.finished = 0
        self.running = False
        self.errors: dict[int, OSError] = {}


@dataclass(slots=True)
class _Commit:
    """One pending commit: its pool-thread work and who waits for it."""

    work: Callable[[], None]
    directory: str
    destination: str
    waiter: Deferred[None]


#: What a batch job returns: one error (or None) per commit.
_Outcomes = list[Exception | None]


class CommitBatcher:
    """Runs the accept path's commits in batches on a few lanes; see the module docstring.

    :param run_in_thread: runs a function in a pool thread and returns a Deferred of its
        result (e.g. ``partial(deferToThreadPool, reactor, pool)``); never blocks the caller.
    :param filesystem: syncs directories and removes entries whose directory fsync failed
        (called in the pool thread).
    :param lanes: how many batch jobs may run at once.
    """

    def __init__(
        self,
        run_in_thread: Callable[[Callable[[], Any]], Deferred[Any]],
        filesystem: DirectoryOps,
        lanes: int = DEFAULT_COMMIT_LANES,
    ) -> None:
        if lanes < 1:
            raise ValueError(f"a commit batcher needs at least one lane, not {lanes}")
        self._run_in_thread = run_in_thread
        self._fs = filesystem
        self._directories = SharedDirectorySync(filesystem.sync_directory)
        self._lanes = lanes
        self._pending: list[_Commit] = []
        self._running = 0
        #: Batch jobs started so far (tests and benchmarks read it).
        self.batches = 0
        #: Commits a directory fsync made durable so far.
        self.renames_synced = 0

    @property
    def directory_syncs(self) -> int:
        """Directory fsyncs done so far."""
        return self._directories.syncs

    def commit(self, work: Callable[[], None], directory: str, destination: str) -> Deferred[None]:
        """Run ``work`` in a batch, then fsync ``directory``; fire once both are done.

        :param work: runs in a pool thread: writes, fdatasyncs and renames the entry to
            ``destination`` (inside ``directory``); raises when that failed, after cleaning
            up its own partial file.
        :param directory: the directory ``work`` renames into.
        :param destination: the entry's path after the rename (removed if the directory
            fsync fails).
        :returns: fires with None once the rename is durable; errbacks with the
            exception of ``work`` or of the directory fsync.
        """
        waiter: Deferred[None] = Deferred()
        self._pending.append(_Commit(work, directory, destination, waiter))
        self._start_batches()
        return waiter

    def _start_batches(self) -> None:
        while self._pending and self._running < self._lanes:
            share = -(-len(self._pending) // self._lanes)  # ceil: balanced lanes
            batch, self._pending = self._pending[:share], self._pending[share:]
            self._running += 1
            self.batches += 1
            done = self._run_in_thread(partial(self._run_batch, batch))
            done.addBoth(self._finished, batch)

    def _run_batch(self, batch: list[_Commit]) -> _Outcomes:
        """Pool job: every commit's work in order, then one fsync per directory."""
        outcomes: list[Exception | None] = []
        renamed: dict[str, list[int]] = {}
        for index, item in enumerate(batch):
            try:
                item.work()
            except Exception as error:  # reported to this commit's caller only
                outcomes.append(error)
            else:
                outcomes.append(None)
                renamed.setdefault(item.directory, []).append(index)
        for directory, indices in renamed.items():
            try:
                self._directories.sync_after_rename(directory)
            except OSError as error:
                for index in indices:
                    outcomes[index] = error
                    try:
                        self._fs.remove(batch[index].destination)
                    except OSError:
                        pass  # best effort: the reply is 4xx either way
        return outcomes

    def _finished(self, result: _Outcomes | Failure, batch: list[_Commit]) -> None:
        """Free the lane, start waiting commits, then tell each caller its outcome."""
        self._running -= 1
        self._start_batches()
        if isinstance(result, Failure):
            for item in batch:
                item.waiter.errback(result)
            return
        for item, error in zip(batch, result, strict=True):
            if error is None:
                self.renames_synced += 1
                item.waiter.callback(None)
            else:
                item.waiter.errback(Failure(error))


class SerialBatcher(Generic[_Item]):
    """Runs work on items in pool threads, one batch at a time, each batch in one thread job.

    For cheap file-system calls that must stay off the reactor thread (an unlink waits for
    the file system's journal while fsyncs run: milliseconds under load) but that do not
    deserve one thread hop each: items added while a batch runs wait for the next one, so
    under load one job handles many items, and idle it adds no delay.

    :param run_in_thread: as for GroupCommitter.
    :param process: handles one batch of items in the pool thread; it must not raise (it
        logs what failed), since nobody may be waiting for its outcome.
    """

    def __init__(
        self,
        run_in_thread: Callable[[Callable[[], None]], Deferred[None]],
        process: Callable[[list[_Item]], None],
    ) -> None:
        self._run_in_thread = run_in_thread
        self._process = process
        self._items: list[_Item] = []
        self._waiting: list[Deferred[None]] = []
        self._running = False
        #: Batches started so far (tests and benchmarks read it).
        self.batches = 0

    def add(self, item: _Item) -> Deferred[None]:
        """Queue ``item``; the Deferred fires once the batch holding it has been processed."""
        waiter: Deferred[None] = Deferred()
        self._items.append(item)
        self._waiting.append(waiter)
        if not self._running:
            self._start()
        return waiter

    def _start(self) -> None:
        items, self._items = self._items, []
        covered, self._waiting = self._waiting, []
        self._running = True
        self.batches += 1
        done = self._run_in_thread(lambda: self._process(items))
        done.addBoth(self._finished, covered)

    def _finished(self, result: None | Failure, covered: list[Deferred[None]]) -> None:
        self._running = False
        if self._items:
            self._start()
        for waiter in covered:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(None)
