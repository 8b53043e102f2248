"""QueueStore: every file-system operation on the mail queue.

Owns the queue on disk: writing accepted messages durably, moving entries between states,
reading them back for delivery. It does not decide what to deliver when (scheduler.py) nor
what a reply means (delivery/outcome.py).

Rule 1: nothing is acknowledged before it is durable. ``IncomingMessage.commit()`` fires
only after the file's data is fsync'd, the file is renamed from tmp/ into incoming/ (or
hold/) and that directory is fsync'd (DESIGN.md "The queue on disk"). A crash at any
instant leaves every acknowledged entry queued or delivered: at-least-once.

Rule 2: the reactor thread never waits for the disk on the accept path. Content is
collected in memory and written by pool threads (creating the file, writing, fdatasync,
rename; see IncomingMessage), and directory fsyncs are shared by concurrent commits
(group_commit.py). The delivery side's renames, unlinks and small reads run in the reactor
thread: they cost tens of microseconds, unlike a file creation or an fsync.

The entry file (one per queue entry, named by its queue ID, mode 0600), in this order:

1. the message content, ``content_size`` bytes, exactly as DATA decoding produced it (the
   Received header first); streamed to the file while DATA arrives;
2. the trailer: the envelope as one line of JSON (``Envelope.to_json()``,
   ``trailer_size`` bytes), written at the end of DATA, so data hooks can still add
   headers or decide hold;
3. the footer, 34 bytes of ASCII: LF, ``#TRQ1``, a space, ``trailer_size`` in 10 decimal
   digits, a space, ``content_size`` in 15 decimal digits, LF (``FOOTER_FORMAT``).

Reading the envelope is a read of the last 34 bytes and then of the trailer; reading the
content is the first content_size bytes. A file whose size is not content_size +
trailer_size + 34, or whose footer does not parse, is corrupt: claim() moves it to
corrupt/ for an operator. ``tail -n 2 FILE`` shows the envelope and footer to a person.

The status sidecar status/<queue ID> holds EntryStatus.to_json(): the per-recipient
outcomes so far. It is replaced atomically (written to tmp/, fsync'd, renamed). No
sidecar means no attempt yet.

States and moves (layout.py names the directories)::

    tmp ──commit──▶ incoming ──claim──▶ active/<owner> ──complete──▶ (removed)
            └─────▶ hold        ▲               │ ├──mark_deferred──▶ deferred
                                │               │ └──release────────▶ incoming
          reclaim(owner) ◀──────┘ (dead worker) │
    deferred ──claim (when due) / requeue──▶ ...; hold ◀──hold / release_hold──▶ incoming

Which moves are fsync'd, and why that is enough:

- commit: file fdatasync, rename, directory fsync, before the caller may say "250".
- status sidecar: file fdatasync before its rename, so a crash never leaves a torn
  sidecar. The directory is not fsync'd: a lost sidecar update means recipients already
  delivered are delivered again, which at-least-once allows.
- claim, release, reclaim, mark_deferred's rename, complete, hold, release_hold, requeue:
  plain rename/unlink, not fsync'd. After a crash an entry may reappear in its previous
  state (a lost claim or completion means another delivery; a lost deferral means an
  earlier retry; a lost hold must be repeated), but no entry ever disappears, because an
  entry leaves the queue only by complete(), after delivery.

The next attempt time of a deferred entry is its file's mtime (as in Postfix), set before
the rename into deferred/, so scan_deferred() needs one stat() per entry and no file read.
"""

from __future__ import annotations

import errno
import io
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorCore, IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from twistedrelay.queue.entry import EntryStatus, Envelope
from twistedrelay.queue.group_commit import GroupCommitter
from twistedrelay.queue.ids import QueueIdGenerator, is_queue_id
from twistedrelay.queue.layout import (
    ACTIVE,
    DEFERRED,
    HOLD,
    INCOMING,
    QueueLayout,
)
from twistedrelay.smtp import replies
from twistedrelay.smtp.replies import Reply

log = Logger()

_T = TypeVar("_T")

