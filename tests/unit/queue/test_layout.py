"""The queue directory layout: creation, modes and path helpers."""

from __future__ import annotations

import os
import stat

import pytest

from twistedrelay.queue.layout import STATES, QueueLayout, is_owner_name


def test_create_makes_every_state_directory_with_mode_0700(tmp_path):
    """create() makes tmp, the four states, status and corrupt, private to the relay."""
    layout = QueueLayout(str(tmp_path / "queue"))
    assert not layout.is_created()
    layout.create()
    assert layout.is_created()
    for name in ("tmp", "incoming", "active", "deferred", "hold", "status", "corrupt"):
        mode = os.stat(tmp_path / "queue" / name).st_mode
        assert stat.S_IMODE(mode) == 0o700, name


def test_create_twice_is_harmless(tmp_path):
    """The master may create the layout on every start."""
    layout = QueueLayout(str(tmp_path))
    layout.create()
    layout.create()
    assert layout.is_created()


def test_states_are_the_four_the_operator_counts():
    """The states match the metric labels of DESIGN.md."""
    assert STATES == ("incoming", "active", "deferred", "hold")


def test_paths_of_each_state(tmp_path):
    """Each flat state has its directory and active entries live under their owner."""
    layout = QueueLayout(str(tmp_path))
    queue_id = "0" * 20
    assert layout.entry_path("incoming", queue_id) == str(tmp_path / "incoming" / queue_id)
    assert layout.entry_path("deferred", queue_id) == str(tmp_path / "deferred" / queue_id)
    assert layout.entry_path("hold", queue_id) == str(tmp_path / "hold" / queue_id)
    assert layout.active_path("w1", queue_id) == str(tmp_path / "active" / "w1" / queue_id)
    assert layout.status_path(queue_id) == str(tmp_path / "status" / queue_id)


def test_active_is_not_a_flat_state(tmp_path):
    """Asking for active/ without an owner is a programming error."""
    with pytest.raises(ValueError):
        QueueLayout(str(tmp_path)).state_directory("active")


@pytest.mark.parametrize("owner", ["", ".", "..", "a/b", "../w0", "x" * 65])
def test_owner_names_that_could_escape_active_are_refused(owner, tmp_path):
    """An owner name never becomes a path outside active/."""
    assert not is_owner_name(owner)
    with pytest.raises(ValueError):
        QueueLayout(str(tmp_path)).active_directory(owner)


def test_worker_slot_names_are_owner_names():
    """The master's slot names are valid."""
    assert all(is_owner_name(f"w{i}") for i in range(64))
