"""``twistedrelay queue`` on a real queue made by QueueStore: show, list and operator moves."""

from __future__ import annotations

import os
import time

import pytest
import pytest_twisted

from twistedrelay.cli import main as cli_main
from twistedrelay.queue.admin import main
from twistedrelay.queue.entry import DELIVERED, EntryStatus, Envelope, Recipient
from twistedrelay.queue.store import QueueStore

BODY = b"Subject: admin test\r\n\r\nhello\r\n"


@pytest.fixture
def queue(tmp_path):
    """A QueueStore in tmp_path and a relay.toml that names it."""
    from twisted.internet import reactor

    directory = tmp_path / "queue"
    QueueStore.create(str(directory))
    (tmp_path / "relay.toml").write_text(
        f'hostname = "relay.example.test"\n[queue]\ndirectory = "{directory}"\n'
    )
    store = QueueStore(str(directory), reactor)
    yield store
    store.close()


def _config(store: QueueStore) -> str:
    return os.path.join(os.path.dirname(store.layout.directory), "relay.toml")


async def _queue(store, *recipients, state="incoming", age_seconds=0.0, sender="s@example.org"):
    message = store.open_message()
    message.write(BODY)
    envelope = Envelope(
        queue_id=message.queue_id,
        sender=sender,
        recipients=tuple(Recipient(r) for r in recipients),
        arrival_time=time.time() - age_seconds,
    )
    await message.commit(envelope, state)
    return message.queue_id


async def _deferred(store, *recipients, age_seconds=0.0, status=None):
    queue_id = await _queue(store, *recipients, age_seconds=age_seconds)
    entry = store.claim(queue_id, "w0", "incoming")
    await store.mark_deferred(entry, time.time() + 600, status or EntryStatus())
    return queue_id


def _run(store, capsys, *argv):
    code = main([*argv, "--config", _config(store)])
    out, err = capsys.readouterr()
    return code, out, err


def _where(store, queue_id):
    layout = store.layout
    found = [
        s
        for s in ("incoming", "deferred", "hold")
        if os.path.exists(layout.entry_path(s, queue_id))
    ]
    found += [
        f"active/{o}"
        for o in os.listdir(layout.active)
        if os.path.exists(layout.active_path(o, queue_id))
    ]
    return found


@pytest_twisted.ensureDeferred
async def test_show_counts_states_and_shapes_pending_recipients_by_domain_and_age(queue, capsys):
    """``queue show`` counts messages per state and tables pending recipients like qshape."""
    await _queue(queue, "a@one.test", "b@two.test")
    await _queue(queue, "c@one.test", state="hold")
    delivered = EntryStatus().with_outcome("d@two.test", DELIVERED, "250 ok")
    await _deferred(
        queue, "d@two.test", "e@two.test", "f@one.test", age_seconds=90 * 60, status=delivered
    )
    claimed = await _queue(queue, "g@three.test")
    queue.claim(claimed, "w1", "incoming")

    code, out, _ = _run(queue, capsys, "show")

    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "messages: incoming=1 active=1 deferred=1 hold=1"
    deferred = lines.index("deferred (recipients by domain and age in minutes):")
    # d@two.test is delivered already: only e@two.test and f@one.test are pending, 90 minutes old.
    assert lines[deferred + 2].split() == ["TOTAL", "2", *["0"] * 5, "2", *["0"] * 4]
    assert sorted(line.split()[0] for line in lines[deferred + 3 : deferred + 5]) == [
        "one.test",
        "two.test",
    ]
    incoming = lines.index("incoming (recipients by domain and age in minutes):")
    assert lines[incoming + 2].split()[:3] == ["TOTAL", "2", "2"]
    active = lines.index("active (recipients by domain and age in minutes):")
    assert lines[active + 3].split()[:2] == ["three.test", "1"]


@pytest_twisted.ensureDeferred
async def test_list_prints_one_line_per_entry_filtered_by_state(queue, capsys):
    """``queue list`` has one line per entry; ``queue list deferred`` only the deferred ones."""
    first = await _queue(queue, "a@one.test", sender="alice@example.org")
    second = await _deferred(queue, "b@two.test")

    code, out, _ = _run(queue, capsys, "list")
    assert code == 0
    lines = out.splitlines()
    assert [line.split()[:2] for line in lines] == [[first, "incoming"], [second, "deferred"]]
    assert lines[0].split()[3:] == [str(len(BODY)), "<alice@example.org>", "a@one.test"]
    assert "next_attempt=" in lines[1]

    code, out, _ = _run(queue, capsys, "list", "deferred")
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()] == [second]


