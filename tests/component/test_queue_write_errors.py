"""Queue write failures: the right 4xx reply, no partial file, and the store goes on.

Two kinds of failure: a real full file system (a 256 KiB tmpfs mounted for the test; we
run as root on CI and the developers' machines, and the test is skipped where mounting is
not permitted), and errors a disk can give but a test cannot provoke (EIO, EROFS, EDQUOT,
a failing fsync), injected through the store's FileSystem seam.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time

import pytest
import pytest_twisted

from twistedrelay.queue.entry import Envelope, Recipient
from twistedrelay.queue.incoming import SPILL_BYTES, FileSystem, QueueWriteError
from twistedrelay.queue.store import QueueStore
from twistedrelay.smtp import replies


def _envelope(queue_id: str) -> Envelope:
    return Envelope(queue_id, "sender@example.org", (Recipient("rcpt@example.net"),), time.time())


def _open_store(directory, filesystem=None):
    from twisted.internet import reactor

    QueueStore.create(directory)
    return QueueStore(directory, reactor, filesystem=filesystem)


async def _commit(store, body: bytes) -> tuple[str, QueueWriteError | None]:
    message = store.open_message()
    message.write(body)
    try:
        await message.commit(_envelope(message.queue_id))
    except QueueWriteError as error:
        return message.queue_id, error
    return message.queue_id, None


def _entries(store) -> list[str]:
    layout = store.layout
    return sorted(os.listdir(layout.tmp) + os.listdir(layout.incoming))


class FailingFileSystem(FileSystem):
    """Fails one commit-path step, once, with a given errno."""

    def __init__(self, step: str, number: int):
        self.step = step
        self.error = OSError(number, os.strerror(number))
        self.armed = True

    def _maybe_fail(self, step):
        if self.armed and step == self.step:
            self.armed = False
            raise self.error

    def create_exclusive(self, path):
        self._maybe_fail("create")
        return super().create_exclusive(path)

    def write(self, fd, data):
        self._maybe_fail("write")
        super().write(fd, data)

    def truncate(self, fd, size):
        self._maybe_fail("truncate")
        super().truncate(fd, size)

    def sync_file(self, fd):
        self._maybe_fail("sync_file")
        super().sync_file(fd)

    def rename(self, source, destination):
        self._maybe_fail("rename")
        super().rename(source, destination)

    def sync_directory(self, path):
        self._maybe_fail("sync_directory")
        super().sync_directory(path)


@pytest.mark.parametrize("size", [100, 3 * SPILL_BYTES], ids=["small", "written-behind"])
@pytest.mark.parametrize("step", ["create", "write", "sync_file", "rename", "sync_directory"])
@pytest.mark.parametrize(
    ("number", "reply"),
    [
        (errno.ENOSPC, replies.INSUFFICIENT_STORAGE),
        (errno.EDQUOT, replies.INSUFFICIENT_STORAGE),
        (errno.EIO, replies.LOCAL_ERROR),
        (errno.EROFS, replies.LOCAL_ERROR),
    ],
)
@pytest_twisted.ensureDeferred
async def test_injected_error_gives_its_reply_and_removes_the_partial_file(
    tmp_path, step, number, reply, size
):
    """Each failing step errbacks with 452 4.3.1 (full) or 451 4.3.0; nothing is left."""
    store = _open_store(str(tmp_path / "queue"), FailingFileSystem(step, number))
    try:
        _, error = await _commit(store, b"x" * size)
        assert error is not None
        assert error.reply == reply
        assert error.error_number == number
        assert _entries(store) == []
        queue_id, error = await _commit(store, b"Subject: y\r\n\r\nbody\r\n")
        assert error is None
        assert store.scan_incoming() == [queue_id]
    finally:
        store.close()


@pytest.mark.parametrize("step", ["write", "truncate", "sync_file", "rename"])
@pytest_twisted.ensureDeferred
async def test_injected_error_writing_into_a_spare_removes_it(tmp_path, step):
    """A message overwriting a delivered entry's file (queue/spares.py) fails like a new
    file: 451 4.3.0, and the half-overwritten file is gone, not left as a spare."""
    filesystem = FailingFileSystem(step, errno.EIO)
    filesystem.armed = False
    store = _open_store(str(tmp_path / "queue"), filesystem)
    try:
        message = store.open_message()
        message.write(b"delivered\r\n" * 100)
        await store.complete_later(
            await store.commit_claimed(message, _envelope(message.queue_id), "w0")
        )
        assert len(store.spares) == 1
        filesystem.armed = True
        _, error = await _commit(store, b"Subject: y\r\n\r\nbody\r\n")
        assert error is not None and error.reply == replies.LOCAL_ERROR
        assert _entries(store) == [] and len(store.spares) == 0
    finally:
        store.close()


@pytest_twisted.ensureDeferred
async def test_write_error_marks_the_message_failed_before_commit(tmp_path):
    """The session can learn of a write-behind error early; later content is dropped."""
    from twisted.internet import reactor, task

    store = _open_store(str(tmp_path / "queue"), FailingFileSystem("write", errno.EIO))
    try:
        message = store.open_message()
        message.write(b"x" * SPILL_BYTES)
        deadline = time.monotonic() + 10
        while not message.failed:
            assert time.monotonic() < deadline, "the write error never surfaced"
            await task.deferLater(reactor, 0.005, lambda: None)
        assert _entries(store) == [], "the partial file is removed at once"
        assert message.read_back() == b""
        message.write(b"more data is ignored")
        assert message.size == SPILL_BYTES
        with pytest.raises(QueueWriteError):
            await message.commit(_envelope(message.queue_id))
    finally:
        store.close()


@pytest.fixture
def small_fs(tmp_path):
    """A 256 KiB tmpfs: a real file system that fills up."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


@pytest_twisted.ensureDeferred
async def test_full_disk_during_data_gives_452_and_the_next_message_commits(small_fs):
    """A body larger than the disk fails with 452 4.3.1; a small one is then accepted."""
    store = _open_store(str(small_fs / "queue"))
    try:
        _, error = await _commit(store, b"x" * (512 * 1024))
        assert error is not None
        assert error.reply == replies.INSUFFICIENT_STORAGE
        assert _entries(store) == []
        queue_id, error = await _commit(store, b"y" * 1024)
        assert error is None
        entry = store.claim(queue_id, "w0", "incoming")
        with entry.open_content() as content:
            assert content.read() == b"y" * 1024
    finally:
        store.close()


@pytest_twisted.ensureDeferred
async def test_full_disk_at_commit_gives_452_and_the_next_message_commits(small_fs):
    """A body under SPILL_BYTES is written only at commit (pool thread) and fails there."""
    store = _open_store(str(small_fs / "queue"))
    try:
        with open(small_fs / "filler", "wb") as filler:
            filler.write(b"f" * (200 * 1024))
        message = store.open_message()
        message.write(b"z" * (60 * 1024))
        assert not message.failed, "still in the write buffer"
        with pytest.raises(QueueWriteError) as raised:
            await message.commit(_envelope(message.queue_id))
        assert raised.value.reply == replies.INSUFFICIENT_STORAGE
        assert _entries(store) == []
        queue_id, error = await _commit(store, b"w" * 1024)
        assert error is None
        assert store.scan_incoming() == [queue_id]
    finally:
        store.close()
