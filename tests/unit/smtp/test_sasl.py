"""SASL PLAIN and LOGIN exchanges (RFC 4954, RFC 4616), without I/O."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twistedrelay.smtp import replies
from twistedrelay.smtp.sasl import (
    LOGIN_PASSWORD_CHALLENGE,
    LOGIN_USERNAME_CHALLENGE,
    PLAIN_CHALLENGE,
    Credentials,
    SASLError,
    SASLExchange,
    decode_login_response,
    decode_plain,
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_decode_plain():
    """PLAIN yields authzid, authcid and password (RFC 4616)."""
    assert decode_plain(b64(b"\0alice\0s3cret")) == ("", "alice", "s3cret")
    assert decode_plain(b64(b"alice\0alice\0pw")) == ("alice", "alice", "pw")
    assert decode_plain(b64("\0jörg\0pässword".encode())) == ("", "jörg", "pässword")


@pytest.mark.parametrize(
    ("response", "reply"),
    [
        ("*", replies.AUTH_CANCELLED),
        ("not base64!", replies.AUTH_BAD_BASE64),
        ("AAA", replies.AUTH_BAD_BASE64),
        (b64(b"\0\xff\xfe\0pw"), replies.AUTH_BAD_BASE64),
        ("=", replies.AUTH_FAILED),
        (b64(b"alice\0pw"), replies.AUTH_FAILED),
        (b64(b"\0alice\0"), replies.AUTH_FAILED),
        (b64(b"\0\0pw"), replies.AUTH_FAILED),
        (b64(b"bob\0alice\0pw"), replies.AUTH_FAILED),
        (b64(b"\0a\0b\0c"), replies.AUTH_FAILED),
    ],
)
def test_decode_plain_errors_carry_their_reply(response: str, reply: replies.Reply):
    """Cancel, bad base64, bad UTF-8 and malformed or proxy PLAIN messages map to replies."""
    with pytest.raises(SASLError) as info:
        decode_plain(response)
    assert info.value.reply == reply


@given(st.text(max_size=60))
def test_decode_plain_raises_only_sasl_errors(response: str):
    """Any input either decodes or raises SASLError, never another exception."""
    try:
        decode_plain(response)
    except SASLError:
        pass


@given(
    st.text(min_size=1).filter(lambda s: "\0" not in s),
    st.text(min_size=1).filter(lambda s: "\0" not in s),
)
def test_plain_round_trip(user: str, password: str):
    """Encoding then decoding a PLAIN response gives back the user and password."""
    assert decode_plain(b64(f"\0{user}\0{password}".encode())) == ("", user, password)


def test_decode_login_response():
    """A LOGIN step is base64 UTF-8 text; '*' cancels."""
    assert decode_login_response(b64(b"alice")) == "alice"
    with pytest.raises(SASLError) as info:
        decode_login_response("*")
    assert info.value.reply == replies.AUTH_CANCELLED


def test_login_challenges_are_the_conventional_ones():
    """LOGIN asks "Username:" then "Password:" in base64."""
    assert LOGIN_USERNAME_CHALLENGE.to_bytes() == b"334 VXNlcm5hbWU6\r\n"
    assert LOGIN_PASSWORD_CHALLENGE.to_bytes() == b"334 UGFzc3dvcmQ6\r\n"
    assert PLAIN_CHALLENGE.to_bytes() == b"334 \r\n"


def test_exchange_plain_with_initial_response_finishes_at_once():
    """AUTH PLAIN <response> yields the credentials without a challenge."""
    exchange = SASLExchange("plain", b64(b"\0alice\0pw"))
    assert exchange.start() == Credentials("alice", "pw")


def test_exchange_plain_without_initial_response_sends_empty_challenge():
    """AUTH PLAIN alone gets "334 " and then takes the response line."""
    exchange = SASLExchange("PLAIN", None)
    assert exchange.start() == PLAIN_CHALLENGE
    assert exchange.respond(b64(b"\0alice\0pw")) == Credentials("alice", "pw")


def test_exchange_login_two_steps():
    """AUTH LOGIN asks for the user name, then the password."""
    exchange = SASLExchange("LOGIN", None)
    assert exchange.start() == LOGIN_USERNAME_CHALLENGE
    assert exchange.respond(b64(b"alice")) == LOGIN_PASSWORD_CHALLENGE
    assert exchange.respond(b64(b"pw")) == Credentials("alice", "pw")


def test_exchange_login_with_initial_user_name():
    """AUTH LOGIN <user> skips straight to the password challenge."""
    exchange = SASLExchange("LOGIN", b64(b"alice"))
    assert exchange.start() == LOGIN_PASSWORD_CHALLENGE
    assert exchange.respond(b64(b"pw")) == Credentials("alice", "pw")


@pytest.mark.parametrize(
    ("steps", "reply"),
    [
        (["*"], replies.AUTH_CANCELLED),
        ([b64(b"alice"), "*"], replies.AUTH_CANCELLED),
        (["%%%"], replies.AUTH_BAD_BASE64),
        ([b64(b"alice"), ""], replies.AUTH_FAILED),
        (["", b64(b"pw")], replies.AUTH_FAILED),
    ],
)
def test_exchange_login_errors(steps: list[str], reply: replies.Reply):
    """Cancel, bad base64 and empty fields end a LOGIN exchange with their reply."""
    exchange = SASLExchange("LOGIN", None)
    exchange.start()
    with pytest.raises(SASLError) as info:
        for line in steps:
            exchange.respond(line)
    assert info.value.reply == reply


def test_exchange_unknown_mechanism():
    """An unsupported mechanism is refused with 504."""
    with pytest.raises(SASLError) as info:
        SASLExchange("CRAM-MD5", None)
    assert info.value.reply == replies.AUTH_MECHANISM_UNKNOWN
