"""Spare entry files: the files of delivered entries, kept for new messages to overwrite.

Why: on the accept path the file system's work per message is mostly allocating a new
inode and, after delivery, freeing it, not writing 1 KiB. ext4 without a journal (the
development VM's disk) also skips every inode freed in the last half minute when it
allocates one (``recently_deleted``), so in a spool that creates and unlinks a thousand
files a second each creation scans past thousands of them. Overwriting the file of an
entry that has just been delivered costs no inode or bitmap change at all; its data
blocks are usually allocated already. Measured: PERFORMANCE.md round 6 and
``benchmarks/micro/bench_fsync_strategies.py --strategies recycle``.

How: completing a small delivered entry renames its file to
``tmp/spare.<queue ID>.<owner>`` instead of unlinking it (SpareFiles.retire); a new
message of the same process then opens that file instead of creating one, writes from
offset 0, truncates it to its own length, fdatasyncs and renames it into its state as
usual (incoming.IncomingMessage). The commit's durability rules do not change.

Safety:

- A spare is never an entry: it lives in tmp/, which no state scan reads.
- A spare is reused only by the process that retired it, in that process's life. The
  master removes a worker's spares when the worker ends, and every spare at start-up
  (QueueStore.remove_spares). A machine crash may leave a spare's name and an entry's name on the
  same file (a rename half on disk); removing the spare's name never harms the entry.
- A worker keeps at most SPARE_LIMIT spares, and only of entries whose content is at most
  SPARE_CONTENT_LIMIT bytes; every other delivered entry is unlinked as before.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Final

from twistedrelay.queue.ids import QUEUE_ID_LENGTH
from twistedrelay.queue.layout import QueueLayout

if TYPE_CHECKING:
    from twistedrelay.queue.incoming import FileSystem

#: The most spare files one process keeps: 4 KiB of disk each for 1 KiB mail, at most
#: about 68 KiB each (SPARE_CONTENT_LIMIT and an envelope).
SPARE_LIMIT: Final = 512
#: Larger delivered entries are unlinked: reusing them would keep large blocks allocated.
SPARE_CONTENT_LIMIT: Final = 64 * 1024
SPARE_PREFIX: Final = "spare."


class SpareFiles:
    """One process's spare files; ``retire`` and ``take`` may run in any pool thread.

    The stack is a deque, whose append and pop are atomic; the limit is checked without a
    lock, so concurrent retirements may pass it by a few files.
    """

    def __init__(self, layout: QueueLayout, filesystem: FileSystem, limit: int = SPARE_LIMIT):
        self._layout = layout
        self._fs = filesystem
        self._limit = limit
        self._paths: deque[str] = deque()

    def __len__(self) -> int:
        return len(self._paths)

    def retire(self, entry_path: str, owner: str, queue_id: str, content_size: int) -> None:
        """Remove a delivered entry from the queue: keep its file as a spare, or unlink it.

        :raises OSError: the rename or unlink failed (the entry is then still queued).
        """
        if content_size > SPARE_CONTENT_LIMIT or len(self._paths) >= self._limit:
            self._fs.remove(entry_path)
            return
        spare = self._layout.tmp_path(f"{SPARE_PREFIX}{queue_id}.{owner}")
        try:
            self._fs.rename(entry_path, spare)
        except FileNotFoundError:
            return  # already gone, as remove() allows
        self._paths.append(spare)

    def take(self) -> str | None:
        """A spare file's path for a new message to overwrite, or None when there is none.

        The most recent first: its blocks are the likeliest to be cached.
        """
        try:
            return self._paths.pop()
        except IndexError:
            return None


def spare_owner(name: str) -> str | None:
    """The owner of the spare file named ``name`` in tmp/, or None if it is not a spare."""
    if not name.startswith(SPARE_PREFIX):
        return None
    return name[len(SPARE_PREFIX) + QUEUE_ID_LENGTH + 1 :] or None