FOOTER_FORMAT: Final = b"\n#TRQ1 %010d %015d\n"
FOOTER_SIZE: Final = len(FOOTER_FORMAT % (0, 0))
_FOOTER_PREFIX: Final = b"\n#TRQ1 "
#: Content held in memory per message before it is written behind to tmp/.
SPILL_BYTES: Final = 64 * 1024
_READ_BUFFER_BYTES: Final = 64 * 1024
DEFAULT_THREADS: Final = 8
_STORAGE_FULL_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT})


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


class CorruptEntryError(ValueError):
    """An entry file does not have the layout described in this module's docstring."""


class FileSystem:
    """The OS calls of the commit path, as one seam that tests can replace.

    Tests inject a subclass that fails with EIO or ENOSPC at a chosen step, or that counts
    fsyncs; production uses this class as is. Files are plain descriptors (no Python
    buffering), so what a pool thread wrote is what a reader of the path sees.
    """

    def create_exclusive(self, path: str) -> int:
        """Create a new file (mode 0600, failing if it exists); returns a writable fd."""
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)

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


# fdatasync also writes the metadata needed to read the data back (the file size), which
# is all a new file needs; macOS has only fsync.
_fdatasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)


def _close_quietly(fd: int) -> None:
    """Close a file that is being abandoned; its errors do not matter any more."""
    try:
        os.close(fd)
    except OSError:
        pass


def _unlink_quietly(path: str) -> None:
    """Remove a file that may already be gone."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def read_entry_metadata(path: str) -> tuple[Envelope, int]:
    """Read an entry file's envelope and content size (two small reads near its end).

    :returns: (envelope, content_size).
    :raises CorruptEntryError: the file is not a complete entry.
    :raises OSError: the file cannot be read (e.g. FileNotFoundError).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        file_size = os.fstat(fd).st_size
        if file_size < FOOTER_SIZE:
            raise CorruptEntryError(f"{path}: too short for a queue entry")
        footer = os.pread(fd, FOOTER_SIZE, file_size - FOOTER_SIZE)
        if not footer.startswith(_FOOTER_PREFIX) or not footer.endswith(b"\n"):
            raise CorruptEntryError(f"{path}: no queue entry footer")
        try:
            trailer_size, content_size = (int(f) for f in footer[len(_FOOTER_PREFIX) :].split())
        except ValueError:
            raise CorruptEntryError(f"{path}: unreadable queue entry footer") from None
        if content_size + trailer_size + FOOTER_SIZE != file_size:
            raise CorruptEntryError(f"{path}: sizes in the footer do not match the file")
        trailer = os.pread(fd, trailer_size, content_size)
    finally:
        os.close(fd)
    try:
        envelope = Envelope.from_json(trailer)
    except (ValueError, TypeError, KeyError) as error:
        raise CorruptEntryError(f"{path}: unreadable envelope: {error}") from None
    return envelope, content_size


class _BoundedReader(io.RawIOBase):
    """Reads at most ``limit`` bytes of a raw file, then reports end of file."""

    def __init__(self, raw: io.FileIO, limit: int) -> None:
        super().__init__()
        self._raw = raw
        self._remaining = limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:  # Any: RawIOBase's signature takes any buffer
        if self._remaining <= 0:
            return 0
        view = memoryview(buffer).cast("B")
        count = self._raw.readinto(view[: min(len(view), self._remaining)]) or 0
        self._remaining -= count
        return count

    def close(self) -> None:
        self._raw.close()
        super().close()


@dataclass(frozen=True, slots=True)
class ClaimedEntry:
    """A queue entry that one owner has claimed (it lives in active/<owner>/).

    ``status`` is the delivery status so far (empty when no sidecar exists yet).
    """

    queue_id: str
    owner: str
    path: str
    envelope: Envelope
    status: EntryStatus
    content_size: int

    def open_content(self) -> io.BufferedReader:
        """Open the message content for reading, from its first byte to content_size.

        Each call opens the file again, so several deliveries can read it at once. The
        caller closes the returned file.
        """
        raw = io.FileIO(self.path, "rb")
        return io.BufferedReader(_BoundedReader(raw, self.content_size), _READ_BUFFER_BYTES)


