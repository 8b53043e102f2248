"""The hook runner, decisions, contexts and plugin loading (twistedrelay/hooks.py)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.logger import Logger

from twistedrelay import hooks
from twistedrelay.config import ConfigError, PluginsConfig, parse_config
from twistedrelay.hooks import (
    DataContext,
    Decision,
    HookRunner,
    MailContext,
    Plugin,
    RcptContext,
    Verdict,
    load_plugins,
)
from twistedrelay.policy import RelayPolicy
from twistedrelay.queue.entry import Envelope, Recipient
from twistedrelay.routing import Destination
from twistedrelay.smtp import replies
from twistedrelay.smtp.replies import Reply

REJECTED = Reply(550, "5.7.1", "Rejected by test")


def fired(d: defer.Deferred[Any]) -> Any:
    """The result of a Deferred that must already have fired."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def runner(*plugins: tuple[str, dict[str, Any]], clock: task.Clock | None = None, **kwargs: Any):
    events: list[dict[str, Any]] = []
    log = Logger(observer=events.append)
    built = [Plugin(name, "test", hooks_) for name, hooks_ in plugins]
    return HookRunner(built, clock or task.Clock(), log=log, **kwargs), events


def mail_ctx(**kwargs: Any) -> MailContext:
    return MailContext(client_address="192.0.2.1", sender="a@example.org", **kwargs)


def rcpt_ctx(**kwargs: Any) -> RcptContext:
    return RcptContext(
        client_address="192.0.2.1", sender="a@example.org", recipient="b@example.net", **kwargs
    )


def data_ctx(**kwargs: Any) -> DataContext:
    return DataContext(sender="a@example.org", recipients=("b@example.net",), **kwargs)


# -- Decision ---------------------------------------------------------------------------------


def test_reject_refuses_a_non_permanent_reply():
    """Reject needs 5xx, so a plugin cannot send a 4xx or 2xx by mistake."""
    with pytest.raises(ValueError):
        Decision.reject(replies.RATE_LIMITED)
    assert Decision.reject(REJECTED).reply == REJECTED


def test_tempfail_defaults_to_451_4_3_0_and_refuses_5xx():
    """Tempfail without a reply is 451 4.3.0; a 5xx reply is refused."""
    assert Decision.tempfail().reply == replies.PLUGIN_ERROR
    with pytest.raises(ValueError):
        Decision.tempfail(REJECTED)


def test_disconnect_refuses_a_positive_reply():
    """Disconnect sends an error before closing, never a 2xx."""
    with pytest.raises(ValueError):
        Decision.disconnect(replies.OK)
    assert Decision.disconnect(replies.SERVICE_NOT_AVAILABLE).verdict is Verdict.DISCONNECT


@pytest.mark.parametrize(
    "name, value",
    [
        ("Bad Name", "x"),
        ("X-A:", "x"),
        ("X-A", "a\r\nInjected: yes\r\n"),
        ("X-A", "a\nb"),
        ("X-A", "a\rb"),
    ],
)
def test_add_header_refuses_header_injection(name, value):
    """A header name or value that would add a line of its own is refused."""
    with pytest.raises(ValueError):
        Decision.add_header(name, value)


def test_add_header_allows_folded_values_and_renders_crlf_lines():
    """A folded value (CRLF + WSP) is allowed and rendered as one CRLF-terminated field."""
    decision = Decision.add_header("DKIM-Signature", "v=1;\r\n\tb=abc")
    assert decision.header_lines() == ("DKIM-Signature: v=1;\r\n\tb=abc\r\n",)


def test_reroute_parses_route_syntax():
    """Reroute takes route syntax and refuses anything else."""
    decision = Decision.reroute("[192.0.2.7]:2525")
    assert (decision.next_hop.host, decision.next_hop.port) == ("192.0.2.7", 2525)
    with pytest.raises(ValueError):
        Decision.reroute("not a host")


# -- contexts ---------------------------------------------------------------------------------


def test_notes_give_each_plugin_its_own_dict():
    """ctx.notes[name] exists on first use and is shared by the contexts of one session."""
    notes = hooks.Notes()
    mail_ctx(notes=notes).notes["a"]["x"] = 1
    assert rcpt_ctx(notes=notes).notes["a"] == {"x": 1}
    assert notes["b"] == {}


def test_results_format_for_the_log_line():
    """Results become one log-friendly string, whitespace collapsed."""
    results = hooks.Results()
    results.add("rate_limit", "per_client 3/100")
    results.add("dkim_sign", "signed\n d=example.org")
    assert results.format() == "rate_limit:per_client 3/100; dkim_sign:signed d=example.org"


