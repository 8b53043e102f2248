"""The accept path: one message being received, until it is durable in the queue.

Owns writing a new queue entry: collecting content while DATA arrives, writing it behind
in pool threads, and at commit the trailer, fdatasync and rename, run in a batch with other
sessions' commits that one directory fsync then covers (group_commit.py). It also owns
the entry file's format, which store.py's module docstring describes, and the mapping of
write errors to SMTP replies.

Invariant: the reactor thread never touches the disk here, and nothing ever renames a file
into a state directory before its data is fdatasync'd.
"""

from __future__ import annotations

import errno
import os
from collections import deque
from collections.abc import Callable
from typing import Final

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from twistedrelay.queue.entry import Envelope
from twistedrelay.queue.layout import ACTIVE, HOLD, INCOMING, QueueLayout
from twistedrelay.queue.spares import SpareFiles
from twistedrelay.smtp import replies
from twistedrelay.smtp.replies import Reply

FOOTER_FORMAT: Final = b"\n#TRQ1 %010d %015d\n"
FOOTER_SIZE: Final = len(FOOTER_FORMAT % (0, 0))
#: Content held in memory per message before it is written behind to tmp/.
SPILL_BYTES: Final = 64 * 1024
_STORAGE_FULL_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT})

#: Runs a function in a pool thread: (function, *args) -> Deferred of its result.
RunInThread = Callable[..., Deferred[None]]
#: (work, directory, destination) -> runs the work in a batch, fires once the rename into
#: directory is durable (group_commit.CommitBatcher.commit).
CommitInBatch = Callable[[Callable[[], None], str, str], Deferred[None]]
#: (durable, queue_id, state) -> what the caller of commit() gets (store.py reports).
AfterCommit = Callable[[Deferred[None], str, str], Deferred[None]]


class QueueWriteError(Exception):
    """A message could not be made durable; ``reply`` is what to tell the SMTP client.

    ``reply`` is replies.INSUFFICIENT_STORAGE (452 4.3.1) when the disk or quota is full,
    replies.LOCAL_ERROR (451 4.3.0) otherwise. Both are transient: the client retries.
    """

    def __init__(self, reply: Reply, error_number: int | None = None) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.error_number = error_number

    @classmethod
    def from_exception(cls, error: BaseException) -> QueueWriteError:
        """Map an exception from the write path to the reply the client should get."""
        number = error.errno if isinstance(error, OSError) else None
        if number in _STORAGE_FULL_ERRNOS:
            return cls(replies.INSUFFICIENT_STORAGE, number)
        return cls(replies.LOCAL_ERROR, number)


class FileSystem:
    """The OS calls of the commit path, as one seam that tests can replace.

    Tests inject a subclass that fails with EIO or ENOSPC at a chosen step, or that counts
    fsyncs; production uses this class as is. Files are plain descriptors (no Python
    buffering), so what a pool thread wrote is what a reader of the path sees.
    """

    def create_exclusive(self, path: str) -> int:
        """Create a new file (mode 0600, failing if it exists); returns a writable fd."""
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)

    def open_existing(self, path: str) -> int:
        """Open a file to overwrite from its first byte (a spare); returns a writable fd."""
        return os.open(path, os.O_WRONLY | os.O_CLOEXEC)

    def truncate(self, fd: int, size: int) -> None:
        """Cut the file to ``size`` bytes (what an overwritten spare had beyond its end)."""
        os.ftruncate(fd, size)

    def write(self, fd: int, data: bytes) -> None:
        """Write all of ``data`` (write(2) may take less than asked)."""
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    def sync_file(self, fd: int) -> None:
        """Make the file's data (and its size) durable."""
        _fdatasync(fd)

    def sync_directory(self, path: str) -> None:
        """Make the directory's entries (renames into it) durable."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def rename(self, source: str, destination: str) -> None:
        """Atomically move a file (same file system)."""
        os.rename(source, destination)

    def remove(self, path: str) -> None:
        """Remove a file that may already be gone."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


# fdatasync also writes the metadata needed to read the data back (the file size), which
# is all a new file needs; macOS has only fsync.
_fdatasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)


def _close_quietly(fd: int) -> None:
    """Close a file that is being abandoned; its errors do not matter any more."""
    try:
        os.close(fd)
    except OSError:
        pass


_OPEN, _COMMITTED, _DISCARDED = "open", "committed", "discarded"


