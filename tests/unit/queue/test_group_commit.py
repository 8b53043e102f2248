"""Group commit: batched commits and directory fsyncs, driven by hand-fired thread jobs."""

from __future__ import annotations

import threading

import pytest
from twisted.internet.defer import Deferred

from twistedrelay.queue.group_commit import CommitBatcher, SerialBatcher, SharedDirectorySync


class ManualThreads:
    """Stands in for the thread pool: runs nothing until the test finishes a job."""

    def __init__(self) -> None:
        self.jobs: list[tuple[object, Deferred[None]]] = []

    def run(self, function):
        done: Deferred[None] = Deferred()
        self.jobs.append((function, done))
        return done

    def finish_next(self, error: BaseException | None = None) -> None:
        function, done = self.jobs.pop(0)
        if error is None:
            done.callback(function())
        else:
            done.errback(error)


class RecordingDirectories:
    """Stands in for the file system's directory calls; can fail the next sync."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.fail_next_sync: OSError | None = None

    def sync_directory(self, path: str) -> None:
        if self.fail_next_sync is not None:
            error, self.fail_next_sync = self.fail_next_sync, None
            raise error
        self.events.append("sync " + path)

    def remove(self, path: str) -> None:
        self.events.append("remove " + path)


def _batcher(lanes: int = 2):
    threads = ManualThreads()
    directories = RecordingDirectories()
    return CommitBatcher(threads.run, directories, lanes), threads, directories


def _commit(batcher, name: str, events: list[str], error: Exception | None = None):
    def work() -> None:
        if error is not None:
            raise error
        events.append("rename " + name)

    return batcher.commit(work, "/q/incoming", "/q/incoming/" + name)


def _results(deferreds):
    results: list[object] = []
    for d in deferreds:
        d.addBoth(results.append)
    return results


def test_a_lone_commit_starts_a_batch_at_once_and_syncs_after_its_rename():
    """Idle, a commit runs at once: its work, then the directory fsync, then it fires."""
    batcher, threads, directories = _batcher()
    results = _results([_commit(batcher, "A", directories.events)])
    assert len(threads.jobs) == 1
    assert results == []
    threads.finish_next()
    assert directories.events == ["rename A", "sync /q/incoming"]
    assert results == [None]
    assert (batcher.batches, batcher.directory_syncs, batcher.renames_synced) == (1, 1, 1)


def test_commits_waiting_for_busy_lanes_are_shared_out_as_lanes_free_up():
    """With every lane busy, waiting commits are split over the lanes as they free up."""
    batcher, threads, directories = _batcher(lanes=2)
    first = _results([_commit(batcher, n, directories.events) for n in "AB"])
    later = _results([_commit(batcher, n, directories.events) for n in "CDEF"])
    assert len(threads.jobs) == 2, "one job per lane, the rest waits"
    threads.finish_next()
    assert len(threads.jobs) == 2, "the freed lane took its share of the waiting commits"
    assert len(threads.jobs[1][0].args[0]) == 2, "a share is ceil(4 waiting / 2 lanes)"
    while threads.jobs:
        threads.finish_next()
    assert first == [None, None]
    assert later == [None] * 4
    assert batcher.batches == 5
    assert directories.events.count("sync /q/incoming") == 5
    assert batcher.renames_synced == 6


def test_a_batch_syncs_each_directory_once_after_all_its_renames():
    """One job renames every commit of the batch before its single directory fsync."""
    batcher, threads, directories = _batcher(lanes=1)
    _commit(batcher, "A", directories.events)
    results = _results([_commit(batcher, n, directories.events) for n in "BCD"])
    threads.finish_next()
    directories.events.clear()
    threads.finish_next()
    assert directories.events == ["rename B", "rename C", "rename D", "sync /q/incoming"]
    assert results == [None] * 3


def test_a_failed_work_fails_only_its_own_commit():
    """An error in one commit's work reaches that caller; the others of the batch land."""
    batcher, threads, directories = _batcher(lanes=1)
    _commit(batcher, "A", directories.events)
    results = _results(
        [
            _commit(batcher, "B", directories.events),
            _commit(batcher, "C", directories.events, OSError(28, "No space left")),
        ]
    )
    threads.finish_next()
    threads.finish_next()
    assert results[0] is None
    assert results[1].check(OSError)
    assert results[1].value.errno == 28


