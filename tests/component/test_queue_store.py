"""QueueStore on real files with the real reactor: accept, group commit, state moves."""

from __future__ import annotations

import os
import stat
import threading
import time

import pytest
import pytest_twisted
from twisted.internet.defer import gatherResults

from twistedrelay.queue.entry import DEFERRED, DELIVERED, EntryStatus, Envelope, Recipient
from twistedrelay.queue.incoming import FOOTER_SIZE, SPILL_BYTES, FileSystem
from twistedrelay.queue.store import QueueStore
from twistedrelay.testing.waiting import wait_until

BODY = (
    b"Received: from client.example.org by relay.example.test\r\n"
    b"Subject: test\r\n\r\n"
    b'{"version":1} looks like a trailer\r\n'
    b"\n#TRQ1 0000000001 000000000000001\n"
    b"last line\r\n"
)


def _envelope(queue_id: str, *recipients: str) -> Envelope:
    recipients = recipients or ("rcpt@example.net",)
    return Envelope(
        queue_id=queue_id,
        sender="sender@example.org",
        recipients=tuple(Recipient(r) for r in recipients),
        arrival_time=time.time(),
        client_address="127.0.0.1",
        client_helo="client.example.org",
        prepend_headers=("X-Hook: yes\r\n",),
    )


@pytest.fixture
def queue_dir(tmp_path):
    directory = str(tmp_path / "queue")
    QueueStore.create(directory)
    return directory


def _open_store(directory, filesystem=None):
    from twisted.internet import reactor

    return QueueStore(directory, reactor, filesystem=filesystem)


@pytest.fixture
def store(queue_dir):
    queue = _open_store(queue_dir)
    yield queue
    queue.close()


async def _queue(store, body=BODY, state="incoming", recipients=()):
    message = store.open_message()
    message.write(body[:10])
    message.write(body[10:])
    await message.commit(_envelope(message.queue_id, *recipients), state)
    return message.queue_id


def _names(directory):
    return sorted(os.listdir(directory))


async def _until(condition):
    """Wait on the reactor until condition() is true, failing after the deadline."""
    from twisted.internet import reactor

    await wait_until(reactor, condition, "the queue files", interval_seconds=0.005)


# The accept path


@pytest_twisted.ensureDeferred
async def test_committed_message_is_in_incoming_with_envelope_and_body(store):
    """A commit leaves one 0600 file in incoming/ that claim() reads back exactly."""
    queue_id = await _queue(store)
    layout = store.layout
    assert _names(layout.incoming) == [queue_id]
    assert _names(layout.tmp) == []
    mode = os.stat(layout.entry_path("incoming", queue_id)).st_mode
    assert stat.S_IMODE(mode) == 0o600
    entry = store.claim(queue_id, "w0", "incoming")
    assert entry is not None
    assert entry.envelope.queue_id == queue_id
    assert entry.envelope.sender == "sender@example.org"
    assert entry.envelope.prepend_headers == ("X-Hook: yes\r\n",)
    assert entry.content_size == len(BODY)
    with entry.open_content() as content:
        assert content.read() == BODY
    with entry.open_content() as content:
        assert b"".join(iter(lambda: content.read(7), b"")) == BODY


@pytest_twisted.ensureDeferred
async def test_commit_claimed_lands_in_active_as_claim_would_read_it(store):
    """commit_claimed() puts the entry straight into active/<owner>/, never in incoming/,
    and hands over the same entry claim() would read back; reclaim() returns it."""
    message = store.open_message()
    message.write(BODY)
    envelope = _envelope(message.queue_id)
    syncs_before = store.group_commit.directory_syncs
    entry = await store.commit_claimed(message, envelope, "w3")
    queue_id = message.queue_id
    assert _names(store.layout.incoming) == []
    assert _names(store.layout.active_directory("w3")) == [queue_id]
    assert store.group_commit.directory_syncs > syncs_before  # the rename is durable
    assert store.counts()["active"] == 1 and store.counts()["incoming"] == 0
    assert entry.path == store.layout.active_path("w3", queue_id)
    assert entry.owner == "w3" and entry.status == EntryStatus()
    assert entry.content == BODY  # still in memory: delivery reads no file
    with entry.open_content() as content:
        assert content.read() == BODY
    with open(entry.path, "rb") as written:
        assert written.read(len(BODY)) == BODY
    assert store.reclaim("w3") == 1
    read_back = store.claim(queue_id, "w3", "incoming")
    assert read_back is not None
    assert (read_back.path, read_back.envelope, read_back.content_size, read_back.status) == (
        entry.path,
        entry.envelope,
        entry.content_size,
        entry.status,
    )