@pytest_twisted.ensureDeferred
async def test_hold_then_release_moves_an_entry_through_hold(queue, capsys):
    """hold moves incoming → hold; release moves it back to incoming."""
    queue_id = await _queue(queue, "a@one.test")

    assert _run(queue, capsys, "hold", queue_id)[0] == 0
    assert _where(queue, queue_id) == ["hold"]
    assert _run(queue, capsys, "release", queue_id)[0] == 0
    assert _where(queue, queue_id) == ["incoming"]


@pytest_twisted.ensureDeferred
async def test_release_of_an_entry_not_on_hold_fails_and_moves_nothing(queue, capsys):
    """release of an incoming entry exits 1 with a message, leaving the entry where it was."""
    queue_id = await _queue(queue, "a@one.test")

    code, _, err = _run(queue, capsys, "release", queue_id)

    assert code == 1
    assert f"{queue_id}: not on hold" in err
    assert _where(queue, queue_id) == ["incoming"]


@pytest_twisted.ensureDeferred
async def test_requeue_moves_one_or_all_deferred_entries_to_incoming(queue, capsys):
    """requeue ID moves that deferred entry; requeue --all moves every deferred entry."""
    one, two, three = [await _deferred(queue, f"r{i}@one.test") for i in range(3)]

    assert _run(queue, capsys, "requeue", one)[0] == 0
    assert _where(queue, one) == ["incoming"]
    code, out, _ = _run(queue, capsys, "requeue", "--all")
    assert code == 0
    assert "requeued 2 deferred entries" in out
    assert _where(queue, two) == _where(queue, three) == ["incoming"]


@pytest_twisted.ensureDeferred
async def test_delete_removes_the_entry_and_its_status_sidecar(queue, capsys):
    """delete of a deferred entry removes its file and status; nothing is left in active/."""
    queue_id = await _deferred(queue, "a@one.test")
    assert os.path.exists(queue.layout.status_path(queue_id))

    code, out, _ = _run(queue, capsys, "delete", queue_id)

    assert code == 0
    assert f"{queue_id}: deleted" in out
    assert _where(queue, queue_id) == []
    assert not os.path.exists(queue.layout.status_path(queue_id))


@pytest_twisted.ensureDeferred
async def test_moves_refuse_an_active_entry(queue, capsys):
    """An entry a worker has claimed is neither held nor deleted, and the error says why."""
    queue_id = await _queue(queue, "a@one.test")
    queue.claim(queue_id, "w0", "incoming")

    for command in ("hold", "delete"):
        code, _, err = _run(queue, capsys, command, queue_id)
        assert code == 1
        assert "active (being delivered)" in err
    assert _where(queue, queue_id) == ["active/w0"]


def test_bad_queue_id_is_a_usage_error(tmp_path, capsys):
    """A queue ID of the wrong form never becomes part of a path: exit 2."""
    config = tmp_path / "relay.toml"
    config.write_text(f'hostname = "relay.example.test"\n[queue]\ndirectory = "{tmp_path}"\n')
    assert main(["delete", "../../etc/passwd", "--config", str(config)]) == 2
    assert "not a queue ID" in capsys.readouterr().err


def test_missing_queue_directory_is_reported(tmp_path, capsys):
    """``queue show`` on a config whose queue does not exist exits 1 naming the directory."""
    config = tmp_path / "relay.toml"
    config.write_text(
        f'hostname = "relay.example.test"\n[queue]\ndirectory = "{tmp_path / "nope"}"\n'
    )
    assert main(["--config", str(config), "show"]) == 1
    assert "no queue in" in capsys.readouterr().err


def test_cli_dispatches_queue_to_the_admin_command(tmp_path, capsys):
    """``twistedrelay queue show`` reaches queue/admin.py (the console script's dispatch)."""
    directory = tmp_path / "queue"
    QueueStore.create(str(directory))
    config = tmp_path / "relay.toml"
    config.write_text(f'hostname = "relay.example.test"\n[queue]\ndirectory = "{directory}"\n')
    assert cli_main(["queue", "show", "--config", str(config)]) == 0
    assert capsys.readouterr().out.startswith("messages: incoming=0 active=0 deferred=0 hold=0")