def test_data_context_reads_message_body_and_header_values():
    """read_body() skips the header section; header_values() is case-insensitive."""
    ctx = data_ctx(
        headers=(("Subject", "hi"), ("subject", "again")),
        message_reader=lambda: b"Subject: hi\r\nsubject: again\r\n\r\nbody\r\n",
    )
    assert ctx.read_body() == b"body\r\n"
    assert ctx.header_values("SUBJECT") == ["hi", "again"]


def test_outcome_context_takes_session_fields_from_the_envelope():
    """Delivery-side contexts are built from the stored envelope in one call."""
    envelope = Envelope(
        "Q1",
        "a@example.org",
        (Recipient("b@example.net"),),
        0.0,
        client_address="192.0.2.9",
        authenticated_as="alice",
        listener="submission",
    )
    ctx = hooks.OutcomeContext.for_envelope(
        envelope, recipient="b@example.net", result="delivered", reply="250 ok"
    )
    assert (ctx.queue_id, ctx.client_address, ctx.authenticated_as, ctx.listener) == (
        "Q1",
        "192.0.2.9",
        "alice",
        "submission",
    )


# -- running ----------------------------------------------------------------------------------


def test_no_plugin_for_a_hook_gives_an_already_fired_proceed():
    """The fast path: has_hook is False and run() has already fired with proceed."""
    r, _ = runner(("a", {"mail": lambda ctx: Decision.proceed()}))
    assert not r.has_hook("rcpt")
    assert r.has_hook("mail")
    assert fired(r.run("rcpt", rcpt_ctx())).verdict is Verdict.PROCEED


def test_plugins_run_in_order_and_the_first_refusal_wins():
    """Hooks run in enabled order; the first non-proceed decision stops the run."""
    calls: list[str] = []

    def hook(name: str, decision: Decision):
        def call(ctx):
            calls.append(name)
            return decision

        return call

    r, _ = runner(
        ("a", {"mail": hook("a", Decision.proceed())}),
        ("b", {"mail": hook("b", Decision.reject(REJECTED))}),
        ("c", {"mail": hook("c", Decision.tempfail())}),
    )
    decision = fired(r.run("mail", mail_ctx()))
    assert calls == ["a", "b"]
    assert (decision.verdict, decision.reply, decision.decided_by) == (
        Verdict.REJECT,
        REJECTED,
        "b",
    )


def test_accept_skips_the_later_rcpt_hooks():
    """Accept in rcpt stops the run, so a later plugin cannot reject that recipient."""
    later: list[str] = []
    r, _ = runner(
        ("allow", {"rcpt": lambda ctx: Decision.accept()}),
        ("deny", {"rcpt": lambda ctx: later.append("deny") or Decision.reject(REJECTED)}),
    )
    decision = fired(r.run("rcpt", rcpt_ctx()))
    assert decision.verdict is Verdict.ACCEPT
    assert later == []


def test_add_header_decisions_accumulate_in_plugin_order():
    """Headers added by several plugins are all carried by the final decision, in order."""
    r, _ = runner(
        ("a", {"data": lambda ctx: Decision.add_header("X-A", "1")}),
        ("b", {"data": lambda ctx: Decision.proceed(add_headers=[("X-B", "2"), ("X-C", "3")])}),
        ("c", {"data": lambda ctx: Decision.drop_header("X-Spam", "yes")}),
    )
    decision = fired(r.run("data", data_ctx()))
    assert decision.verdict is Verdict.PROCEED
    assert decision.add_headers == (("X-A", "1"), ("X-B", "2"), ("X-C", "3"))
    assert decision.drop_headers == (("X-Spam", "yes"),)


def test_later_plugins_see_the_message_as_it_will_be_delivered():
    """After a plugin adds or drops fields, the next ones read the message with those edits
    (what delivery sends): a signer listed after an editor signs what goes out."""
    stored = b"Subject: hi\r\nX-Spam: yes\r\nX-Spam: no\r\n\r\nbody\r\n"
    seen: list[tuple[bytes, tuple[tuple[str, str], ...]]] = []

    def signer(ctx: DataContext) -> Decision:
        seen.append((ctx.read_message(), ctx.headers))
        return Decision.proceed()

    r, _ = runner(
        (
            "editor",
            {
                "data": lambda ctx: Decision.proceed(
                    add_headers=[("X-Test", "1")], drop_headers=[("X-Spam", "yes")]
                )
            },
        ),
        ("signer", {"data": signer}),
    )
    headers = (("Subject", "hi"), ("X-Spam", "yes"), ("X-Spam", "no"))
    fired(r.run("data", data_ctx(headers=headers, message_reader=lambda: stored)))
    ((message, seen_headers),) = seen
    assert message == b"X-Test: 1\r\nSubject: hi\r\nX-Spam: no\r\n\r\nbody\r\n"
    assert seen_headers == (("X-Test", "1"), ("Subject", "hi"), ("X-Spam", "no"))


