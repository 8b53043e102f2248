"""The rate_limit plugin: counts per client, sender and user, shared by processes via SQLite."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import task

from twistedrelay.config import ConfigError, PluginsConfig
from twistedrelay.hooks import HookRunner, MailContext, RcptContext, Verdict, load_plugins
from twistedrelay.smtp import replies

NOW = 1_700_000_040.0  # the start of a 60 s window


def load(tmp_path: Path, **settings: Any) -> HookRunner:
    settings.setdefault("state_file", str(tmp_path / "state" / "rate.sqlite"))
    config = PluginsConfig(enabled=("rate_limit",), settings={"rate_limit": settings})
    return load_plugins(config, task.Clock(), "relay.toml")


def decide(runner: HookRunner, hook: str, **fields: Any):
    fields.setdefault("client_address", "192.0.2.1")
    fields.setdefault("sender", "a@example.org")
    fields.setdefault("now", NOW)
    if hook == "rcpt":
        ctx = RcptContext(recipient="b@example.net", **fields)
    else:
        ctx = MailContext(**fields)
    results: list[Any] = []
    runner.run(hook, ctx).addBoth(results.append)
    return results[0]


def accepted(runner: HookRunner, attempts: int, hook: str = "mail", **fields: Any) -> int:
    verdicts = [decide(runner, hook, **fields).verdict for _ in range(attempts)]
    return verdicts.count(Verdict.PROCEED)


def test_messages_beyond_the_client_limit_get_450_4_7_1(tmp_path):
    """The 4th message in a window from one client with messages = 3 gets 450 4.7.1."""
    runner = load(tmp_path, per_client={"messages": 3, "window_seconds": 60})
    assert accepted(runner, 3) == 3
    decision = decide(runner, "mail")
    assert (decision.verdict, decision.reply) == (Verdict.TEMPFAIL, replies.RATE_LIMITED)


def test_each_client_has_its_own_counter(tmp_path):
    """Another client address is counted separately."""
    runner = load(tmp_path, per_client={"messages": 2})
    assert accepted(runner, 3, client_address="192.0.2.1") == 2
    assert accepted(runner, 3, client_address="192.0.2.2") == 2


def test_the_counter_starts_again_in_the_next_window(tmp_path):
    """A fixed window: at the next multiple of window_seconds the client may send again."""
    runner = load(tmp_path, per_client={"messages": 2, "window_seconds": 60})
    assert accepted(runner, 3, now=NOW + 59.9) == 2
    assert accepted(runner, 3, now=NOW + 60) == 2


def test_refused_attempts_are_not_counted(tmp_path):
    """A refused message does not use up the limit of a scope that still had room."""
    runner = load(tmp_path, per_client={"messages": 5}, per_sender={"messages": 1})
    assert accepted(runner, 3, sender="flood@example.org") == 1
    # The client used 1 of its 5, so four other senders get through and the fifth does not.
    others = [accepted(runner, 1, sender=f"other{i}@example.org") for i in range(5)]
    assert others == [1, 1, 1, 1, 0]


def test_per_sender_ignores_the_null_sender_and_case(tmp_path):
    """Senders are compared case-insensitively; bounces (<>) are not limited per sender."""
    runner = load(tmp_path, per_sender={"messages": 1})
    assert accepted(runner, 1, sender="A@Example.org") == 1
    assert accepted(runner, 1, sender="a@example.org") == 0
    assert accepted(runner, 3, sender="") == 3


def test_per_user_counts_only_authenticated_sessions(tmp_path):
    """per_user counts the AUTH user across client addresses and skips anonymous sessions."""
    runner = load(tmp_path, per_user={"messages": 2})
    assert accepted(runner, 1, authenticated_as="alice", client_address="192.0.2.1") == 1
    assert accepted(runner, 2, authenticated_as="alice", client_address="192.0.2.2") == 1
    assert accepted(runner, 3) == 3


def test_recipients_are_limited_at_rcpt(tmp_path):
    """A recipients limit refuses the RCPT beyond it and leaves MAIL alone."""
    runner = load(tmp_path, per_client={"recipients": 2})
    assert not runner.has_hook("mail")
    assert accepted(runner, 3, hook="rcpt") == 2
    assert decide(runner, "rcpt").reply == replies.RATE_LIMITED


def test_state_file_defaults_to_the_relay_state_directory(tmp_path):
    """Without state_file the database lives in the state directory the relay gives."""
    config = PluginsConfig(
        enabled=("rate_limit",), settings={"rate_limit": {"per_client": {"messages": 1}}}
    )
    runner = load_plugins(config, task.Clock(), "relay.toml", state_directory=tmp_path / "ps")
    assert accepted(runner, 2) == 1
    assert (tmp_path / "ps" / "rate_limit.sqlite").exists()
    runner.close()


def test_without_state_file_or_state_directory_setup_refuses(tmp_path):
    """With nowhere to keep shared state the plugin refuses to start."""
    config = PluginsConfig(
        enabled=("rate_limit",), settings={"rate_limit": {"per_client": {"messages": 1}}}
    )
    with pytest.raises(ConfigError) as e:
        load_plugins(config, task.Clock(), "relay.toml")
    assert e.value.key == "plugins.rate_limit.state_file"


@pytest.mark.parametrize(
    "settings, key",
    [
        ({"per_client": {"messages": 0}}, "per_client.messages"),
        ({"per_client": {"messages": 1, "window": 5}}, "per_client.window"),
        ({"per_client": {"messages": 1, "window_seconds": 0}}, "per_client.window_seconds"),
        ({"per_client": {"window_seconds": 10}}, "per_client"),
        ({"per_domain": {"messages": 1}}, "per_domain"),
        ({"per_client": {"messages": 1}, "busy_timeout_seconds": -5}, "busy_timeout_seconds"),
    ],
)
def test_bad_settings_are_config_errors_naming_the_key(tmp_path, settings, key):
    """Unknown keys and bad values stop start-up with plugins.rate_limit.<key>."""
    with pytest.raises(ConfigError) as e:
        load(tmp_path, **settings)
    assert e.value.key == f"plugins.rate_limit.{key}"


WORKER = textwrap.dedent(
    """
    import sys
    from twisted.internet import task
    from twistedrelay.config import PluginsConfig
    from twistedrelay.hooks import MailContext, Verdict, load_plugins

    state_file, limit, attempts, now = sys.argv[1], *map(float, sys.argv[2:])
    limits = {"messages": int(limit), "window_seconds": 60}
    settings = {"state_file": state_file, "per_client": limits}
    runner = load_plugins(PluginsConfig(("rate_limit",), {"rate_limit": settings}), task.Clock())
    print("ready", flush=True)
    sys.stdin.readline()
    accepted = 0
    for _ in range(int(attempts)):
        ctx = MailContext(client_address="198.51.100.7", sender="a@example.org", now=now)
        results = []
        runner.run("mail", ctx).addBoth(results.append)
        accepted += results[0].verdict is Verdict.PROCEED
    print(accepted, flush=True)
    """
)


def run_workers(state_file: Path, limit: int, attempts: int, now: float, count: int) -> list[int]:
    """Start ``count`` processes, release them together, and return what each accepted."""
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(state_file), str(limit), str(attempts), str(now)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    try:
        for process in processes:
            assert process.stdout.readline().strip() == "ready"
        for process in processes:
            process.stdin.write("go\n")
            process.stdin.flush()
        results = []
        for process in processes:
            out, _ = process.communicate(timeout=60)
            assert process.returncode == 0
            results.append(int(out.strip()))
        return results
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_two_worker_processes_share_one_limit(tmp_path):
    """Two processes hammering one client's counter accept exactly the limit in total."""
    state_file = tmp_path / "rate.sqlite"
    first = run_workers(state_file, limit=400, attempts=300, now=NOW, count=2)
    assert sum(first) == 400
    # The next window starts from zero for both processes.
    second = run_workers(state_file, limit=400, attempts=50, now=NOW + 60, count=2)
    assert second == [50, 50]