def test_a_failed_directory_sync_fails_and_removes_every_commit_it_covered():
    """No 250 without a directory fsync: its error fails the batch and unlinks the entries."""
    batcher, threads, directories = _batcher(lanes=1)
    directories.fail_next_sync = OSError(5, "Input/output error")
    results = _results([_commit(batcher, "A", directories.events)])
    later = _results([_commit(batcher, n, directories.events) for n in "BC"])
    threads.finish_next()
    assert len(results) == 1 and results[0].check(OSError)
    assert "remove /q/incoming/A" in directories.events
    threads.finish_next()
    assert later == [None, None], "the next batch gets a fresh directory fsync"


def test_a_commit_from_a_callback_is_not_lost():
    """A caller that commits again from its callback is served by a later batch."""
    batcher, threads, directories = _batcher(lanes=1)
    second: list[object] = []

    def again(_):
        _commit(batcher, "B", directories.events).addBoth(second.append)

    _commit(batcher, "A", directories.events).addCallback(again)
    threads.finish_next()
    assert len(threads.jobs) == 1
    threads.finish_next()
    assert second == [None]


def test_a_batcher_needs_a_lane():
    """Zero lanes would never commit anything: refused at construction."""
    with pytest.raises(ValueError):
        CommitBatcher(ManualThreads().run, RecordingDirectories(), 0)


def test_serial_batcher_runs_items_added_during_a_batch_in_one_next_batch():
    """Idle, an item starts a job at once; items added while it runs share one later job."""
    threads = ManualThreads()
    processed: list[list[int]] = []
    batcher = SerialBatcher(threads.run, processed.append)
    first = _results([batcher.add(0)])
    later = _results([batcher.add(n) for n in range(1, 6)])
    assert len(threads.jobs) == 1, "one job at a time"
    threads.finish_next()
    assert processed == [[0]]
    assert first == [None]
    assert later == []
    threads.finish_next()
    assert processed == [[0], [1, 2, 3, 4, 5]]
    assert later == [None] * 5
    assert batcher.batches == 2
    assert threads.jobs == []


def test_pool_threads_share_directory_fsyncs_that_start_after_their_renames():
    """A thread arriving while a fsync runs waits for the next one; it never reuses it."""
    started, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def slow_sync(path: str) -> None:
        calls.append(path)
        if len(calls) == 1:
            started.set()
            assert release.wait(5)

    shared = SharedDirectorySync(slow_sync)
    first = threading.Thread(target=shared.sync_after_rename, args=("/q/incoming",))
    first.start()
    assert started.wait(5)
    returned = threading.Event()

    def second_caller() -> None:
        shared.sync_after_rename("/q/incoming")
        returned.set()

    second = threading.Thread(target=second_caller)
    second.start()
    assert not returned.wait(0.05), "the running fsync may predate the second rename"
    release.set()
    first.join(5)
    second.join(5)
    assert returned.is_set()
    assert calls == ["/q/incoming", "/q/incoming"]
    assert shared.syncs == 2


def test_a_failed_shared_directory_fsync_raises_for_its_caller_only():
    """The fsync's error reaches the thread it covered; the next caller gets a fresh fsync."""
    outcomes = [OSError(5, "Input/output error"), None]

    def sync(path: str) -> None:
        error = outcomes.pop(0)
        if error is not None:
            raise error

    shared = SharedDirectorySync(sync)
    with pytest.raises(OSError):
        shared.sync_after_rename("/q/incoming")
    shared.sync_after_rename("/q/incoming")
    assert shared.syncs == 2
