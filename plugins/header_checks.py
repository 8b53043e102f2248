"""Header checks: regular expressions on header values that reject, hold, or drop a header.

Like Postfix's header_checks, at the data hook. Each rule names a header field, a Python
regular expression searched in each of that field's values (unfolded and stripped, RFC 5322
§2.2.3), and an action:

``reject``
    Refuse the message with ``reply`` (a 5xx, default ``550 5.7.1 Message content rejected``).
``hold``
    Queue the message in hold/ for an operator (the client gets 250); ``reason`` is recorded.
``drop``
    Queue the message without that header field. The body was stored before the data hook
    runs, so the field is not cut out of the stored file: the decision's ``drop_headers``
    travels with the envelope and delivery omits the field when it sends the message.

Rules are tried in order. The first matching reject or hold rule decides; every matching
drop rule before it applies. Put ``dkim_sign`` after this plugin, and never drop a header
that it signs.

Settings (``[plugins.header_checks]``)::

    rules = [
      { header = "Subject", pattern = "(?i)viagra", action = "reject",
        reply = "554 5.7.1 Spam is not welcome here" },
      { header = "X-Mailer", pattern = "^BulkBlaster", action = "hold", reason = "bulk" },
      { header = "X-Originating-IP", pattern = ".", action = "drop" },
    ]
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from twistedrelay.hooks import (
    DataContext,
    Decision,
    PluginEnvironment,
    SettingsError,
    check_settings,
)
from twistedrelay.smtp.replies import Reply

CONTENT_REJECTED = Reply(550, "5.7.1", "Message content rejected")
ACTIONS = ("reject", "hold", "drop")
_RULE_KEYS = {"header", "pattern", "action", "reply", "reason"}
_REPLY = re.compile(r"([45]\d\d)(?: ([45]\.\d{1,3}\.\d{1,3}))?(?: (.*))?")


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule: when ``pattern`` matches a value of ``header``, do ``action``."""

    number: int
    header: str
    pattern: re.Pattern[str]
    action: str
    reply: Reply
    reason: str


def parse_reply(text: str) -> Reply:
    """Parse ``"554 5.7.1 text"`` (the enhanced code and the text are optional).

    :raises ValueError: not a 4xx or 5xx reply line.
    """
    match = _REPLY.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"expected '5xx x.y.z text', got {text!r}")
    code, enhanced, words = match.groups()
    if enhanced is not None and enhanced[0] != code[0]:
        raise ValueError(f"enhanced code {enhanced} does not match {code}")
    return Reply(int(code), enhanced, words or "Message content rejected")


def _parse_rule(number: int, raw: Any) -> Rule:  # Any: a raw TOML value
    key = f"rules[{number}]"
    if not isinstance(raw, Mapping):
        raise SettingsError(key, f"expected a table, got {raw!r}")
    try:
        check_settings(raw, _RULE_KEYS)
    except SettingsError as e:
        raise SettingsError(f"{key}.{e.key}", e.problem) from None
    values: dict[str, str] = {}
    for name in _RULE_KEYS:
        value = raw.get(name, "")
        if not isinstance(value, str):
            raise SettingsError(f"{key}.{name}", f"expected a string, got {value!r}")
        values[name] = value
    for required in ("header", "pattern", "action"):
        if not values[required]:
            raise SettingsError(f"{key}.{required}", "missing")
    if values["action"] not in ACTIONS:
        raise SettingsError(f"{key}.action", f"expected one of {', '.join(ACTIONS)}")
    try:
        pattern = re.compile(values["pattern"])
    except re.error as e:
        raise SettingsError(f"{key}.pattern", f"not a regular expression: {e}") from None
    reply = CONTENT_REJECTED
    if values["reply"]:
        if values["action"] != "reject":
            raise SettingsError(f"{key}.reply", "only a reject rule has a reply")
        try:
            reply = parse_reply(values["reply"])
        except ValueError as e:
            raise SettingsError(f"{key}.reply", str(e)) from None
        if not reply.is_permanent:
            raise SettingsError(f"{key}.reply", "a reject reply is 5xx")
    if values["reason"] and values["action"] != "hold":
        raise SettingsError(f"{key}.reason", "only a hold rule has a reason")
    reason = values["reason"] or f"header_checks rule {number}: {values['header']}"
    return Rule(number, values["header"].lower(), pattern, values["action"], reply, reason)


def setup(settings: Mapping[str, Any], environment: PluginEnvironment) -> HeaderChecks:
    """Compile ``[plugins.header_checks] rules``.

    :raises SettingsError: an unknown key, a bad rule, a bad pattern or reply.
    """
    check_settings(settings, {"rules"})
    raw_rules = settings.get("rules", [])
    if not isinstance(raw_rules, list):
        raise SettingsError("rules", f"expected a list of tables, got {raw_rules!r}")
    return HeaderChecks(environment.name, [_parse_rule(i, r) for i, r in enumerate(raw_rules)])


class HeaderChecks:
    """The data hook applying the rules."""

    def __init__(self, name: str, rules: list[Rule]) -> None:
        self.name = name
        self.rules = tuple(rules)
        self._headers = frozenset(rule.header for rule in rules)

    def hook_data(self, ctx: DataContext) -> Decision:
        """Apply the rules in order to the message's header fields."""
        fields = [(n.lower(), v) for n, v in ctx.headers if n.lower() in self._headers]
        dropped: list[tuple[str, str | None]] = []
        for rule in self.rules:
            for field_name, value in fields:
                if field_name != rule.header or not rule.pattern.search(value):
                    continue
                ctx.results.add(self.name, f"rule {rule.number} {rule.action} {rule.header}")
                if rule.action == "drop":
                    if (rule.header, value) not in dropped:
                        dropped.append((rule.header, value))
                    continue
                decision = (
                    Decision.reject(rule.reply)
                    if rule.action == "reject"
                    else Decision.hold(rule.reason)
                )
                return replace(decision, drop_headers=tuple(dropped))
        return Decision.proceed(drop_headers=dropped)