class IncomingMessage:
    """One message being received, until commit() or discard().

    Made by QueueStore.open_message(), which passes the store's pool, its commit batches
    (``commit_in_batch``: the final write, fdatasync and rename, then the shared directory
    fsync) and what to do once the commit is over (``after_commit``). The reactor thread
    never touches the disk here: creating a file can take milliseconds (about 1 ms typical
    and 8 ms at the 99th percentile on the development VM's ext4), so content is collected
    in memory and handed to pool threads. A message of less than ``SPILL_BYTES`` (most
    mail) costs a share of one batch job at commit: create tmp/<queue ID>, write,
    fdatasync, close, rename. The file is a spare (spares.py), a delivered entry's file
    overwritten from offset 0 and truncated to length, whenever the store has one; else it
    is created. A larger one is written behind in ``SPILL_BYTES`` pieces
    while DATA arrives, by pool jobs that run one after another for this message (a chain
    of Deferreds), so memory stays bounded by about ``SPILL_BYTES`` per session plus what
    the disk has not yet taken.

    A write error does not raise: it is remembered, the partial file is removed at once
    (to give the space back), later writes are dropped, and commit() then fails with the
    right reply. ``failed`` turns true once a written-behind piece has failed.
    """

    def __init__(
        self,
        queue_id: str,
        layout: QueueLayout,
        filesystem: FileSystem,
        run_in_thread: RunInThread,
        commit_in_batch: CommitInBatch,
        after_commit: AfterCommit,
        spares: SpareFiles | None = None,
    ) -> None:
        self.queue_id = queue_id
        self._layout = layout
        self._fs = filesystem
        self._spares = spares
        self._run_in_thread = run_in_thread
        self._commit_in_batch = commit_in_batch
        self._after_commit = after_commit
        self._tmp_path = layout.tmp_path(queue_id)
        self._size = 0
        self._error: BaseException | None = None
        self._state = _OPEN
        # Content not yet handed to a pool job, and pieces handed over but not yet written
        # (both kept so that read_back() sees every byte without waiting for the pool).
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._in_flight: deque[bytes] = deque()
        self._written = 0
        self._spilled = False  # some content was handed to the pool before commit()
        self.content_in_memory: bytes | None = None
        """After commit(): the whole content when it was never written behind, else None."""
        # Used only by pool jobs, which the chain runs one at a time, in order.
        self._fd: int | None = None
        self._created = False
        self._reused = False  # the file is a spare: truncate it to length at commit
        self._jobs: Deferred[None] = defer.succeed(None)

    @property
    def size(self) -> int:
        """Content bytes written so far."""
        return self._size

    @property
    def failed(self) -> bool:
        """Whether a write error happened (commit() will fail; the session may stop early)."""
        return self._error is not None

    def write(self, data: bytes) -> None:
        """Append content (kept in memory, written behind by pool threads past SPILL_BYTES).

        The caller must not modify ``data`` afterwards (pass bytes, not a reused buffer).

        :raises RuntimeError: after commit() or discard().
        """
        if self._state is not _OPEN:
            raise RuntimeError(f"write() on a {self._state} queue message")
        if self._error is not None:
            return
        self._chunks.append(data)
        self._size += len(data)
        self._buffered += len(data)
        if self._buffered >= SPILL_BYTES:
            self._write_behind(self._take_chunks())

    def read_back(self) -> bytes:
        """The content written so far, for data hooks that read the message before commit.

        Reads the part pool threads have written from the tmp file (a page-cache read in
        the reactor thread) and the rest from memory. b"" after a write error.

        :raises RuntimeError: after commit() or discard().
        """
        if self._state is not _OPEN:
            raise RuntimeError(f"read_back() on a {self._state} queue message")
        if self._error is not None:
            return b""
        parts = []
        if self._written:
            with open(self._tmp_path, "rb") as file:
                parts.append(file.read(self._written))
        parts.extend(self._in_flight)
        parts.extend(self._chunks)
        return b"".join(parts)

    def commit(
        self, envelope: Envelope, state: str = INCOMING, claimed_path: str | None = None
    ) -> Deferred[None]:
        """Make the message durable in ``state`` (incoming or hold).

        In a pool thread, batched with other sessions' commits: append the rest of the
        content, the envelope trailer and the footer, fdatasync, rename into the state
        directory; then a fsync of that directory shared by the batch (group_commit.py).

        :param envelope: the message's envelope; its queue_id must be this message's.
        :param state: ``"incoming"`` (deliver) or ``"hold"`` (a data hook said hold).
        :param claimed_path: with ``"incoming"``: commit straight into this path in
            active/<owner>/ instead (QueueStore.commit_claimed), already claimed by the
            committing worker; a crash leaves it there for the master to return to incoming/.
        :returns: fires with None once the entry is durable; only then may the server
            reply 250. Errbacks with QueueWriteError (the partial file is removed).
        :raises RuntimeError: commit() or discard() was already called.
        :raises ValueError: ``state`` is not incoming or hold, or the envelope belongs to
            another queue ID, or ``claimed_path`` comes with hold.
        """
        if self._state is not _OPEN:
            raise RuntimeError(f"commit() on a {self._state} queue message")
        if state not in (INCOMING, HOLD):
            raise ValueError(f"a new message can only be queued to incoming or hold: {state!r}")
        if claimed_path is not None and state != INCOMING:
            raise ValueError(f"only incoming mail can be committed as claimed, not {state!r}")
        if envelope.queue_id != self.queue_id:
            raise ValueError(f"envelope of {envelope.queue_id} committed as {self.queue_id}")
        self._state = _COMMITTED
        trailer = envelope.to_json()
        chunks = self._take_chunks()
        if not self._spilled:
            self.content_in_memory = b"".join(chunks)
            chunks = [self.content_in_memory]
        tail = trailer + FOOTER_FORMAT % (len(trailer), self._size)
        chunks.append(tail)
        data = b"".join(chunks)
        file_size = self._size + len(tail)
        if claimed_path is None:
            directory = self._layout.state_directory(state)
            destination = os.path.join(directory, self.queue_id)
        else:
            directory, destination, state = os.path.dirname(claimed_path), claimed_path, ACTIVE

        def finish(_: None) -> Deferred[None]:
            if self._error is not None:
                return defer.fail(self._error)
            return self._commit_in_batch(
                lambda: self._finish(data, file_size, destination), directory, destination
            )

        self._jobs.addCallback(finish)
        return self._after_commit(self._jobs, self.queue_id, state)

    def discard(self) -> Deferred[None]:
        """Drop the message (the transaction failed or was reset): remove its tmp file.

        Does nothing after commit() (the commit owns the file then) or a second time.

        :returns: fires when the tmp file is gone (callers need not wait).
        """
        if self._state is not _OPEN:
            return defer.succeed(None)
        self._state = _DISCARDED
        self._take_chunks()

        def abandon(_: None) -> Deferred[None] | None:
            if not self._created:
                return None
            return self._run_in_thread(self._abandon_file)

        return self._jobs.addCallback(abandon)

    def _take_chunks(self) -> list[bytes]:
        chunks, self._chunks, self._buffered = self._chunks, [], 0
        return chunks

    def _write_behind(self, chunks: list[bytes]) -> None:
        """Queue a pool job that appends ``chunks``; a failure is remembered, not raised."""
        data = b"".join(chunks)
        self._spilled = True
        self._in_flight.append(data)

        def run(_: None) -> Deferred[None] | None:
            if self._error is not None:
                return None
            return self._run_in_thread(self._append, data).addCallback(written)

        def written(_: None) -> None:
            self._in_flight.popleft()
            self._written += len(data)

        def remember(failure: Failure) -> None:
            if self._error is None:
                self._error = failure.value
            self._take_chunks()
            self._in_flight.clear()

        self._jobs.addCallback(run).addErrback(remember)

    # Pool jobs: one at a time per message, in order.

    def _append(self, data: bytes) -> None:
        """Write a piece of content behind, creating the tmp file on first use."""
        try:
            self._fs.write(self._open_file(), data)
        except BaseException:
            self._abandon_file()
            raise

    def _finish(self, data: bytes, file_size: int, destination: str) -> None:
        """Write the rest and the trailer, fdatasync, close, rename into the state."""
        filesystem = self._fs
        try:
            fd = self._open_file()
            filesystem.write(fd, data)
            if self._reused:
                filesystem.truncate(fd, file_size)
            filesystem.sync_file(fd)
            self._fd = None
            os.close(fd)
            filesystem.rename(self._tmp_path, destination)
            self._created = False  # it is an entry now, no longer this message's tmp file
        except BaseException:
            self._abandon_file()
            raise

    def _open_file(self) -> int:
        """The tmp file's descriptor: on first use a spare's, or a new file's."""
        if self._fd is None:
            self._fd = self._open_spare()
            if self._fd is None:
                self._fd = self._fs.create_exclusive(self._tmp_path)
            self._created = True
        return self._fd

    def _open_spare(self) -> int | None:
        """Open a spare file to overwrite, if the store has one; it becomes the tmp file."""
        while self._spares is not None and (spare := self._spares.take()) is not None:
            try:
                fd = self._fs.open_existing(spare)
            except OSError:
                continue  # removed meanwhile (by an operator): try the next, or create
            self._tmp_path, self._reused = spare, True
            return fd
        return None

    def _abandon_file(self) -> None:
        """Close and remove the tmp file this message created, if any."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            _close_quietly(fd)
        if self._created:
            self._created = False
            self._fs.remove(self._tmp_path)
