"""Tests for twistedrelay.smtp.commands: command lines and MAIL/RCPT arguments."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twistedrelay.smtp import replies
from twistedrelay.smtp.commands import (
    Command,
    CommandSyntaxError,
    is_clean_text,
    is_valid_notify,
    is_valid_orcpt,
    parse_command,
    parse_mail_argument,
    parse_params,
    parse_rcpt_argument,
)


def test_verb_is_case_insensitive_and_argument_stripped() -> None:
    """RFC 5321 §2.4: verbs are case-insensitive."""
    assert parse_command(b"mAiL FROM:<a@b.c>  ") == Command("MAIL", "FROM:<a@b.c>")
    assert parse_command(b"NOOP") == Command("NOOP", "")


@pytest.mark.parametrize(
    "line", [b"", b" NOOP", b"NO0P", b"\xffNOOP", b"N\x00OP", b"\xc3\xa9HLO x"]
)
def test_malformed_verb_is_unknown_command(line: bytes) -> None:
    """A verb that is not ASCII letters is 500 5.5.2."""
    with pytest.raises(CommandSyntaxError) as caught:
        parse_command(line)
    assert caught.value.reply == replies.UNKNOWN_COMMAND


def test_undecodable_argument_is_not_clean_text() -> None:
    """Invalid UTF-8 and control characters are detected (the session answers 501)."""
    assert not is_clean_text(parse_command(b"EHLO \xff").argument)
    assert not is_clean_text(parse_command(b"EHLO a\x01b").argument)
    assert is_clean_text(parse_command("EHLO exämple".encode()).argument)


def test_mail_argument_with_params() -> None:
    """Parameters are split, keywords upper-cased, values kept."""
    assert parse_mail_argument("FROM:<a@b.c> size=100 BODY=8BITMIME SMTPUTF8") == (
        "a@b.c",
        {"SIZE": "100", "BODY": "8BITMIME", "SMTPUTF8": None},
    )


def test_space_after_colon_is_tolerated() -> None:
    """``MAIL FROM: <a@b>`` is accepted, as Postfix does."""
    assert parse_mail_argument("from: <a@b.c>") == ("a@b.c", {})
    assert parse_rcpt_argument("To:  <c@d.e>") == ("c@d.e", {})


def test_null_sender_and_postmaster() -> None:
    """``<>`` is a sender; ``<postmaster>`` is a recipient."""
    assert parse_mail_argument("FROM:<>") == ("", {})
    assert parse_rcpt_argument("TO:<postmaster>") == ("postmaster", {})


def test_quoted_local_part_may_hold_angle_bracket() -> None:
    """The path ends at the first ``>`` outside a quoted string."""
    assert parse_mail_argument('FROM:<"a>b"@c.d> SIZE=1') == ('"a>b"@c.d', {"SIZE": "1"})


@pytest.mark.parametrize(
    ("argument", "reply"),
    [
        ("<a@b.c>", replies.SYNTAX_ERROR),
        ("FROM:a@b.c", replies.SYNTAX_ERROR),
        ("FROM:<a@b.c", replies.SYNTAX_ERROR),
        ("FROM:<a@b.c>SIZE=1", replies.SYNTAX_ERROR),
        ("FROM:<a@b.c> SIZE=", replies.SYNTAX_ERROR),
        ("FROM:<a@b.c> SIZE=1 SIZE=2", replies.SYNTAX_ERROR),
        ("FROM:<a@b.c> -X", replies.SYNTAX_ERROR),
        ("FROM:<a@b.c> X=a=b", replies.SYNTAX_ERROR),
        ("FROM:<a b@c.d>", replies.BAD_SENDER_SYNTAX),
        ("FROM:<a@>", replies.BAD_SENDER_SYNTAX),
    ],
)
def test_bad_mail_arguments(argument: str, reply: replies.Reply) -> None:
    """Missing prefix or brackets and bad params are 501 5.5.4; a bad sender is 501 5.1.7."""
    with pytest.raises(CommandSyntaxError) as caught:
        parse_mail_argument(argument)
    assert caught.value.reply == reply


@pytest.mark.parametrize("argument", ["TO:<>", "TO:<user>", "TO:<a@b..c>"])
def test_bad_recipient_is_5_1_3(argument: str) -> None:
    """A malformed forward-path is 501 5.1.3."""
    with pytest.raises(CommandSyntaxError) as caught:
        parse_rcpt_argument(argument)
    assert caught.value.reply == replies.BAD_ADDRESS_SYNTAX


def test_params_utf8_values_allowed() -> None:
    """RFC 6531 §3.3 allows UTF-8 in esmtp-value."""
    assert parse_params(" X-NAME=wert\u00e4") == {"X-NAME": "wert\u00e4"}


def test_dsn_parameter_syntax() -> None:
    """RFC 3461 NOTIFY and ORCPT syntax."""
    assert is_valid_notify("NEVER")
    assert is_valid_notify("success,Failure,DELAY")
    assert not is_valid_notify("NEVER,SUCCESS")
    assert not is_valid_notify("SUCCESS,SUCCESS")
    assert not is_valid_notify("")
    assert is_valid_orcpt("rfc822;user+2Bx@example.com")
    assert not is_valid_orcpt("rfc822;user+x@example.com")
    assert not is_valid_orcpt("rfc822")
    assert not is_valid_orcpt(";a@b")


@given(st.binary(max_size=120))
def test_parse_command_only_raises_command_syntax_error(line: bytes) -> None:
    """Any bytes give a Command or a CommandSyntaxError, never another exception."""
    try:
        command = parse_command(line)
    except CommandSyntaxError:
        return
    assert command.verb.isupper()


@given(st.text(max_size=120))
def test_path_arguments_only_raise_command_syntax_error(argument: str) -> None:
    """MAIL/RCPT argument parsing never raises anything but CommandSyntaxError."""
    for parse in (parse_mail_argument, parse_rcpt_argument):
        try:
            parse(argument)
        except CommandSyntaxError as error:
            assert error.reply.code == 501 or error.reply.code == 555