def test_hold_keeps_headers_added_before_it():
    """A hold after an add_header holds the message with the header added."""
    r, _ = runner(
        ("a", {"data": lambda ctx: Decision.add_header("X-A", "1")}),
        ("b", {"data": lambda ctx: Decision.hold("looks like spam")}),
    )
    decision = fired(r.run("data", data_ctx()))
    assert (decision.verdict, decision.reason, decision.add_headers) == (
        Verdict.HOLD,
        "looks like spam",
        (("X-A", "1"),),
    )


def test_sync_async_and_deferred_hooks_all_work():
    """A hook may be a plain function, a coroutine function or return a Deferred."""
    clock = task.Clock()

    async def coroutine(ctx):
        await task.deferLater(clock, 1, lambda: None)
        return Decision.add_header("X-Async", "1")

    def returns_deferred(ctx):
        return task.deferLater(clock, 1, Decision.add_header, "X-Deferred", "1")

    r, _ = runner(
        ("plain", {"data": lambda ctx: Decision.add_header("X-Plain", "1")}),
        ("coroutine", {"data": coroutine}),
        ("deferred", {"data": returns_deferred}),
        clock=clock,
    )
    d = r.run("data", data_ctx())
    assert not d.called
    clock.advance(1)
    clock.advance(1)
    assert [name for name, _ in fired(d).add_headers] == ["X-Plain", "X-Async", "X-Deferred"]


def test_an_exception_gives_451_and_logs_the_plugin_name_with_the_traceback():
    """A raising hook never propagates: the result is 451 4.3.0 and a failure log event."""

    def broken(ctx):
        raise ZeroDivisionError("boom")

    r, events = runner(("broken", {"mail": broken}))
    decision = fired(r.run("mail", mail_ctx()))
    assert (decision.verdict, decision.reply, decision.decided_by) == (
        Verdict.TEMPFAIL,
        replies.PLUGIN_ERROR,
        "broken",
    )
    [event] = events
    assert event["plugin"] == "broken"
    assert event["log_failure"].check(ZeroDivisionError)
    assert "ZeroDivisionError" in event["log_failure"].getTraceback()


def test_a_slow_hook_times_out_with_451_and_is_cancelled():
    """A hook slower than the timeout gives 451 at the deadline, measured on the injected clock."""
    clock = task.Clock()
    cancelled: list[bool] = []

    def slow(ctx):
        return defer.Deferred(lambda d: cancelled.append(True))

    r, events = runner(("slow", {"data": slow}), clock=clock, timeout_seconds=30)
    d = r.run("data", data_ctx())
    clock.advance(29.9)
    assert not d.called
    clock.advance(0.2)
    assert fired(d).reply == replies.PLUGIN_ERROR
    assert cancelled == [True]
    assert events[0]["plugin"] == "slow" and "timed out" in events[0]["log_format"]


def test_a_slow_coroutine_hook_times_out():
    """The timeout also covers async def hooks awaiting something that never comes."""
    clock = task.Clock()

    async def slow(ctx):
        await defer.Deferred()
        return Decision.proceed()

    r, events = runner(("slow", {"mail": slow}), clock=clock, timeout_seconds=5)
    d = r.run("mail", mail_ctx())
    clock.advance(5)
    assert fired(d).verdict is Verdict.TEMPFAIL
    assert events[0]["plugin"] == "slow"


@pytest.mark.parametrize(
    "hook, bad",
    [
        ("mail", lambda ctx: None),
        ("mail", lambda ctx: Decision.accept()),
        ("mail", lambda ctx: Decision.hold("x")),
        ("rcpt", lambda ctx: Decision.add_header("X-A", "1")),
        ("deliver", lambda ctx: Decision.reject(REJECTED)),
        ("data", lambda ctx: Decision.reroute("[192.0.2.1]")),
    ],
)
def test_a_verdict_the_hook_may_not_return_is_a_plugin_error(hook, bad):
    """Returning None or a verdict outside the hook's contract gives 451 and a log line."""
    r, events = runner(("bad", {hook: bad}))
    ctx = {"mail": mail_ctx(), "rcpt": rcpt_ctx(), "data": data_ctx()}.get(
        hook
    ) or hooks.DeliverContext(
        queue_id="Q",
        sender="",
        destination=Destination("example.net"),
        recipients=("b@example.net",),
    )
    assert fired(r.run(hook, ctx)).reply == replies.PLUGIN_ERROR
    assert events[0]["plugin"] == "bad"


