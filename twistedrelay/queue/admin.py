"""``twistedrelay queue``: look at the queue and move entries by hand, as an operator.

Owns the queue admin command: ``show`` (a table shaped like Postfix's qshape), ``list``
(one line per entry, like mailq), and the operator moves ``hold``, ``release``,
``requeue`` and ``delete``. Every move goes through QueueStore (an atomic rename), so the
command is safe while the relay runs: an entry a worker has claimed (active) is never
touched, and the command says so instead.

What it deliberately does not do: deliver, or change an entry's envelope or content.

A listing is a snapshot, not a transaction: an entry that a worker claims or finishes
while the directories are read may be missing from it (a later run shows it again).
Ages count from the envelope's arrival time, not from a file's mtime (a deferred entry's
mtime is its next attempt time, see queue/store.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, TextIO

from twistedrelay.config import ConfigError, load_config
from twistedrelay.queue.entry import EntryStatus, Envelope
from twistedrelay.queue.ids import is_queue_id
from twistedrelay.queue.layout import ACTIVE, DEFERRED, HOLD, INCOMING, STATES, QueueLayout
from twistedrelay.queue.store import CorruptEntryError, QueueStore, read_entry_metadata

#: qshape's age buckets, in minutes: a column counts entries younger than its bound and at
#: least as old as the previous one; the last column ("1280+") counts everything older.
AGE_BUCKETS_MINUTES: Final = (5, 10, 20, 40, 80, 160, 320, 640, 1280)
DEFAULT_TOP: Final = 10
#: The queue owner name the command claims entries under while it deletes them. A crash in
#: between leaves the entry in active/admin/, which the master returns to incoming/ at start.
ADMIN_OWNER: Final = "admin"
LOCAL_DOMAIN: Final = "(local)"

EXIT_OK: Final = 0
EXIT_NOT_FOUND: Final = 1
EXIT_USAGE: Final = 2


@dataclass(frozen=True, slots=True)
class ListedEntry:
    """One queue entry as the admin command sees it.

    ``owner`` is the worker slot of an active entry ("" otherwise); ``next_attempt_at`` is
    set for deferred entries only; ``pending_domains`` has one item per recipient still to
    deliver (recipients already delivered or bounced are left out, as qshape does).
    """

    queue_id: str
    state: str
    owner: str
    envelope: Envelope
    content_size: int
    next_attempt_at: float | None
    pending_domains: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class QueueShape:
    """Recipient counts of one state by domain and age bucket (qshape's table).

    Each row has one count per column of :data:`AGE_BUCKETS_MINUTES` plus the "1280+"
    column.
    """

    total: tuple[int, ...]
    domains: dict[str, tuple[int, ...]]


def age_bucket(age_seconds: float) -> int:
    """The index of the qshape column an entry of this age falls in (0 … len(buckets))."""
    minutes = age_seconds / 60
    for index, bound in enumerate(AGE_BUCKETS_MINUTES):
        if minutes < bound:
            return index
    return len(AGE_BUCKETS_MINUTES)


def build_shape(recipients: Iterable[tuple[str, float]]) -> QueueShape:
    """Count (domain, age in seconds) pairs into a qshape table.

    :param recipients: one pair per pending recipient of the state being shaped.
    """
    columns = len(AGE_BUCKETS_MINUTES) + 1
    counts: dict[str, list[int]] = {}
    total = [0] * columns
    for domain, age_seconds in recipients:
        bucket = age_bucket(age_seconds)
        counts.setdefault(domain, [0] * columns)[bucket] += 1
        total[bucket] += 1
    return QueueShape(tuple(total), {d: tuple(row) for d, row in counts.items()})


def format_shape(shape: QueueShape, top: int = DEFAULT_TOP) -> list[str]:
    """Render a shape as qshape does: a header, TOTAL, then the ``top`` busiest domains.

    Domains are ordered by their total (most first), then by name.
    """
    header = ("T", *(str(b) for b in AGE_BUCKETS_MINUTES), f"{AGE_BUCKETS_MINUTES[-1]}+")
    ranked = sorted(shape.domains.items(), key=lambda item: (-sum(item[1]), item[0]))[:top]
    rows = [("TOTAL", shape.total), *ranked]
    name_width = max(len(name) for name, _ in rows)
    table = [("", header), *((name, (str(sum(c)), *map(str, c))) for name, c in rows)]
    widths = [max(len(cells[i]) for _, cells in table) for i in range(len(header))]
    lines = []
    for name, cells in table:
        padded = (f"{cell:>{width}}" for cell, width in zip(cells, widths, strict=True))
        lines.append(f"{name:>{name_width}} " + " ".join(padded))
    return lines


def format_time(epoch_seconds: float) -> str:
    """An epoch time as ISO 8601 UTC to the second (sortable, unambiguous in a log)."""
    return datetime.fromtimestamp(epoch_seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_entry(entry: ListedEntry) -> str:
    """One ``queue list`` line: ID, state, arrival, size, sender, recipients."""
    envelope = entry.envelope
    state = f"{entry.state}:{entry.owner}" if entry.owner else entry.state
    recipients = ",".join(r.address for r in envelope.recipients)
    line = (
        f"{entry.queue_id} {state:<11} {format_time(envelope.arrival_time)} "
        f"{entry.content_size:>10} <{envelope.sender}> {recipients}"
    )
    if entry.next_attempt_at is not None:
        line += f" next_attempt={format_time(entry.next_attempt_at)}"
    return line


def _read_status(layout: QueueLayout, queue_id: str) -> EntryStatus:
    """The entry's status sidecar; the empty status when there is none or it is unreadable."""
    try:
        with open(layout.status_path(queue_id), "rb") as file:
            return EntryStatus.from_json(file.read())
    except (OSError, ValueError, TypeError, KeyError):
        return EntryStatus()


def _state_directories(layout: QueueLayout) -> Iterator[tuple[str, str, str]]:
    """(state, owner, directory) for every state directory, active/ once per owner."""
    yield INCOMING, "", layout.incoming
    try:
        with os.scandir(layout.active) as scanner:
            owners = sorted(item.name for item in scanner if item.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        owners = []
    for owner in owners:
        yield ACTIVE, owner, layout.active_directory(owner)
    yield DEFERRED, "", layout.deferred
    yield HOLD, "", layout.hold


def scan_entries(layout: QueueLayout, errors: TextIO = sys.stderr) -> Iterator[ListedEntry]:
    """Every readable entry of the queue, state by state, oldest first within a state.

    A corrupt entry is reported on ``errors`` and skipped; an entry that moves while it is
    read is skipped (see the module docstring).
    """
    for state, owner, directory in _state_directories(layout):
        try:
            with os.scandir(directory) as scanner:
                names = sorted(item.name for item in scanner if is_queue_id(item.name))
        except FileNotFoundError:
            continue
        for queue_id in names:
            path = os.path.join(directory, queue_id)
            try:
                envelope, content_size = read_entry_metadata(path)
                next_attempt_at = os.stat(path).st_mtime if state == DEFERRED else None
            except FileNotFoundError:
                continue
            except CorruptEntryError as error:
                print(f"twistedrelay queue: skipping corrupt entry: {error}", file=errors)
                continue
            status = _read_status(layout, queue_id)
            domains = tuple(r.domain or LOCAL_DOMAIN for r in status.pending(envelope))
            yield ListedEntry(
                queue_id, state, owner, envelope, content_size, next_attempt_at, domains
            )


def show_queue(entries: Sequence[ListedEntry], now: float, top: int = DEFAULT_TOP) -> list[str]:
    """The ``queue show`` report: messages per state, then one qshape table per state."""
    messages = Counter(entry.state for entry in entries)
    lines = ["messages: " + " ".join(f"{state}={messages[state]}" for state in STATES)]
    for state in STATES:
        shape = build_shape(
            (domain, now - entry.envelope.arrival_time)
            for entry in entries
            if entry.state == state
            for domain in entry.pending_domains
        )
        lines += ["", f"{state} (recipients by domain and age in minutes):"]
        lines += format_shape(shape, top)
    return lines


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twistedrelay queue", description="Inspect and manage the mail queue."
    )
    parser.add_argument("--config", help="relay.toml naming the queue (default: embedded)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    show = commands.add_parser("show", help="messages per state and a qshape-like table")
    show.add_argument("--top", type=int, default=DEFAULT_TOP, help="domains shown per state")
    listing = commands.add_parser("list", help="one line per entry")
    listing.add_argument("state", nargs="?", choices=STATES, help="only this state")
    for name, text in (
        ("hold", "put an incoming or deferred entry on hold"),
        ("release", "move a held entry to incoming"),
        ("delete", "remove an entry that is not being delivered, and its status"),
    ):
        commands.add_parser(name, help=text).add_argument("queue_id", metavar="ID")
    requeue = commands.add_parser("requeue", help="move deferred entries to incoming now")
    which = requeue.add_mutually_exclusive_group(required=True)
    which.add_argument("queue_id", metavar="ID", nargs="?")
    which.add_argument("--all", action="store_true", help="every deferred entry")
    # The top-level --config is also accepted after the command, where operators type it.
    for sub in commands.choices.values():
        sub.add_argument("--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _delete(store: QueueStore, queue_id: str) -> bool:
    """Claim the entry (so no worker can start on it) and remove it with its sidecar."""
    for state in (INCOMING, DEFERRED, HOLD):
        entry = store.claim(queue_id, ADMIN_OWNER, state)
        if entry is not None:
            store.complete(entry)
            return True
    return False


def _is_active(layout: QueueLayout, queue_id: str) -> bool:
    return any(
        os.path.exists(os.path.join(directory, queue_id))
        for state, _, directory in _state_directories(layout)
        if state == ACTIVE
    )


def _move(store: QueueStore, command: str, queue_id: str) -> int:
    """Run one operator move on one entry and report it on stdout (or why not on stderr)."""
    moves = {
        "hold": (store.hold, "held", "not in incoming or deferred"),
        "release": (store.release_hold, "released to incoming", "not on hold"),
        "requeue": (store.requeue, "requeued to incoming", "not deferred"),
        "delete": (lambda i: _delete(store, i), "deleted", "not in incoming, deferred or hold"),
    }
    move, done, not_found = moves[command]
    if move(queue_id):
        print(f"{queue_id}: {done}")
        return EXIT_OK
    if _is_active(store.layout, queue_id):
        not_found = "active (being delivered); try again when the attempt is over"
    print(f"twistedrelay queue {command}: {queue_id}: {not_found}", file=sys.stderr)
    return EXIT_NOT_FOUND


def main(argv: list[str]) -> int:
    """Run ``twistedrelay queue COMMAND ...``; returns the exit status.

    0: done; 1: the queue or the entry is not where the command needs it; 2: bad usage or
    config (argparse exits with 2 itself for bad options).
    """
    args = _build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return EXIT_USAGE
    queue_id: str | None = getattr(args, "queue_id", None)
    if queue_id is not None and not is_queue_id(queue_id):
        print(f"twistedrelay queue: not a queue ID: {queue_id!r}", file=sys.stderr)
        return EXIT_USAGE
    layout = QueueLayout(str(config.queue.directory))
    if not layout.is_created():
        print(f"twistedrelay queue: no queue in {layout.directory}", file=sys.stderr)
        return EXIT_NOT_FOUND
    if args.command == "show":
        for line in show_queue(list(scan_entries(layout)), time.time(), args.top):
            print(line)
        return EXIT_OK
    if args.command == "list":
        for entry in scan_entries(layout):
            if args.state is None or entry.state == args.state:
                print(format_entry(entry))
        return EXIT_OK
    from twisted.internet import reactor as global_reactor

    # Any: the global reactor is typed as a module, not as the interfaces it provides. The
    # store needs it only to deliver thread-pool results (commits), which no operator move
    # uses; close() stops the thread pool the store starts.
    reactor: Any = global_reactor
    store = QueueStore(layout.directory, reactor, threads=1)
    try:
        if args.command == "requeue" and args.all:
            moved = sum(store.requeue(i) for i, _ in store.scan_deferred())
            print(f"requeued {moved} deferred entries to incoming")
            return EXIT_OK
        assert queue_id is not None  # argparse requires an ID for every other move
        return _move(store, args.command, queue_id)
    finally:
        store.close()
