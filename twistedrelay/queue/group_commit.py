"""Group commit: one directory fsync makes many renames durable at once.

Owns the batching of directory fsyncs across concurrent SMTP sessions. A rename into
incoming/ is durable only once the directory itself is fsync'd; that fsync costs a journal
commit (milliseconds on a real disk), and it covers every rename made in the directory
before it started. So callers that renamed an entry ask for a sync of the directory, and:

- when no sync of that directory is running, one starts at once in a pool thread and
  covers this caller;
- when one is running, the caller waits for the *next* one (the running sync may have
  started before the caller's rename, so it proves nothing for it). Everyone who arrives
  while a sync runs shares that next sync.

Invariant: a caller's Deferred fires only after a directory fsync that *started* after
the caller asked, i.e. after its rename; it errbacks (with the fsync's error) otherwise.
Under load this makes one fsync per batch instead of one per message; idle, it adds no
delay. File fsyncs are not batched here: they run in parallel pool threads, and the file
system's journal batches them itself.

SerialBatcher does the same for work nobody must wait for before replying (removing
delivered entries): one pool job per batch instead of one per item.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

_Item = TypeVar("_Item")


class _DirectoryBatch:
    """Sync state of one directory: is a sync running, and who waits for the next one."""

    __slots__ = ("running", "waiting")

    def __init__(self) -> None:
        self.running = False
        self.waiting: list[Deferred[None]] = []


class GroupCommitter:
    """Shares directory fsyncs between the callers that renamed into a directory.

    :param run_in_thread: runs a function in a pool thread and returns a Deferred of its
        result (e.g. ``partial(deferToThreadPool, reactor, pool)``); never blocks the caller.
    :param sync_directory: fsyncs a directory given its path (runs in the pool thread).
    """

    def __init__(
        self,
        run_in_thread: Callable[[Callable[[], None]], Deferred[None]],
        sync_directory: Callable[[str], None],
    ) -> None:
        self._run_in_thread = run_in_thread
        self._sync_directory = sync_directory
        self._batches: dict[str, _DirectoryBatch] = {}
        #: Directory fsyncs started so far (tests and benchmarks read it).
        self.directory_syncs = 0
        #: Callers whose rename a directory fsync made durable so far.
        self.renames_synced = 0

    def sync_after_rename(self, directory: str) -> Deferred[None]:
        """Return a Deferred that fires once a rename already done in ``directory`` is durable.

        :param directory: the directory the caller renamed a file into.
        :returns: fires with None after a directory fsync that started after this call;
            errbacks with that fsync's error (an OSError) if it failed.
        """
        batch = self._batches.get(directory)
        if batch is None:
            batch = self._batches[directory] = _DirectoryBatch()
        waiter: Deferred[None] = Deferred()
        batch.waiting.append(waiter)
        if not batch.running:
            self._start(directory, batch)
        return waiter

    def _start(self, directory: str, batch: _DirectoryBatch) -> None:
        """Start one fsync covering everyone waiting now."""
        covered, batch.waiting = batch.waiting, []
        batch.running = True
        self.directory_syncs += 1
        synced = self._run_in_thread(lambda: self._sync_directory(directory))
        synced.addBoth(self._finished, directory, batch, covered)

    def _finished(
        self,
        result: None | Failure,
        directory: str,
        batch: _DirectoryBatch,
        covered: list[Deferred[None]],
    ) -> None:
        """Start the next batch if anyone arrived meanwhile, then release this batch."""
        batch.running = False
        if batch.waiting:
            self._start(directory, batch)
        if isinstance(result, Failure):
            for waiter in covered:
                waiter.errback(result)
        else:
            self.renames_synced += len(covered)
            for waiter in covered:
                waiter.callback(None)


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
