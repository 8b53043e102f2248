"""The header_checks plugin: regular expressions on headers that reject, hold or drop."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import task
from twistedrelay_plugins import header_checks

from twistedrelay.config import ConfigError, PluginsConfig
from twistedrelay.hooks import DataContext, HookRunner, Verdict, load_plugins
from twistedrelay.smtp.replies import Reply

RULES = [
    {
        "header": "Subject",
        "pattern": "(?i)viagra",
        "action": "reject",
        "reply": "554 5.7.1 Spam is not welcome here",
    },
    {"header": "X-Mailer", "pattern": "^BulkBlaster", "action": "hold", "reason": "bulk"},
    {"header": "x-originating-ip", "pattern": r"^\[10\.", "action": "drop"},
    {"header": "Subject", "pattern": "free", "action": "reject"},
]


def load(rules: list[dict[str, Any]]) -> HookRunner:
    config = PluginsConfig(enabled=("header_checks",), settings={"header_checks": {"rules": rules}})
    return load_plugins(config, task.Clock(), "relay.toml")


def run(runner: HookRunner, *headers: tuple[str, str]):
    ctx = DataContext(sender="a@example.org", recipients=("b@example.net",), headers=headers)
    results: list[Any] = []
    runner.run("data", ctx).addBoth(results.append)
    return results[0], ctx


def test_a_matching_reject_rule_rejects_with_its_reply():
    """A Subject matching a reject rule refuses the message with the configured reply."""
    decision, ctx = run(load(RULES), ("Subject", "Cheap VIAGRA now"))
    assert decision.verdict is Verdict.REJECT
    assert decision.reply == Reply(554, "5.7.1", "Spam is not welcome here")
    assert ctx.results.format() == "header_checks:rule 0 reject subject"


def test_a_reject_rule_without_a_reply_uses_the_default():
    """Without reply, a reject rule answers 550 5.7.1 Message content rejected."""
    decision, _ = run(load(RULES), ("Subject", "free stuff"))
    assert decision.reply == header_checks.CONTENT_REJECTED


def test_a_matching_hold_rule_holds_with_its_reason():
    """A hold rule queues the message in hold/ with the configured reason."""
    decision, _ = run(load(RULES), ("X-Mailer", "BulkBlaster 2.0"))
    assert (decision.verdict, decision.reason) == (Verdict.HOLD, "bulk")


def test_a_drop_rule_drops_only_the_matching_field():
    """Drop names the exact field (name and value) and the message proceeds."""
    decision, _ = run(
        load(RULES),
        ("X-Originating-IP", "[10.1.2.3]"),
        ("X-Originating-IP", "[192.0.2.1]"),
        ("Subject", "hello"),
    )
    assert decision.verdict is Verdict.PROCEED
    assert decision.drop_headers == (("x-originating-ip", "[10.1.2.3]"),)


def test_drops_before_a_hold_are_kept():
    """A hold after a matching drop rule keeps the drop."""
    rules = [RULES[2], RULES[1]]
    decision, _ = run(load(rules), ("X-Originating-IP", "[10.0.0.1]"), ("X-Mailer", "BulkBlaster"))
    assert decision.verdict is Verdict.HOLD
    assert decision.drop_headers == (("x-originating-ip", "[10.0.0.1]"),)


def test_rules_apply_in_order_and_header_names_are_case_insensitive():
    """The first matching reject/hold rule decides, whatever the header's case."""
    decision, _ = run(load(RULES), ("subject", "free VIAGRA"), ("x-mailer", "BulkBlaster"))
    assert decision.reply.text == "Spam is not welcome here"


def test_no_match_proceeds_without_edits():
    """A clean message proceeds with no header edits."""
    decision, ctx = run(load(RULES), ("Subject", "minutes of the meeting"))
    assert decision.verdict is Verdict.PROCEED and not decision.drop_headers
    assert len(ctx.results) == 0


@pytest.mark.parametrize(
    "rules, key",
    [
        ([{"header": "Subject", "pattern": "(", "action": "reject"}], "rules[0].pattern"),
        ([{"header": "Subject", "pattern": "x", "action": "discard"}], "rules[0].action"),
        ([{"header": "Subject", "pattern": "x"}], "rules[0].action"),
        (
            [{"header": "Subject", "pattern": "x", "action": "reject", "reply": "450 4.7.1 later"}],
            "rules[0].reply",
        ),
        (
            [{"header": "Subject", "pattern": "x", "action": "reject", "reply": "nope"}],
            "rules[0].reply",
        ),
        (
            [{"header": "Subject", "pattern": "x", "action": "drop", "reason": "r"}],
            "rules[0].reason",
        ),
        (
            [RULES[0], {"header": "Subject", "pattern": "x", "action": "hold", "colour": "red"}],
            "rules[1].colour",
        ),
        ("Subject", "rules"),
    ],
)
def test_bad_rules_are_config_errors_naming_the_key(rules, key):
    """Every mistake in a rule stops start-up with plugins.header_checks.<key>."""
    with pytest.raises(ConfigError) as e:
        load(rules)
    assert e.value.key == f"plugins.header_checks.{key}"


def test_parse_reply_accepts_a_code_alone():
    """The enhanced code and text of a configured reply are optional."""
    assert header_checks.parse_reply("550") == Reply(550, None, "Message content rejected")