def test_observer_hooks_run_off_the_hot_path_and_errors_are_only_logged():
    """Observers start on the next reactor turn; the caller gets proceed at once."""
    clock = task.Clock()
    seen: list[str] = []

    def broken(ctx):
        raise RuntimeError("observer failed")

    r, events = runner(
        ("broken", {"queue": broken}),
        ("watcher", {"queue": lambda ctx: seen.append(ctx.queue_id)}),
        clock=clock,
    )
    envelope = Envelope("Q7", "a@example.org", (Recipient("b@example.net"),), 0.0)
    d = r.run("queue", hooks.QueueContext.for_envelope(envelope))
    assert fired(d).verdict is Verdict.PROCEED
    assert seen == []
    drained = r.drain()
    clock.advance(0)
    assert seen == ["Q7"]
    assert fired(drained) is None
    assert events[0]["plugin"] == "broken"


# -- relay permission ---------------------------------------------------------------------------


def check_recipient(r: HookRunner, policy: RelayPolicy, client: str, recipient: str) -> Reply:
    """The call sequence the SMTP server follows at RCPT (docs/hooks.md)."""
    refusal = policy.check_recipient(client, False, recipient)
    if refusal is not None:
        return refusal
    if not r.has_hook("rcpt"):
        return replies.RECIPIENT_OK
    decision = fired(
        r.run("rcpt", RcptContext(client_address=client, sender="", recipient=recipient))
    )
    return decision.reply or replies.RECIPIENT_OK


def test_a_plugin_that_accepts_everything_cannot_open_the_relay():
    """Core policy's 554 5.7.1 is final: an accept-all rcpt hook does not widen it."""
    called: list[str] = []

    def accept_all(ctx):
        called.append(ctx.recipient)
        return Decision.accept()

    r, _ = runner(("open_relay", {"rcpt": accept_all}))
    policy = RelayPolicy([], ["example.org"], "postmaster@relay.test")
    assert (
        check_recipient(r, policy, "203.0.113.5", "victim@elsewhere.example")
        == replies.RELAY_DENIED
    )
    assert check_recipient(r, policy, "203.0.113.5", "user@example.org") == replies.RECIPIENT_OK
    assert called == ["user@example.org"]


def test_a_plugin_can_narrow_relay_permission():
    """A rcpt hook may refuse a recipient core policy allowed."""
    r, _ = runner(("deny", {"rcpt": lambda ctx: Decision.reject(REJECTED)}))
    policy = RelayPolicy([], ["example.org"], "postmaster@relay.test")
    assert check_recipient(r, policy, "203.0.113.5", "user@example.org") == REJECTED


# -- loading ----------------------------------------------------------------------------------


def test_a_bundled_plugin_loads_with_its_settings():
    """'example' resolves to twistedrelay_plugins.example and its setup() gets the table."""
    config = PluginsConfig(enabled=("example",), settings={"example": {"add_header": True}})
    r = load_plugins(config, task.Clock())
    assert r.plugins[0].origin == "bundled (twistedrelay_plugins.example)"
    assert set(r.plugins[0].hooks) == set(hooks.HOOKS)
    decision = fired(r.run("data", data_ctx()))
    assert decision.add_headers == (("X-Example", "yes"),)


def test_an_unknown_plugin_is_a_config_error_naming_plugins_enabled():
    """A name that is neither bundled nor an entry point stops start-up."""
    with pytest.raises(ConfigError) as e:
        load_plugins(PluginsConfig(enabled=("no_such_plugin",)), task.Clock(), "relay.toml")
    assert e.value.key == "plugins.enabled"
    assert "relay.toml" in str(e.value) and "no_such_plugin" in str(e.value)


def test_an_unknown_setting_is_a_config_error_naming_the_key():
    """setup() refuses unknown keys; the error names plugins.<name>.<key> and the file."""
    config = PluginsConfig(enabled=("example",), settings={"example": {"add_headr": True}})
    with pytest.raises(ConfigError) as e:
        load_plugins(config, task.Clock(), "relay.toml")
    assert e.value.key == "plugins.example.add_headr"


