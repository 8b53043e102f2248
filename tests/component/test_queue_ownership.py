"""The master gives the queue to ``[workers] user`` before the workers start (as root)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from twistedrelay.process.master import give_tree
from twistedrelay.queue.store import QueueStore

NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="changing owners needs root")


def test_the_queue_tree_is_given_to_the_workers_user(tmp_path: Path) -> None:
    """Directories the master made and files left by a run as another user all change
    owner, once: a second pass finds nothing to do."""
    queue = tmp_path / "queue"
    QueueStore.create(str(queue))
    (queue / "incoming" / "OLDENTRY").write_bytes(b"left by a run as root")
    directories = sum(1 for _ in os.walk(queue))
    assert give_tree(str(queue), NOBODY, NOBODY) == directories + 1
    for root, _, files in os.walk(queue):
        for path in (root, *(os.path.join(root, name) for name in files)):
            stat = os.lstat(path)
            assert (stat.st_uid, stat.st_gid) == (NOBODY, NOBODY), path
    assert give_tree(str(queue), NOBODY, NOBODY) == 0
    assert give_tree(str(queue), None, 0) == directories + 1  # the group alone
    assert os.lstat(queue).st_uid == NOBODY
