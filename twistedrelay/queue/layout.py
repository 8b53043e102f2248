"""The queue directory layout: one subdirectory per queue state, and path helpers.

Owns the names of the queue's directories and where an entry of a given state lives. It
does no I/O beyond creating the directories (that is queue/store.py). The layout::

    <queue>/tmp/             entries being written by an SMTP session, sidecars being
                             replaced, and spare files (spares.py); never read by delivery
    <queue>/incoming/        durable entries waiting for their first (or a released) attempt
    <queue>/active/<owner>/  entries claimed by one worker slot ("w0", "w1", ...)
    <queue>/deferred/        entries waiting for a retry; mtime = next attempt time
    <queue>/hold/            entries an operator (or a data hook) put aside
    <queue>/status/          per-entry mutable delivery status (JSON sidecar)
    <queue>/corrupt/         entries that cannot be read, kept for an operator

Every file but a sidecar is named by its queue ID; a sidecar is status/<queue ID>.
All directories are on one file system, so moving between states is an atomic rename(2).
"""

from __future__ import annotations

import os
import re
from typing import Final

INCOMING: Final = "incoming"
ACTIVE: Final = "active"
DEFERRED: Final = "deferred"
HOLD: Final = "hold"

#: The states an operator can see and count (DESIGN.md "The queue on disk").
STATES: Final = (INCOMING, ACTIVE, DEFERRED, HOLD)

TMP: Final = "tmp"
STATUS: Final = "status"
CORRUPT: Final = "corrupt"

_FLAT_DIRECTORIES: Final = (TMP, INCOMING, ACTIVE, DEFERRED, HOLD, STATUS, CORRUPT)
_OWNER_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
DIRECTORY_MODE: Final = 0o700


def is_owner_name(owner: str) -> bool:
    """Whether ``owner`` can name an active/ subdirectory (no slash, not "." or "..")."""
    return _OWNER_RE.match(owner) is not None and owner not in (".", "..")


class QueueLayout:
    """Paths inside one queue directory.

    :param directory: the queue directory (``[queue] directory`` in the config).
    """

    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(directory)
        self.tmp = os.path.join(self.directory, TMP)
        self.incoming = os.path.join(self.directory, INCOMING)
        self.active = os.path.join(self.directory, ACTIVE)
        self.deferred = os.path.join(self.directory, DEFERRED)
        self.hold = os.path.join(self.directory, HOLD)
        self.status = os.path.join(self.directory, STATUS)
        self.corrupt = os.path.join(self.directory, CORRUPT)

    def create(self) -> None:
        """Create the queue directory and its state directories (mode 0700), if missing."""
        os.makedirs(self.directory, mode=DIRECTORY_MODE, exist_ok=True)
        for name in _FLAT_DIRECTORIES:
            try:
                os.mkdir(os.path.join(self.directory, name), DIRECTORY_MODE)
            except FileExistsError:
                pass

    def is_created(self) -> bool:
        """Whether every state directory exists."""
        return all(os.path.isdir(os.path.join(self.directory, n)) for n in _FLAT_DIRECTORIES)

    def state_directory(self, state: str) -> str:
        """The directory of a flat state (incoming, deferred, hold).

        :raises ValueError: ``state`` is not a flat state (active needs an owner).
        """
        if state == INCOMING:
            return self.incoming
        if state == DEFERRED:
            return self.deferred
        if state == HOLD:
            return self.hold
        raise ValueError(f"not a flat queue state: {state!r}")

    def active_directory(self, owner: str) -> str:
        """The active/ subdirectory of one worker slot.

        :raises ValueError: ``owner`` is not a valid owner name.
        """
        if not is_owner_name(owner):
            raise ValueError(f"not a valid queue owner name: {owner!r}")
        return os.path.join(self.active, owner)

    def entry_path(self, state: str, queue_id: str) -> str:
        """Where an entry in a flat state lives."""
        return os.path.join(self.state_directory(state), queue_id)

    def active_path(self, owner: str, queue_id: str) -> str:
        """Where an entry claimed by ``owner`` lives."""
        return os.path.join(self.active_directory(owner), queue_id)

    def tmp_path(self, name: str) -> str:
        """A file in tmp/."""
        return os.path.join(self.tmp, name)

    def status_path(self, queue_id: str) -> str:
        """The status sidecar of an entry."""
        return os.path.join(self.status, queue_id)

    def corrupt_path(self, queue_id: str) -> str:
        """Where an unreadable entry is kept for an operator."""
        return os.path.join(self.corrupt, queue_id)
