"""SASL for SMTP AUTH (RFC 4954): the PLAIN (RFC 4616) and LOGIN exchanges, without I/O.

Owns the framing of AUTH: challenges, base64 responses, cancellation and the mapping of
malformed input to replies. It does not check passwords (auth.py does, through
twisted.cred) and never logs what it decodes.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from twistedrelay.smtp import replies
from twistedrelay.smtp.replies import Reply

SASL_MECHANISMS = ("PLAIN", "LOGIN")
"""The mechanisms to advertise in EHLO (``AUTH PLAIN LOGIN``), only over TLS."""

PLAIN_CHALLENGE = Reply(334, None, "")
LOGIN_USERNAME_CHALLENGE = Reply(334, None, "VXNlcm5hbWU6")  # base64 of "Username:"
LOGIN_PASSWORD_CHALLENGE = Reply(334, None, "UGFzc3dvcmQ6")  # base64 of "Password:"


class SASLError(Exception):
    """An AUTH exchange that ends without credentials; ``reply`` is what to send."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Credentials:
    """A user name and password from a finished SASL exchange."""

    username: str
    password: str


def decode_response(response: str) -> bytes:
    """Decode one client response line of an AUTH exchange (RFC 4954 §4).

    :raises SASLError: ``AUTH_CANCELLED`` for ``*``, ``AUTH_BAD_BASE64`` for bad base64.
    """
    response = response.strip()
    if response == "*":
        raise SASLError(replies.AUTH_CANCELLED)
    if response == "=":  # RFC 4954 §4: "=" is an empty initial response
        return b""
    try:
        return base64.b64decode(response, validate=True)
    except (binascii.Error, ValueError):
        raise SASLError(replies.AUTH_BAD_BASE64) from None


def decode_plain(initial_response_b64: str) -> tuple[str, str, str]:
    """Decode a PLAIN response (RFC 4616 §2): ``authzid NUL authcid NUL passwd``.

    Proxy authorization is not supported: an authzid other than empty or the authcid fails.

    :returns: ``(authzid, authcid, password)``.
    :raises SASLError: with ``AUTH_CANCELLED``, ``AUTH_BAD_BASE64`` (bad base64 or UTF-8) or
        ``AUTH_FAILED`` (malformed message, foreign authzid).
    """
    message = decode_response(initial_response_b64)
    parts = message.split(b"\0")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise SASLError(replies.AUTH_FAILED)
    authzid, authcid, password = (_utf8(p) for p in parts)
    if authzid and authzid != authcid:
        raise SASLError(replies.AUTH_FAILED)
    return authzid, authcid, password


def decode_login_response(response_b64: str) -> str:
    """Decode one LOGIN step (the user name or the password).

    :raises SASLError: ``AUTH_CANCELLED``, ``AUTH_BAD_BASE64`` (bad base64 or UTF-8).
    """
    return _utf8(decode_response(response_b64))


def _utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SASLError(replies.AUTH_BAD_BASE64) from None


class SASLExchange:
    """One AUTH command's challenge and responses, sans-IO.

    Usage by the server::

        exchange = SASLExchange(mechanism, initial_response)  # from "AUTH <mech> [<ir>]"
        step = exchange.start()
        while isinstance(step, Reply):   # a 334 challenge: send it, read one line
            step = exchange.respond(line)
        authenticate(step.username, step.password)

    Every method raises :class:`SASLError` carrying the reply that ends the exchange.
    """

    def __init__(self, mechanism: str, initial_response: str | None) -> None:
        """Begin an exchange.

        :raises SASLError: ``AUTH_MECHANISM_UNKNOWN`` for a mechanism other than PLAIN/LOGIN.
        """
        self.mechanism = mechanism.upper()
        if self.mechanism not in SASL_MECHANISMS:
            raise SASLError(replies.AUTH_MECHANISM_UNKNOWN)
        self._initial_response = initial_response
        self._username: str | None = None

    def start(self) -> Reply | Credentials:
        """The first step: a challenge to send, or the credentials (PLAIN with a response)."""
        if self.mechanism == "PLAIN":
            if self._initial_response is None:
                return PLAIN_CHALLENGE
            return self._plain(self._initial_response)
        if self._initial_response is None:
            return LOGIN_USERNAME_CHALLENGE
        # A LOGIN initial response carries the user name (as Postfix and Exim accept).
        self._username = decode_login_response(self._initial_response)
        return LOGIN_PASSWORD_CHALLENGE

    def respond(self, line: str) -> Reply | Credentials:
        """Take the client's response to the last challenge."""
        if self.mechanism == "PLAIN":
            return self._plain(line)
        if self._username is None:
            self._username = decode_login_response(line)
            return LOGIN_PASSWORD_CHALLENGE
        password = decode_login_response(line)
        if not self._username or not password:
            raise SASLError(replies.AUTH_FAILED)
        return Credentials(self._username, password)

    @staticmethod
    def _plain(response: str) -> Credentials:
        _, authcid, password = decode_plain(response)
        return Credentials(authcid, password)