@pytest_twisted.ensureDeferred
async def test_a_message_written_behind_is_read_from_its_file(store):
    """Content past SPILL_BYTES went to the file before commit: the entry holds no copy."""
    message = store.open_message()
    body = b"x" * 1000 + b"\r\n"
    for _ in range(2 * SPILL_BYTES // len(body)):
        message.write(body)
    entry = await store.commit_claimed(message, _envelope(message.queue_id), "w0")
    assert entry.content is None
    with entry.open_content() as content:
        assert content.read() == body * (2 * SPILL_BYTES // len(body))


@pytest_twisted.ensureDeferred
async def test_completing_a_committed_claim_unlinks_only_the_entry(queue_dir):
    """A new queue ID has no sidecar: completion makes one unlink, not a second that fails."""
    removed: list[str] = []

    class Counting(FileSystem):
        def remove(self, path: str) -> None:
            removed.append(path)
            super().remove(path)

    store = _open_store(queue_dir, Counting())
    try:
        message = store.open_message()
        message.write(BODY)
        entry = await store.commit_claimed(message, _envelope(message.queue_id), "w0")
        store.complete(entry)
        assert removed == [entry.path]
        assert store.counts()["active"] == 0
    finally:
        store.close()


@pytest_twisted.ensureDeferred
async def test_envelope_is_a_json_line_before_a_fixed_footer(store):
    """The file is content, one JSON line, then the 34-byte footer naming both sizes."""
    message = store.open_message()
    message.write(BODY)
    envelope = _envelope(message.queue_id)
    await message.commit(envelope)
    with open(store.layout.entry_path("incoming", message.queue_id), "rb") as file:
        raw = file.read()
    assert raw.startswith(BODY)
    footer = raw[-FOOTER_SIZE:]
    trailer = raw[len(BODY) : -FOOTER_SIZE]
    assert footer == b"\n#TRQ1 %010d %015d\n" % (len(trailer), len(BODY))
    assert trailer == envelope.to_json()
    assert b"\n" not in trailer


@pytest_twisted.ensureDeferred
async def test_empty_message_round_trips(store):
    """A message with no content bytes is still a valid entry."""
    queue_id = await _queue(store, body=b"")
    entry = store.claim(queue_id, "w0", "incoming")
    assert entry is not None and entry.content_size == 0
    with entry.open_content() as content:
        assert content.read() == b""


@pytest_twisted.ensureDeferred
async def test_commit_to_hold_lands_in_hold_and_notifies_observers(store):
    """A data hook's hold decision queues the entry to hold/, and observers hear of it."""
    seen = []
    store.add_commit_observer(lambda queue_id, state: seen.append((queue_id, state)))
    store.add_commit_observer(lambda queue_id, state: 1 / 0)  # a broken observer is logged
    held = await _queue(store, state="hold")
    queued = await _queue(store)
    assert _names(store.layout.hold) == [held]
    assert seen == [(held, "hold"), (queued, "incoming")]


class RecordingFileSystem(FileSystem):
    """Records the order of the commit path's OS calls (runs in pool threads)."""

    def __init__(self, directory_delay=0.0):
        self.events = []
        self.lock = threading.Lock()
        self.directory_delay = directory_delay

    def _record(self, event):
        with self.lock:
            self.events.append(event)

    def sync_file(self, file):
        super().sync_file(file)
        self._record("sync_file")

    def rename(self, source, destination):
        super().rename(source, destination)
        self._record("rename")

    def sync_directory(self, path):
        time.sleep(self.directory_delay)
        super().sync_directory(path)
        self._record("sync_directory " + os.path.basename(path))


@pytest_twisted.ensureDeferred
async def test_commit_fires_only_after_file_sync_rename_and_directory_sync(queue_dir):
    """Nothing is acknowledged before fdatasync, rename and a later directory fsync."""
    filesystem = RecordingFileSystem()
    store = _open_store(queue_dir, filesystem)
    try:
        message = store.open_message()
        message.write(BODY)
        committed = message.commit(_envelope(message.queue_id))
        observed = []
        committed.addCallback(lambda _: observed.extend(filesystem.events))
        await committed
        assert observed == ["sync_file", "rename", "sync_directory incoming"]
    finally:
        store.close()


@pytest_twisted.ensureDeferred
async def test_concurrent_commits_all_land_with_fewer_directory_fsyncs(queue_dir):
    """Fifty sessions committing at once share directory fsyncs (group commit)."""
    filesystem = RecordingFileSystem(directory_delay=0.01)
    store = _open_store(queue_dir, filesystem)
    try:
        messages = [store.open_message() for _ in range(50)]
        for number, message in enumerate(messages):
            message.write(b"Subject: %d\r\n\r\nbody\r\n" % number)
        await gatherResults([m.commit(_envelope(m.queue_id)) for m in messages])
        assert _names(store.layout.incoming) == sorted(m.queue_id for m in messages)
        directory_syncs = filesystem.events.count("sync_directory incoming")
        assert directory_syncs == store.group_commit.directory_syncs
        assert directory_syncs < 50
        assert store.group_commit.renames_synced == 50
        assert filesystem.events.count("sync_file") == 50
    finally:
        store.close()


@pytest_twisted.ensureDeferred
async def test_small_message_touches_no_file_before_commit(store):
    """Content under SPILL_BYTES stays in memory: no file I/O in the reactor thread."""
    message = store.open_message()
    message.write(BODY)
    assert _names(store.layout.tmp) == []
    await message.discard()
    assert _names(store.layout.tmp) == []


@pytest_twisted.ensureDeferred
async def test_large_message_is_written_behind_and_round_trips(store):
    """A body past SPILL_BYTES goes to tmp/ during DATA and reads back byte for byte."""
    message = store.open_message()
    body = b"".join(b"line %06d\r\n" % n for n in range(3 * SPILL_BYTES // 13))
    for offset in range(0, len(body), 1000):
        message.write(body[offset : offset + 1000])
    await _until(lambda: _names(store.layout.tmp) == [message.queue_id])
    await message.commit(_envelope(message.queue_id))
    entry = store.claim(message.queue_id, "w0", "incoming")
    assert entry.content_size == len(body) == message.size
    with entry.open_content() as content:
        assert content.read() == body


@pytest_twisted.ensureDeferred
async def test_read_back_sees_every_byte_before_and_after_write_behind(store):
    """A data hook reads the whole content, whether it is in memory, in flight or on disk."""
    message = store.open_message()
    body = bytes(range(256)) * (5 * SPILL_BYTES // 256) + b"tail"
    pieces = [body[offset : offset + 4096] for offset in range(0, len(body), 4096)]
    for piece in pieces[: len(pieces) // 2]:
        message.write(piece)
    half = b"".join(pieces[: len(pieces) // 2])
    assert message.read_back() == half, "right after writing, pieces are still in flight"
    await _until(lambda: _names(store.layout.tmp) == [message.queue_id])
    for piece in pieces[len(pieces) // 2 :]:
        message.write(piece)
    assert message.read_back() == body
    await message.commit(_envelope(message.queue_id))
    with pytest.raises(RuntimeError):
        message.read_back()
    entry = store.claim(message.queue_id, "w0", "incoming")
    with entry.open_content() as content:
        assert content.read() == body


@pytest_twisted.ensureDeferred
async def test_discard_removes_the_written_behind_tmp_file(store):
    """A reset or rejected transaction leaves nothing behind."""
    message = store.open_message()
    message.write(b"x" * (2 * SPILL_BYTES))
    await _until(lambda: _names(store.layout.tmp) == [message.queue_id])
    await message.discard()
    await message.discard()
    assert _names(store.layout.tmp) == []
    with pytest.raises(RuntimeError):
        message.write(b"more")


@pytest_twisted.ensureDeferred
async def test_discard_after_commit_does_nothing(store):
    """A late discard (e.g. the connection dropped) never removes a queued entry."""
    message = store.open_message()
    message.write(BODY)
    await message.commit(_envelope(message.queue_id))
    message.discard()
    assert _names(store.layout.incoming) == [message.queue_id]
    with pytest.raises(RuntimeError):
        message.commit(_envelope(message.queue_id))


def test_programming_errors_are_refused_at_once(store):
    """Bad IDs, a foreign envelope or an unknown state raise instead of queueing."""
    with pytest.raises(ValueError):
        store.open_message("../etc/passwd")
    message = store.open_message(store.new_queue_id())
    with pytest.raises(ValueError):
        message.commit(_envelope(store.new_queue_id()))
    with pytest.raises(ValueError):
        message.commit(_envelope(message.queue_id), "deferred")
    message.discard()


def test_store_refuses_a_directory_that_was_not_created(tmp_path):
    """Workers never silently create a second queue somewhere else."""
    from twisted.internet import reactor

    with pytest.raises(FileNotFoundError):
        QueueStore(str(tmp_path / "nowhere"), reactor)


# The delivery side


@pytest_twisted.ensureDeferred
async def test_claim_is_exclusive(store):
    """The first claim moves the entry to active/<owner>/; a second claim gets None."""
    queue_id = await _queue(store)
    entry = store.claim(queue_id, "w0", "incoming")
    assert entry is not None
    assert entry.path == store.layout.active_path("w0", queue_id)
    assert entry.status == EntryStatus()
    assert store.claim(queue_id, "w1", "incoming") is None
    assert _names(store.layout.incoming) == []


@pytest_twisted.ensureDeferred
async def test_scan_incoming_lists_oldest_first(store):
    """IDs come back in arrival order."""
    queued = [await _queue(store) for _ in range(5)]
    assert store.scan_incoming() == queued


@pytest_twisted.ensureDeferred
async def test_mark_deferred_records_status_and_next_attempt(store):
    """A deferred entry sits in deferred/ with mtime = next attempt, its status kept."""
    queue_id = await _queue(store, recipients=("a@example.net", "b@example.net"))
    entry = store.claim(queue_id, "w0", "incoming")
    status = (
        entry.status.with_attempt(time.time())
        .with_outcome("a@example.net", DELIVERED, "250 2.0.0 Ok")
        .with_outcome("b@example.net", DEFERRED, "451 4.4.1 timeout")
    )
    next_attempt_at = time.time() + 300
    await store.mark_deferred(entry, next_attempt_at, status)
    assert _names(store.layout.deferred) == [queue_id]
    assert _names(store.layout.active_directory("w0")) == []
    [(scanned_id, scanned_at)] = store.scan_deferred()
    assert scanned_id == queue_id
    assert scanned_at == pytest.approx(next_attempt_at, abs=1e-3)
    again = store.claim(queue_id, "w1", "deferred")
    assert again is not None
    assert again.status == status
    assert [r.address for r in again.status.pending(again.envelope)] == ["b@example.net"]


@pytest_twisted.ensureDeferred
async def test_scan_deferred_is_soonest_first(store):
    """Entries due first are listed first, whatever their arrival order."""
    ids = [await _queue(store) for _ in range(3)]
    now = time.time()
    for queue_id, delay in zip(ids, (300, 100, 200), strict=True):
        entry = store.claim(queue_id, "w0", "incoming")
        await store.mark_deferred(entry, now + delay, EntryStatus())
    assert [queue_id for queue_id, _ in store.scan_deferred()] == [ids[1], ids[2], ids[0]]


@pytest_twisted.ensureDeferred
async def test_complete_removes_entry_and_sidecar(store):
    """A fully delivered entry leaves no file in any state."""
    queue_id = await _queue(store)
    entry = store.claim(queue_id, "w0", "incoming")
    await store.mark_deferred(entry, time.time(), EntryStatus().with_attempt(1.0))
    entry = store.claim(queue_id, "w0", "deferred")
    store.complete(entry)
    assert store.counts() == {"incoming": 0, "active": 0, "deferred": 0, "hold": 0}
    assert _names(store.layout.status) == []
    assert _names(store.layout.tmp) == []


@pytest_twisted.ensureDeferred
async def test_release_returns_a_claimed_entry_to_incoming(store):
    """At shutdown a claimed entry goes back to incoming/ untouched."""
    queue_id = await _queue(store)
    entry = store.claim(queue_id, "w0", "incoming")
    store.release(entry)
    assert store.scan_incoming() == [queue_id]


@pytest_twisted.ensureDeferred
async def test_reclaim_returns_only_that_owners_entries(store):
    """The master returns a dead worker's entries; other workers' claims stay."""
    ids = [await _queue(store) for _ in range(4)]
    for queue_id in ids[:3]:
        store.claim(queue_id, "w0", "incoming")
    store.claim(ids[3], "w1", "incoming")
    assert store.reclaim("w0") == 3
    assert store.scan_incoming() == ids[:3]
    assert store.counts()["active"] == 1
    assert store.reclaim("w9") == 0
    assert store.reclaim_all() == 1
    assert store.scan_incoming() == ids


@pytest_twisted.ensureDeferred
async def test_hold_release_hold_and_requeue(store):
    """Operator moves go between the right states and report whether they happened."""
    queue_id = await _queue(store)
    assert store.hold(queue_id)
    assert not store.hold(queue_id)
    assert store.claim(queue_id, "w0", "incoming") is None
    assert store.release_hold(queue_id)
    assert not store.release_hold(queue_id)
    entry = store.claim(queue_id, "w0", "incoming")
    await store.mark_deferred(entry, time.time() + 3600, EntryStatus())
    assert store.requeue(queue_id)
    assert not store.requeue(queue_id)
    assert store.scan_incoming() == [queue_id]
    entry = store.claim(queue_id, "w0", "incoming")
    await store.mark_deferred(entry, time.time() + 3600, EntryStatus())
    assert store.hold(queue_id)
    assert _names(store.layout.hold) == [queue_id]


@pytest_twisted.ensureDeferred
async def test_counts_every_state(store):
    """counts() reports incoming, active (all owners), deferred and hold."""
    ids = [await _queue(store) for _ in range(6)]
    store.claim(ids[0], "w0", "incoming")
    store.claim(ids[1], "w1", "incoming")
    entry = store.claim(ids[2], "w1", "incoming")
    await store.mark_deferred(entry, time.time(), EntryStatus())
    store.hold(ids[3])
    open_message = store.open_message()  # tmp/ files are not a state
    assert store.counts() == {"incoming": 2, "active": 2, "deferred": 1, "hold": 1}
    open_message.discard()


@pytest_twisted.ensureDeferred
async def test_remove_stale_tmp_keeps_live_sessions(store):
    """Old tmp files of crashed sessions go; a message being written now stays."""
    crashed = store.open_message()
    crashed.write(b"x" * SPILL_BYTES)
    live = store.open_message()
    live.write(b"y" * SPILL_BYTES)
    await _until(lambda: len(_names(store.layout.tmp)) == 2)
    old = time.time() - 7200
    os.utime(store.layout.tmp_path(crashed.queue_id), (old, old))
    assert store.remove_stale_tmp(older_than_seconds=3600) == 1
    assert _names(store.layout.tmp) == [live.queue_id]
    await live.commit(_envelope(live.queue_id))
    assert store.scan_incoming() == [live.queue_id]


@pytest_twisted.ensureDeferred
async def test_a_corrupt_entry_is_moved_aside_not_delivered(store):
    """A truncated file is quarantined in corrupt/ and claim() returns None."""
    queue_id = await _queue(store)
    path = store.layout.entry_path("incoming", queue_id)
    os.truncate(path, os.path.getsize(path) - 5)
    assert store.claim(queue_id, "w0", "incoming") is None
    assert _names(store.layout.corrupt) == [queue_id]
    assert store.counts()["active"] == 0


@pytest_twisted.ensureDeferred
async def test_complete_later_removes_entry_and_sidecar_in_the_pool(store):
    """A delivered entry removed behind (batched in a pool thread) leaves no file behind."""
    ids = [await _queue(store) for _ in range(3)]
    entries = [store.claim(queue_id, "w0", "incoming") for queue_id in ids]
    await store.mark_deferred(entries[0], time.time(), EntryStatus().with_attempt(1.0))
    entries[0] = store.claim(ids[0], "w0", "deferred")
    await gatherResults([store.complete_later(entry) for entry in entries])
    assert store.counts() == {"incoming": 0, "active": 0, "deferred": 0, "hold": 0}
    assert _names(store.layout.status) == []


# Spare files: delivered entries' files overwritten by new messages (queue/spares.py)


async def _commit_claimed(store, body, owner="w0"):
    message = store.open_message()
    message.write(body)
    return await store.commit_claimed(message, _envelope(message.queue_id), owner)


async def _deliver(store, *bodies):
    """Commit each body claimed by w0, then complete them all as delivery does."""
    entries = [await _commit_claimed(store, body) for body in bodies]
    for entry in entries:
        await store.complete_later(entry)
    return entries


@pytest_twisted.ensureDeferred
async def test_a_delivered_entry_becomes_a_spare_that_the_next_message_overwrites(store):
    """complete_later() keeps a small entry's file in tmp/; the next commit reuses its
    inode, cut to the new, shorter length, and reads back exactly."""
    [delivered] = await _deliver(store, b"long line of a first message\r\n" * 300)
    spare_name = f"spare.{delivered.queue_id}.w0"
    assert _names(store.layout.tmp) == [spare_name]
    assert store.counts() == {"incoming": 0, "active": 0, "deferred": 0, "hold": 0}
    spare_inode = os.stat(os.path.join(store.layout.tmp, spare_name)).st_ino

    queue_id = await _queue(store)

    assert _names(store.layout.tmp) == []
    path = store.layout.entry_path("incoming", queue_id)
    assert os.stat(path).st_ino == spare_inode
    entry = store.claim(queue_id, "w1", "incoming")
    assert entry is not None and entry.envelope.sender == "sender@example.org"
    with entry.open_content() as content:
        assert content.read() == BODY
    assert os.path.getsize(entry.path) == len(BODY) + len(entry.envelope.to_json()) + FOOTER_SIZE


@pytest_twisted.ensureDeferred
async def test_a_message_written_behind_into_a_spare_grows_it_and_reads_back(store):
    """A spare taken by a message past SPILL_BYTES is overwritten piece by piece."""
    await _deliver(store, BODY)
    body = b"y" * 998 + b"\r\n"
    count = 2 * SPILL_BYTES // len(body)
    entry = await _commit_claimed(store, body * count)
    assert entry.content is None  # written behind, into the spare
    assert _names(store.layout.tmp) == []
    with entry.open_content() as content:
        assert content.read() == body * count
    assert (
        os.path.getsize(entry.path)
        == entry.content_size + len(entry.envelope.to_json()) + FOOTER_SIZE
    )


@pytest_twisted.ensureDeferred
async def test_large_entries_are_unlinked_and_spares_are_bounded(queue_dir):
    """Past SPARE_CONTENT_LIMIT, or with the store's spares at their limit, an entry is
    unlinked as before."""
    from twistedrelay.queue.spares import SPARE_CONTENT_LIMIT, SpareFiles

    store = _open_store(queue_dir)
    try:
        store.spares = SpareFiles(store.layout, FileSystem(), limit=2)
        await _deliver(store, b"z" * (SPARE_CONTENT_LIMIT + 1))
        assert _names(store.layout.tmp) == []
        entries = await _deliver(store, BODY, BODY, BODY)
        assert _names(store.layout.tmp) == sorted(f"spare.{e.queue_id}.w0" for e in entries[:2])
        assert len(store.spares) == 2
        assert store.counts()["active"] == 0
    finally:
        store.close()


@pytest_twisted.ensureDeferred
async def test_a_spare_removed_meanwhile_is_skipped_for_a_new_file(store):
    """A spare an operator removed is not an error: the commit creates a file instead."""
    [delivered] = await _deliver(store, BODY)
    os.unlink(os.path.join(store.layout.tmp, f"spare.{delivered.queue_id}.w0"))
    queue_id = await _queue(store)
    entry = store.claim(queue_id, "w0", "incoming")
    assert entry is not None
    with entry.open_content() as content:
        assert content.read() == BODY


@pytest_twisted.ensureDeferred
async def test_a_discarded_message_removes_the_spare_it_had_taken(store):
    """A spare written behind into and then discarded is unlinked like a new tmp file."""
    await _deliver(store, BODY)
    message = store.open_message()
    message.write(b"x" * (SPILL_BYTES + 1))
    await _until(lambda: _names(store.layout.tmp) and not store.spares)
    await message.discard()
    assert _names(store.layout.tmp) == []


@pytest_twisted.ensureDeferred
async def test_remove_spares_by_owner_or_all(store):
    """remove_spares(owner) takes only that owner's spares; remove_spares() every one;
    other tmp files are not spares."""
    entries = [await _commit_claimed(store, BODY, owner) for owner in ("w0", "w1.x")]
    for entry in entries:
        await store.complete_later(entry)
    first, second = entries
    with open(os.path.join(store.layout.tmp, first.queue_id), "wb"):
        pass
    assert store.remove_spares("w1") == 0
    assert store.remove_spares("w0") == 1
    assert _names(store.layout.tmp) == sorted([first.queue_id, f"spare.{second.queue_id}.w1.x"])
    assert store.remove_spares() == 1
    assert _names(store.layout.tmp) == [first.queue_id]
