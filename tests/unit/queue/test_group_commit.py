"""Group commit: batching directory fsyncs, driven by hand-fired thread results."""

from __future__ import annotations

from twisted.internet.defer import Deferred

from twistedrelay.queue.group_commit import GroupCommitter, SerialBatcher


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
            function()
            done.callback(None)
        else:
            done.errback(error)


def _committer():
    threads = ManualThreads()
    synced: list[str] = []
    return GroupCommitter(threads.run, synced.append), threads, synced


def _results(deferreds):
    results: list[object] = []
    for d in deferreds:
        d.addBoth(results.append)
    return results


def test_a_lone_caller_starts_a_sync_at_once():
    """When idle, a request starts a directory fsync immediately (no added delay)."""
    committer, threads, synced = _committer()
    results = _results([committer.sync_after_rename("/q/incoming")])
    assert len(threads.jobs) == 1
    threads.finish_next()
    assert synced == ["/q/incoming"]
    assert results == [None]
    assert committer.directory_syncs == 1


def test_callers_arriving_during_a_sync_share_the_next_one():
    """Requests made while a sync runs wait for one more sync, which covers them all."""
    committer, threads, synced = _committer()
    first = _results([committer.sync_after_rename("/q/incoming")])
    later = _results([committer.sync_after_rename("/q/incoming") for _ in range(10)])
    assert len(threads.jobs) == 1, "no second sync while one runs"
    threads.finish_next()
    assert first == [None]
    assert later == [], "the running sync may predate their renames"
    assert len(threads.jobs) == 1
    threads.finish_next()
    assert later == [None] * 10
    assert committer.directory_syncs == 2
    assert committer.renames_synced == 11


def test_directories_are_synced_independently():
    """A sync of hold/ does not make a rename into incoming/ durable."""
    committer, threads, synced = _committer()
    incoming = _results([committer.sync_after_rename("/q/incoming")])
    hold = _results([committer.sync_after_rename("/q/hold")])
    assert len(threads.jobs) == 2
    threads.finish_next()
    threads.finish_next()
    assert synced == ["/q/incoming", "/q/hold"]
    assert incoming == [None] and hold == [None]


def test_a_failed_sync_fails_its_batch_and_the_next_batch_still_runs():
    """An fsync error reaches every caller it covered; later callers get a fresh sync."""
    committer, threads, _ = _committer()
    failed = _results([committer.sync_after_rename("/q/incoming") for _ in range(3)])
    later = _results([committer.sync_after_rename("/q/incoming")])
    threads.finish_next(OSError(5, "Input/output error"))
    assert len(failed) == 1, "the first caller started the sync alone"
    assert failed[0].check(OSError)
    threads.finish_next()
    assert failed[1:] == [None, None]
    assert later == [None]


def test_a_request_from_a_callback_is_not_lost():
    """A caller that asks again from its callback gets served by a later sync."""
    committer, threads, _ = _committer()
    second: list[object] = []

    def again(_):
        committer.sync_after_rename("/q/incoming").addBoth(second.append)

    committer.sync_after_rename("/q/incoming").addCallback(again)
    threads.finish_next()
    assert len(threads.jobs) == 1
    threads.finish_next()
    assert second == [None]


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
