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
rename; see queue/incoming.py), in batches of concurrent commits that share one pool job
and one directory fsync (group_commit.py). The delivery side's renames, unlinks and small
reads run in the reactor thread: they cost tens of microseconds, unlike a file creation or
an fsync.

The entry file (one per queue entry, named by its queue ID, mode 0600), in this order:

1. the message content, ``content_size`` bytes, exactly as DATA decoding produced it (the
   Received header first); written behind while DATA arrives (or at commit when small);
2. the trailer: the envelope as one line of JSON (``Envelope.to_json()``,
   ``trailer_size`` bytes), written at the end of DATA, so data hooks can still add
   headers or decide hold;
3. the footer, 34 bytes of ASCII: LF, ``#TRQ1``, a space, ``trailer_size`` in 10 decimal
   digits, a space, ``content_size`` in 15 decimal digits, LF (incoming.FOOTER_FORMAT).

Reading the envelope is a read of the last 34 bytes and then of the trailer; reading the
content is the first content_size bytes. A file whose size is not content_size +
trailer_size + 34, or whose footer does not parse, is corrupt: claim() moves it to
corrupt/ for an operator. ``tail -n 2 FILE`` shows the envelope and footer to a person.

The status sidecar status/<queue ID> holds EntryStatus.to_json(): the per-recipient
outcomes so far. It is replaced atomically (written to tmp/, fsync'd, renamed). No
sidecar means no attempt yet.

States and moves (layout.py names the directories):

- commit: tmp → incoming (or hold, when a data hook said hold);
- claim: incoming, deferred (when due) or hold → active/<owner>;
- from active/<owner>: complete → removed (complete_later keeps a small entry's file in
  tmp/ as a spare for a new message to overwrite, spares.py); mark_deferred → deferred;
  release → incoming;
  reclaim(owner) → incoming (the owner's worker died or the relay restarts);
- operator moves: hold (incoming or deferred → hold), release_hold (hold → incoming),
  requeue (deferred → incoming).

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, Final, Protocol, TypeVar, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorCore, IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from twistedrelay.queue.entry import EntryStatus, Envelope
from twistedrelay.queue.group_commit import DEFAULT_COMMIT_LANES, CommitBatcher, SerialBatcher
from twistedrelay.queue.ids import QueueIdGenerator, is_queue_id
from twistedrelay.queue.incoming import (
    FOOTER_SIZE,
    FileSystem,
    IncomingMessage,
    QueueWriteError,
)
from twistedrelay.queue.layout import (
    ACTIVE,
    DEFERRED,
    HOLD,
    INCOMING,
    QueueLayout,
)
from twistedrelay.queue.spares import SpareFiles, spare_owner

log = Logger()

_T = TypeVar("_T")

_FOOTER_PREFIX: Final = b"\n#TRQ1 "
_READ_BUFFER_BYTES: Final = 64 * 1024
DEFAULT_THREADS: Final = 16


class CorruptEntryError(ValueError):
    """An entry file does not have the layout described in this module's docstring."""


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
    ``may_have_sidecar`` is False only for an entry committed claimed (a new queue ID has
    no sidecar), so completing it skips the unlink of a sidecar that cannot exist.
    ``content`` is the message content when the committing worker still had it in memory
    (committed claimed, never written behind): delivery then reads no file.
    """

    queue_id: str
    owner: str
    path: str
    envelope: Envelope
    status: EntryStatus
    content_size: int
    may_have_sidecar: bool = True
    content: bytes | None = None

    def open_content(self) -> BinaryIO:
        """Open the message content for reading, from its first byte to content_size.

        Each call opens the file again (or reads ``content``), so several deliveries can
        read it at once. The caller closes the returned file.
        """
        if self.content is not None:
            return io.BytesIO(self.content)
        raw = io.FileIO(self.path, "rb")
        return io.BufferedReader(_BoundedReader(raw, self.content_size), _READ_BUFFER_BYTES)


CommitObserver = Callable[[str, str], None]


class _ShutdownTriggers(Protocol):
    """The part of IReactorCore the store uses (typed here: zope interfaces are not)."""

    def addSystemEventTrigger(  # noqa: N802 (Twisted's name)
        self, phase: str, event_type: str, callable: Callable[[], None]
    ) -> object: ...

    def removeSystemEventTrigger(self, trigger_id: object) -> None: ...  # noqa: N802


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
    :param threads: the size of the store's own pool.
    :param commit_lanes: how many commit batches may run at once (group_commit.py).
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
        commit_lanes: int = DEFAULT_COMMIT_LANES,
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
        self._shutdown_trigger: object = None  # an opaque token from addSystemEventTrigger
        if threadpool is None:
            threadpool = self._owned_pool = ThreadPool(1, threads, "twistedrelay-queue")
            threadpool.start()
            if IReactorCore.providedBy(reactor):
                self._shutdown_trigger = cast(_ShutdownTriggers, reactor).addSystemEventTrigger(
                    "during", "shutdown", self.close
                )
        self._pool = threadpool
        self.group_commit = CommitBatcher(self._run_in_thread, self._fs, commit_lanes)
        self.spares = SpareFiles(self.layout, self._fs)
        self._removals: SerialBatcher[ClaimedEntry] = SerialBatcher(
            self._run_in_thread, self._remove_entries
        )
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
                    cast(_ShutdownTriggers, self._reactor).removeSystemEventTrigger(trigger)
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
        return IncomingMessage(
            queue_id,
            self.layout,
            self._fs,
            self._run_in_thread,
            self.group_commit.commit,
            self._after_commit,
            self.spares,
        )

    def commit_claimed(
        self, message: IncomingMessage, envelope: Envelope, owner: str
    ) -> Deferred[ClaimedEntry]:
        """Commit a new message straight into active/<owner>/, claimed by the committing worker.

        Durable as :meth:`IncomingMessage.commit` into incoming/ is (the batch's directory
        fsync covers active/<owner>/), but the entry never shows in incoming/ (no other
        worker's scan sees it) and costs no claim: no rename, no read-back of its metadata.
        If the worker dies, the master returns active/<owner>/ to incoming/ as for any claim.

        :param owner: the worker slot committing (e.g. "w0"); it delivers the entry.
        :returns: fires with the claimed entry (its envelope as written, no status yet) once
            durable; errbacks as commit() does.
        """
        destination = self._active_path(owner, message.queue_id)
        committed = message.commit(envelope, INCOMING, claimed_path=destination)
        return committed.addCallback(
            lambda _: ClaimedEntry(
                message.queue_id,
                owner,
                destination,
                envelope,
                EntryStatus(),
                message.size,
                may_have_sidecar=False,
                content=message.content_in_memory,
            )
        )

    def _after_commit(self, committed: Deferred[None], queue_id: str, state: str) -> Deferred[None]:
        """Tell the observers about a durable entry, or log and map a failed commit."""

        def durable(_: None) -> None:
            self._notify_committed(queue_id, state)

        def failed(failure: Failure) -> None:
            error = failure.value if failure.value is not None else RuntimeError(failure)
            raise self._report_write_error(queue_id, error)

        committed.addCallbacks(durable, failed)
        return committed

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
        self._fs.remove(entry.path)
        self._remove_sidecar(entry)

    def _remove_sidecar(self, entry: ClaimedEntry) -> None:
        if entry.may_have_sidecar:
            self._fs.remove(self.layout.status_path(entry.queue_id))

    def complete_later(self, entry: ClaimedEntry) -> Deferred[None]:
        """complete() in a pool thread, batched with the completions that arrive meanwhile.

        For the delivery path: an unlink waits for the file system's journal while other
        sessions' fsyncs run (milliseconds under load), which the reactor thread must not.
        A crash before the batch runs leaves the entry in active/<owner>/, delivered again
        after a reclaim (at-least-once).

        :returns: fires with None once the entry is removed (a failure is logged, never
            raised: the entry is then delivered again after a reclaim).
        """
        return self._removals.add(entry)

    def _remove_entries(self, entries: list[ClaimedEntry]) -> None:
        """Pool job of complete_later(): retire each entry's file, then remove its sidecar."""
        for entry in entries:
            try:
                self.spares.retire(entry.path, entry.owner, entry.queue_id, entry.content_size)
                self._remove_sidecar(entry)
            except OSError as error:
                log.error(
                    "cannot remove delivered entry queue_id={queue_id} error={error!r}",
                    queue_id=entry.queue_id,
                    error=error,
                )

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
        return self._remove_tmp(
            lambda item: item.is_file(follow_symlinks=False) and item.stat().st_mtime < cutoff
        )

    def remove_spares(self, owner: str | None = None) -> int:
        """Remove the spare files (spares.py) of ``owner``, or of every owner.

        Only for spares no live process uses: a worker's once it has ended, everyone's
        before the workers start.

        :returns: how many files were removed.
        """
        return self._remove_tmp(
            lambda item: (
                (found := spare_owner(item.name)) is not None and (owner is None or found == owner)
            )
        )

    def _remove_tmp(self, chosen: Callable[[os.DirEntry[str]], bool]) -> int:
        """Unlink the files of tmp/ that ``chosen`` picks; returns how many."""
        removed = 0
        with os.scandir(self.layout.tmp) as scanner:
            for item in scanner:
                try:
                    if chosen(item):
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
            self._fs.sync_file(fd)
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