_OPEN, _COMMITTED, _DISCARDED = "open", "committed", "discarded"


class IncomingMessage:
    """One message being received, until commit() or discard().

    Made by QueueStore.open_message(). The reactor thread never touches the disk here:
    creating a file can take milliseconds (about 1 ms typical and 8 ms at the 99th
    percentile on the development VM's ext4), so content is collected in memory and
    handed to pool threads. A message of less than ``SPILL_BYTES`` (most mail) costs one
    pool job at commit: create tmp/<queue ID>, write, fdatasync, close, rename. A larger
    one is written behind in ``SPILL_BYTES`` pieces while DATA arrives, by pool jobs that
    run one after another for this message (a chain of Deferreds), so memory stays
    bounded by about ``SPILL_BYTES`` per session plus what the disk has not yet taken.

    A write error does not raise: it is remembered, the partial file is removed at once
    (to give the space back), later writes are dropped, and commit() then fails with the
    right reply. ``failed`` turns true once a written-behind piece has failed.
    """

    def __init__(self, store: QueueStore, queue_id: str, tmp_path: str) -> None:
        self.queue_id = queue_id
        self._store = store
        self._tmp_path = tmp_path
        self._size = 0
        self._error: BaseException | None = None
        self._state = _OPEN
        # Content not yet handed to a pool job, and pieces handed over but not yet written
        # (both kept so that read_back() sees every byte without waiting for the pool).
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._in_flight: deque[bytes] = deque()
        self._written = 0
        # Used only by pool jobs, which the chain runs one at a time, in order.
        self._fd: int | None = None
        self._created = False
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

    def commit(self, envelope: Envelope, state: str = INCOMING) -> Deferred[None]:
        """Make the message durable in ``state`` (incoming or hold).

        In a pool thread: append the rest of the content, the envelope trailer and the
        footer, fdatasync, rename into the state directory; then wait for a shared fsync of
        that directory (group_commit.py).

        :param envelope: the message's envelope; its queue_id must be this message's.
        :param state: ``"incoming"`` (deliver) or ``"hold"`` (a data hook said hold).
        :returns: fires with None once the entry is durable; only then may the server
            reply 250. Errbacks with QueueWriteError (the partial file is removed).
        :raises RuntimeError: commit() or discard() was already called.
        :raises ValueError: ``state`` is not incoming or hold, or the envelope belongs to
            another queue ID.
        """
        if self._state is not _OPEN:
            raise RuntimeError(f"commit() on a {self._state} queue message")
        if state not in (INCOMING, HOLD):
            raise ValueError(f"a new message can only be queued to incoming or hold: {state!r}")
        if envelope.queue_id != self.queue_id:
            raise ValueError(f"envelope of {envelope.queue_id} committed as {self.queue_id}")
        self._state = _COMMITTED
        trailer = envelope.to_json()
        chunks = self._take_chunks()
        chunks.append(trailer + FOOTER_FORMAT % (len(trailer), self._size))
        data = b"".join(chunks)
        destination = os.path.join(self._store.layout.state_directory(state), self.queue_id)

        def finish(_: None) -> Deferred[None]:
            if self._error is not None:
                return defer.fail(self._error)
            return self._store._run_in_thread(self._finish, data, destination)

        self._jobs.addCallback(finish)
        return self._store._after_rename(self._jobs, self.queue_id, state, destination)

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
            return self._store._run_in_thread(self._abandon_file)

        return self._jobs.addCallback(abandon)

    def _take_chunks(self) -> list[bytes]:
        chunks, self._chunks, self._buffered = self._chunks, [], 0
        return chunks

    def _write_behind(self, chunks: list[bytes]) -> None:
        """Queue a pool job that appends ``chunks``; a failure is remembered, not raised."""
        data = b"".join(chunks)
        self._in_flight.append(data)

        def run(_: None) -> Deferred[None] | None:
            if self._error is not None:
                return None
            return self._store._run_in_thread(self._append, data).addCallback(written)

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
            self._store._fs.write(self._open_file(), data)
        except BaseException:
            self._abandon_file()
            raise

    def _finish(self, data: bytes, destination: str) -> None:
        """Write the rest and the trailer, fdatasync, close, rename into the state."""
        filesystem = self._store._fs
        try:
            fd = self._open_file()
            filesystem.write(fd, data)
            filesystem.sync_file(fd)
            self._fd = None
            os.close(fd)
            filesystem.rename(self._tmp_path, destination)
            self._created = False  # it is an entry now, no longer this message's tmp file
        except BaseException:
            self._abandon_file()
            raise

    def _open_file(self) -> int:
        """The tmp file's descriptor, created on first use."""
        if self._fd is None:
            self._fd = self._store._fs.create_exclusive(self._tmp_path)
            self._created = True
        return self._fd

    def _abandon_file(self) -> None:
        """Close and remove the tmp file this message created, if any."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            _close_quietly(fd)
        if self._created:
            self._created = False
            _unlink_quietly(self._tmp_path)


CommitObserver = Callable[[str, str], None]


class QueueStore:
    """The mail queue in one directory, shared by every process of the relay.

    :param directory: a queue directory made by QueueStore.create().
    :param reactor: the reactor whose thread calls this store; results of pool work are
        delivered to it.
    :param threadpool: the pool for fsyncs and renames. When None, the store makes its own
        (``threads`` threads), which close() stops (and reactor shutdown, if the reactor
        has system event triggers).
    :param filesystem: the OS seam of the commit path (tests inject failures through it).
    :param id_generator: makes queue IDs (tests inject a clock through it).
    :raises FileNotFoundError: the directory has not been created with create().
    """

    def __init__(
        self,
        directory: str,
        reactor: IReactorFromThreads,
        threadpool: ThreadPool | None = None,
        *,
        filesystem: FileSystem | None = None,
        id_generator: QueueIdGenerator | None = None,
        threads: int = DEFAULT_THREADS,
    ) -> None:
        self.layout = QueueLayout(directory)
        if not self.layout.is_created():
            raise FileNotFoundError(
                errno.ENOENT,
                "queue directory is not set up (QueueStore.create makes it)",
                self.layout.directory,
            )
        self._reactor = reactor
        self._fs = filesystem if filesystem is not None else FileSystem()
        self._ids = id_generator if id_generator is not None else QueueIdGenerator()
        self._owned_pool: ThreadPool | None = None
        self._shutdown_trigger: Any = None  # Any: an opaque token from addSystemEventTrigger
        if threadpool is None:
            threadpool = self._owned_pool = ThreadPool(1, threads, "twistedrelay-queue")
            threadpool.start()
            if IReactorCore.providedBy(reactor):
                self._shutdown_trigger = IReactorCore(reactor).addSystemEventTrigger(
                    "during", "shutdown", self.close
                )
        self._pool = threadpool
        self.group_commit = GroupCommitter(self._run_in_thread, self._fs.sync_directory)
        self._observers: list[CommitObserver] = []
        self._known_owners: set[str] = set()

    @staticmethod
    def create(directory: str) -> None:
        """Create the queue directory and its state directories (mode 0700) if missing.

        The master calls this once before it starts workers.
        """
        QueueLayout(directory).create()

    def close(self) -> None:
        """Stop the store's own thread pool, if it made one (waits for running fsyncs)."""
        if self._owned_pool is not None:
            pool, self._owned_pool = self._owned_pool, None
            pool.stop()
            if self._shutdown_trigger is not None:
                trigger, self._shutdown_trigger = self._shutdown_trigger, None
                try:
                    IReactorCore(self._reactor).removeSystemEventTrigger(trigger)
                except ValueError:
                    pass  # close() is running as that very trigger

    def _run_in_thread(self, function: Callable[..., _T], *args: object) -> Deferred[_T]:
        return deferToThreadPool(self._reactor, self._pool, function, *args)

    # The accept path

    def new_queue_id(self) -> str:
        """A fresh queue ID (unique across processes and restarts)."""
        return self._ids.new_id()

    def add_commit_observer(self, observer: CommitObserver) -> None:
        """Call ``observer(queue_id, state)`` after each durable commit by this store.

        Lets delivery in the same process pick up new mail at once instead of polling.
        An observer that raises is logged and does not affect the commit.
        """
        self._observers.append(observer)

    def open_message(self, queue_id: str | None = None) -> IncomingMessage:
        """Start a new message (no I/O: the tmp file is made by a pool thread).

        :param queue_id: the ID to use (from new_queue_id(), e.g. already written into
            the Received header); a new one when None.
        :raises ValueError: ``queue_id`` is not a queue ID.
        """
        if queue_id is None:
            queue_id = self._ids.new_id()
        else:
            self._check_id(queue_id)
        return IncomingMessage(self, queue_id, self.layout.tmp_path(queue_id))

    def _after_rename(
        self, renamed: Deferred[None], queue_id: str, state: str, destination: str
    ) -> Deferred[None]:
        """Share a directory fsync once the rename is done, then report the outcome."""
        directory = os.path.dirname(destination)

        def sync(_: None) -> Deferred[None]:
            return self.group_commit.sync_after_rename(directory).addErrback(not_synced)

        def not_synced(failure: Failure) -> Failure:
            # A rename whose directory fsync failed is not known durable: the client gets
            # 451 and retries, so remove the entry to avoid a second copy (best effort).
            _unlink_quietly(destination)
            return failure

        def durable(_: None) -> None:
            self._notify_committed(queue_id, state)

        def failed(failure: Failure) -> Failure:
            return Failure(self._report_write_error(queue_id, failure.value))

        renamed.addCallback(sync)
        renamed.addCallbacks(durable, failed)
        return renamed

    def _report_write_error(self, queue_id: str, error: BaseException) -> QueueWriteError:
        """Log a failed accept for the operator and map it to the client's reply."""
        write_error = QueueWriteError.from_exception(error)
        log.error(
            "queue write failed queue_id={queue_id} reply={reply!r} error={error!r}",
            queue_id=queue_id,
            reply=str(write_error.reply),
            error=error,
        )
        return write_error

    def _notify_committed(self, queue_id: str, state: str) -> None:
        for observer in list(self._observers):
            try:
                observer(queue_id, state)
            except Exception:
                log.failure("commit observer failed queue_id={queue_id}", queue_id=queue_id)

    # The delivery side: small synchronous metadata operations in the reactor thread

    def scan_incoming(self) -> list[str]:
        """Queue IDs in incoming/, oldest first (IDs sort by arrival time).

        Cost: one directory listing (getdents), no stat().
        """
        return sorted(self._list_ids(self.layout.incoming))

    def scan_deferred(self) -> list[tuple[str, float]]:
        """(queue ID, next attempt time) of every deferred entry, soonest first.

        Cost: one directory listing and one stat() per deferred entry.
        """
        found: list[tuple[str, float]] = []
        try:
            scanner = os.scandir(self.layout.deferred)
        except FileNotFoundError:
            return found
        with scanner:
            for item in scanner:
                if not is_queue_id(item.name):
                    continue
                try:
                    found.append((item.name, item.stat().st_mtime))
                except FileNotFoundError:
                    continue  # claimed or requeued since the listing
        found.sort(key=lambda pair: (pair[1], pair[0]))
        return found

    def claim(self, queue_id: str, owner: str, from_state: str) -> ClaimedEntry | None:
        """Move an entry into active/<owner>/ by an atomic rename and read its metadata.

        :param queue_id: the entry to claim.
        :param owner: the worker slot claiming it (e.g. "w0"); one live process per owner.
        :param from_state: incoming, deferred or hold.
        :returns: the claimed entry, or None when it is no longer in ``from_state``
            (another worker claimed it, or an operator moved it), or when it is corrupt
            (it is then moved to corrupt/ and logged).
        :raises ValueError: a bad queue ID, owner or state.
        """
        self._check_id(queue_id)
        source = self.layout.entry_path(from_state, queue_id)
        destination = self._active_path(owner, queue_id)
        try:
            os.rename(source, destination)
        except FileNotFoundError:
            return None
        try:
            envelope, content_size = read_entry_metadata(destination)
        except CorruptEntryError as error:
            self._quarantine(queue_id, destination, error)
            return None
        status = self._read_status(queue_id)
        return ClaimedEntry(queue_id, owner, destination, envelope, status, content_size)

    def mark_deferred(
        self, entry: ClaimedEntry, next_attempt_at: float, status: EntryStatus
    ) -> Deferred[None]:
        """Record ``status`` and move the entry to deferred/ until ``next_attempt_at``.

        The sidecar is written atomically (tmp/, fdatasync, rename), then the entry's
        mtime is set to ``next_attempt_at`` and it is renamed into deferred/, all in a pool
        thread (the fdatasync takes milliseconds).

        :returns: fires with None when done; errbacks with OSError (the entry then stays
            in active/<owner>/ and is delivered again after a reclaim).
        """
        return self._run_in_thread(self._mark_deferred_sync, entry, next_attempt_at, status)

    def _mark_deferred_sync(
        self, entry: ClaimedEntry, next_attempt_at: float, status: EntryStatus
    ) -> None:
        self._write_status(entry.queue_id, status)
        os.utime(entry.path, (next_attempt_at, next_attempt_at))
        os.rename(entry.path, self.layout.entry_path(DEFERRED, entry.queue_id))

    def complete(self, entry: ClaimedEntry) -> None:
        """Remove an entry that needs no more delivery: the entry file, then its sidecar.

        The entry goes first, so a crash in between leaves only an orphan sidecar,
        never an entry without its status.
        """
        _unlink_quietly(entry.path)
        _unlink_quietly(self.layout.status_path(entry.queue_id))

    def release(self, entry: ClaimedEntry) -> None:
        """Give a claimed entry back to incoming/ untouched (e.g. at shutdown).

        Its status sidecar is kept as it is; to record progress first, use
        mark_deferred() with the current time instead.
        """
        try:
            os.rename(entry.path, self.layout.entry_path(INCOMING, entry.queue_id))
        except FileNotFoundError:
            pass

    def reclaim(self, owner: str) -> int:
        """Return every entry in active/<owner>/ to incoming/ (that owner is not running).

        The master calls this when a worker dies and at start-up.

        :returns: how many entries were moved.
        """
        directory = self.layout.active_directory(owner)
        moved = 0
        for queue_id in self._list_ids(directory):
            try:
                os.rename(
                    os.path.join(directory, queue_id),
                    self.layout.entry_path(INCOMING, queue_id),
                )
            except FileNotFoundError:
                continue
            moved += 1
        return moved

    def reclaim_all(self) -> int:
        """Return every claimed entry of every owner to incoming/ (start-up, no worker runs).

        :returns: how many entries were moved.
        """
        return sum(self.reclaim(owner) for owner in self._owners())

    # Operator moves

    def hold(self, queue_id: str) -> bool:
        """Put an incoming or deferred entry on hold (it is not delivered until released).

        :returns: whether the entry was moved (False: not in incoming/ or deferred/).
        """
        self._check_id(queue_id)
        return self._move(queue_id, INCOMING, HOLD) or self._move(queue_id, DEFERRED, HOLD)

    def release_hold(self, queue_id: str) -> bool:
        """Move a held entry to incoming/ for delivery now.

        :returns: whether the entry was on hold.
        """
        self._check_id(queue_id)
        return self._move(queue_id, HOLD, INCOMING)

    def requeue(self, queue_id: str) -> bool:
        """Move a deferred entry to incoming/ to be tried now.

        :returns: whether the entry was deferred.
        """
        self._check_id(queue_id)
        return self._move(queue_id, DEFERRED, INCOMING)

    # Accounting and cleanup

    def counts(self) -> dict[str, int]:
        """The number of entries per state: incoming, active, deferred, hold.

        Cost: one directory listing per state and per active owner; no stat(). Listing
        100,000 entries takes tens of milliseconds, so call it for metrics every few
        seconds, not per message.
        """
        return {
            INCOMING: len(self._list_ids(self.layout.incoming)),
            ACTIVE: sum(
                len(self._list_ids(self.layout.active_directory(o))) for o in self._owners()
            ),
            DEFERRED: len(self._list_ids(self.layout.deferred)),
            HOLD: len(self._list_ids(self.layout.hold)),
        }

    def remove_stale_tmp(self, older_than_seconds: float) -> int:
        """Remove files in tmp/ not modified for ``older_than_seconds`` (crashed sessions).

        A live session's file is modified as DATA arrives, so an age longer than the
        longest possible session (e.g. a day) never removes one being written.

        :returns: how many files were removed.
        """
        cutoff = time.time() - older_than_seconds
        removed = 0
        with os.scandir(self.layout.tmp) as scanner:
            for item in scanner:
                try:
                    if item.is_file(follow_symlinks=False) and item.stat().st_mtime < cutoff:
                        os.unlink(item.path)
                        removed += 1
                except FileNotFoundError:
                    continue
        return removed

    # Helpers

    def _check_id(self, queue_id: str) -> None:
        """Refuse anything that is not a queue ID (it becomes part of a path)."""
        if not is_queue_id(queue_id):
            raise ValueError(f"not a queue ID: {queue_id!r}")

    def _active_path(self, owner: str, queue_id: str) -> str:
        """The entry's path in active/<owner>/, creating that directory once per owner."""
        if owner not in self._known_owners:
            directory = self.layout.active_directory(owner)
            try:
                os.mkdir(directory, 0o700)
            except FileExistsError:
                pass
            self._known_owners.add(owner)
        return self.layout.active_path(owner, queue_id)

    def _owners(self) -> list[str]:
        """The owner subdirectories present in active/."""
        with os.scandir(self.layout.active) as scanner:
            return [item.name for item in scanner if item.is_dir(follow_symlinks=False)]

    @staticmethod
    def _list_ids(directory: str) -> list[str]:
        """The queue IDs in one directory (missing directory: none)."""
        try:
            with os.scandir(directory) as scanner:
                return [item.name for item in scanner if is_queue_id(item.name)]
        except FileNotFoundError:
            return []

    def _move(self, queue_id: str, from_state: str, to_state: str) -> bool:
        try:
            os.rename(
                self.layout.entry_path(from_state, queue_id),
                self.layout.entry_path(to_state, queue_id),
            )
        except FileNotFoundError:
            return False
        return True

    def _read_status(self, queue_id: str) -> EntryStatus:
        """The entry's sidecar, or the empty status when there is none."""
        path = self.layout.status_path(queue_id)
        try:
            with open(path, "rb") as file:
                raw = file.read()
        except FileNotFoundError:
            return EntryStatus()
        try:
            return EntryStatus.from_json(raw)
        except (ValueError, TypeError, KeyError):
            # Cannot happen short of disk corruption (the sidecar is fsync'd before its
            # rename). Starting afresh re-delivers, which at-least-once allows.
            log.error("unreadable status sidecar queue_id={queue_id}", queue_id=queue_id)
            return EntryStatus()

    def _write_status(self, queue_id: str, status: EntryStatus) -> None:
        """Replace the sidecar atomically: tmp/<id>.status, fdatasync, rename."""
        tmp_path = self.layout.tmp_path(queue_id + ".status")
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            with open(fd, "wb", closefd=False) as file:
                file.write(status.to_json())
            _fdatasync(fd)
        finally:
            os.close(fd)
        os.rename(tmp_path, self.layout.status_path(queue_id))

    def _quarantine(self, queue_id: str, path: str, error: CorruptEntryError) -> None:
        """Move an unreadable entry to corrupt/ and tell the operator."""
        log.error(
            "corrupt queue entry moved to corrupt/ queue_id={queue_id} error={error}",
            queue_id=queue_id,
            error=str(error),
        )
        try:
            os.rename(path, self.layout.corrupt_path(queue_id))
        except FileNotFoundError:
            pass