def test_a_bad_setting_value_is_a_config_error():
    """A value of the wrong kind is refused with the key's name."""
    config = PluginsConfig(enabled=("example",), settings={"example": {"add_header": "yes"}})
    with pytest.raises(ConfigError, match="plugins.example.add_header"):
        load_plugins(config, task.Clock())


def test_settings_for_a_plugin_that_is_not_enabled_are_a_config_error():
    """A [plugins.x] table for a disabled plugin is most likely a mistake: refuse it."""
    config = parse_config(
        {"plugins": {"enabled": [], "example": {"add_header": True}}}, "relay.toml"
    )
    with pytest.raises(ConfigError) as e:
        load_plugins(config.plugins, task.Clock(), config.source)
    assert e.value.key == "plugins.example"


def test_a_plugin_enabled_twice_is_a_config_error():
    """Each plugin runs once per hook; listing it twice is refused."""
    with pytest.raises(ConfigError, match="twice"):
        load_plugins(PluginsConfig(enabled=("example", "example")), task.Clock())


@pytest.fixture
def third_party(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake installed distribution declaring two twistedrelay.plugins entry points."""
    (tmp_path / "acme_relay_plugin.py").write_text(
        textwrap.dedent(
            '''
            """A third-party plugin without settings."""
            from twistedrelay.hooks import Decision

            def hook_mail(ctx):
                return Decision.tempfail()

            def hook_queue(ctx):
                pass
            '''
        )
    )
    (tmp_path / "acme_typo_plugin.py").write_text("def hook_recipient(ctx):\n    pass\n")
    (tmp_path / "acme_broken_plugin.py").write_text(
        "def setup(settings):\n    raise RuntimeError('the plugin has a bug')\n"
    )
    dist_info = tmp_path / "acme_relay_plugin-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: acme-relay-plugin\nVersion: 1.0\n"
    )
    (dist_info / "entry_points.txt").write_text(
        "[twistedrelay.plugins]\nacme = acme_relay_plugin\ntypo = acme_typo_plugin\n"
        "broken = acme_broken_plugin\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("acme_relay_plugin", "acme_typo_plugin", "acme_broken_plugin"):
        sys.modules.pop(name, None)


def test_a_third_party_plugin_loads_through_its_entry_point(third_party):
    """An installed distribution's twistedrelay.plugins entry point is found by name."""
    r = load_plugins(PluginsConfig(enabled=("example", "acme")), task.Clock())
    acme = r.plugins[1]
    assert acme.origin == "entry point (acme_relay_plugin, from acme-relay-plugin)"
    assert list(acme.hooks) == ["mail", "queue"]
    assert fired(r.run("mail", mail_ctx())).decided_by == "acme"


def test_a_third_party_plugin_without_setup_refuses_settings(third_party):
    """A plugin with no setup() takes no settings, so any key is unknown."""
    config = PluginsConfig(enabled=("acme",), settings={"acme": {"level": 3}})
    with pytest.raises(ConfigError) as e:
        load_plugins(config, task.Clock())
    assert e.value.key == "plugins.acme.level"


def test_a_setup_that_crashes_is_one_config_error_line(third_party):
    """A bug in a plugin's setup() stops start-up with one line naming the plugin."""
    with pytest.raises(ConfigError) as e:
        load_plugins(PluginsConfig(enabled=("broken",)), task.Clock())
    assert e.value.key == "plugins.broken"
    assert "setup() failed: RuntimeError: the plugin has a bug" in str(e.value)
    assert "\n" not in str(e.value)


def test_a_misnamed_hook_function_is_a_config_error(third_party):
    """hook_recipient is not a hook: refusing it catches the typo at start-up."""
    with pytest.raises(ConfigError, match="hook_recipient"):
        load_plugins(PluginsConfig(enabled=("typo",)), task.Clock())


def test_plugins_command_prints_the_order_and_hooks(tmp_path, third_party, capsys):
    """`twistedrelay plugins --config FILE` lists plugins in run order with their hooks."""
    config = tmp_path / "relay.toml"
    config.write_text('[plugins]\nenabled = ["acme", "example"]\n')
    assert hooks.plugins_main(["--config", str(config)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["1.", "acme", "mail", "queue"]
    assert out[1].split()[:2] == ["2.", "example"]
    assert "  mail       acme -> example" in out


def test_plugins_command_reports_a_config_error(tmp_path, capsys):
    """An unknown plugin makes the command exit 1 with the file and key on stderr."""
    config = tmp_path / "relay.toml"
    config.write_text('[plugins]\nenabled = ["nope"]\n')
    assert hooks.plugins_main(["--config", str(config)]) == 1
    assert "plugins.enabled" in capsys.readouterr().err
