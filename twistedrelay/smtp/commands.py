"""SMTP command lines: one line of bytes → ``Command``, and MAIL/RCPT arguments → path + params.

Owns the syntax of a single command line (RFC 5321 §4.1.1, §4.1.2; ESMTP parameters of
RFC 1870, RFC 6152, RFC 6531, RFC 3461, RFC 4954). It knows nothing of session state:
whether a command is allowed *now*, or whether a parameter's value is acceptable for this
relay (SIZE over the limit, SMTPUTF8 without EHLO) is decided by server_session.py.

Invariant: parsing never raises anything but ``CommandSyntaxError``, and the error always
carries the reply to send, so no client input can become a traceback.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from twistedrelay.smtp import replies
from twistedrelay.smtp.addresses import AddressError, parse_path
from twistedrelay.smtp.replies import Reply

# Characters never allowed in a command argument: C0 controls except TAB, DEL, and the
# lone surrogates that surrogateescape produces for bytes that are not UTF-8.
_BAD_TEXT = re.compile("[\x00-\x08\x0a-\x1f\x7f\udc80-\udcff]")
# RFC 5321 §4.1.2 esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
# RFC 5321 §4.1.2 esmtp-value = 1*(%d33-60 / %d62-126); RFC 6531 §3.3 adds UTF8-non-ascii.
_VALUE = re.compile("[\x21-\x3c\x3e-\x7e\u0080-\ud7ff\ue000-\U0010ffff]+")
# RFC 3461 §4 xtext = *( xchar / hexchar ); xchar excludes "+" and "=".
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
_NOTIFY_FLAGS = frozenset({"SUCCESS", "FAILURE", "DELAY"})


class CommandSyntaxError(ValueError):
    """A command line or argument is malformed; ``reply`` is what to answer."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Command:
    """One command line: the upper-cased verb and the argument after it (stripped).

    The argument is decoded as UTF-8 with surrogateescape, so it always exists; use
    ``is_clean_text`` before trusting it.
    """

    verb: str
    argument: str


def parse_command(line: bytes) -> Command:
    """Split one command line (without its line ending) into verb and argument.

    Verbs are case-insensitive (RFC 5321 §2.4) and are returned upper-cased.

    :raises CommandSyntaxError: with ``UNKNOWN_COMMAND`` when the verb is not a word of
        ASCII letters.
    """
    verb, _, argument = line.partition(b" ")
    if not verb.isalpha() or not verb.isascii():
        raise CommandSyntaxError(replies.UNKNOWN_COMMAND)
    return Command(
        verb.decode("ascii").upper(), argument.decode("utf-8", "surrogateescape").strip()
    )


def is_clean_text(text: str) -> bool:
    """Whether an argument is valid UTF-8 without control characters."""
    return _BAD_TEXT.search(text) is None


def _split_path(argument: str) -> tuple[str, str]:
    """Split ``<path> params`` at the ``>`` that closes the path (quotes may hold ``>``)."""
    if not argument.startswith("<"):
        raise CommandSyntaxError(replies.SYNTAX_ERROR)
    if '"' not in argument:
        close = argument.find(">")
        if close < 0:
            raise CommandSyntaxError(replies.SYNTAX_ERROR)
        return argument[: close + 1], argument[close + 1 :]
    quoted = escaped = False
    for index in range(1, len(argument)):
        char = argument[index]
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = quoted
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return argument[: index + 1], argument[index + 1 :]
    raise CommandSyntaxError(replies.SYNTAX_ERROR)


def parse_params(text: str) -> dict[str, str | None]:
    """Parse ESMTP parameters ``KEY[=VALUE] ...`` (RFC 5321 §4.1.2); keys upper-cased.

    :raises CommandSyntaxError: with ``SYNTAX_ERROR`` for a malformed or repeated keyword.
    """
    params: dict[str, str | None] = {}
    for item in text.split():
        keyword, equals, value = item.partition("=")
        if not _KEYWORD.fullmatch(keyword) or (equals and not _VALUE.fullmatch(value)):
            raise CommandSyntaxError(replies.SYNTAX_ERROR)
        keyword = keyword.upper()
        if keyword in params:
            raise CommandSyntaxError(replies.SYNTAX_ERROR)
        params[keyword] = value if equals else None
    return params


def parse_path_and_params(
    argument: str,
    prefix: str,
    address_error: Reply,
    *,
    allow_null: bool = False,
    allow_postmaster: bool = False,
) -> tuple[str, dict[str, str | None]]:
    """Parse ``FROM:<path> params`` or ``TO:<path> params``.

    A space after the colon is tolerated (``MAIL FROM: <a@b>``), as Postfix does.

    :param prefix: ``"FROM:"`` or ``"TO:"``, matched case-insensitively.
    :param address_error: the reply for a malformed address (5.1.7 sender, 5.1.3 recipient).
    :returns: the mailbox (``""`` for a null path) and the parameters.
    :raises CommandSyntaxError: ``SYNTAX_ERROR`` for a missing prefix, brackets or bad
        parameters; ``address_error`` for a malformed mailbox.
    """
    if argument[: len(prefix)].upper() != prefix:
        raise CommandSyntaxError(replies.SYNTAX_ERROR)
    path, rest = _split_path(argument[len(prefix) :].lstrip(" "))
    if rest and not rest.startswith(" "):
        raise CommandSyntaxError(replies.SYNTAX_ERROR)
    try:
        address = parse_path(path, allow_null=allow_null, allow_postmaster=allow_postmaster)
    except AddressError:
        raise CommandSyntaxError(address_error) from None
    return address, parse_params(rest)


def parse_mail_argument(argument: str) -> tuple[str, dict[str, str | None]]:
    """The argument of MAIL: ``FROM:<reverse-path> [params]``; ``<>`` gives ``""``.

    :raises CommandSyntaxError: see ``parse_path_and_params`` (5.1.7 for the address).
    """
    return parse_path_and_params(argument, "FROM:", replies.BAD_SENDER_SYNTAX, allow_null=True)


def parse_rcpt_argument(argument: str) -> tuple[str, dict[str, str | None]]:
    """The argument of RCPT: ``TO:<forward-path> [params]``; ``<postmaster>`` is valid.

    :raises CommandSyntaxError: see ``parse_path_and_params`` (5.1.3 for the address).
    """
    return parse_path_and_params(argument, "TO:", replies.BAD_ADDRESS_SYNTAX, allow_postmaster=True)


def is_xtext(value: str) -> bool:
    """Whether ``value`` is RFC 3461 §4 xtext (ENVID, ORCPT)."""
    return _XTEXT.fullmatch(value) is not None


def is_valid_notify(value: str) -> bool:
    """RFC 3461 §4.1: ``NEVER`` or a comma list of SUCCESS, FAILURE, DELAY."""
    flags = value.upper().split(",")
    if flags == ["NEVER"]:
        return True
    return len(set(flags)) == len(flags) and all(flag in _NOTIFY_FLAGS for flag in flags)


def is_valid_orcpt(value: str) -> bool:
    """RFC 3461 §4.2: ``addr-type ";" xtext`` with a keyword as the address type."""
    addr_type, semicolon, address = value.partition(";")
    return (
        bool(semicolon and address)
        and _KEYWORD.fullmatch(addr_type) is not None
        and (is_xtext(address))
    )
