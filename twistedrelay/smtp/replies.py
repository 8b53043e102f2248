"""SMTP replies: the Reply value and the catalogue of every reply the relay sends.

Owns the wording of replies. Every reply has a name here, so tests and logs use the same
catalogue (like aiosmtpd's testing/statuscodes.py). Texts keep the RFC's words and the
enhanced status code (RFC 3463/RFC 5248); nothing whimsical, because operators grep them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: a three-digit code, an optional enhanced code and text lines.

    ``text`` may hold several lines separated by newlines; they are sent as a multi-line reply
    (RFC 5321 §4.2.1), each line carrying the enhanced code when there is one.
    """

    code: int
    enhanced: str | None
    text: str

    def to_bytes(self) -> bytes:
        """Encode the reply for the wire, CRLF-terminated."""
        prefix = f"{self.code} {self.enhanced} " if self.enhanced else f"{self.code} "
        lines = self.text.split("\n")
        if len(lines) == 1:
            return (prefix + lines[0] + "\r\n").encode("utf-8", "replace")
        continued = f"{self.code}-{self.enhanced} " if self.enhanced else f"{self.code}-"
        out = [continued + line for line in lines[:-1]]
        out.append(prefix + lines[-1])
        return ("\r\n".join(out) + "\r\n").encode("utf-8", "replace")

    @property
    def is_positive(self) -> bool:
        """2xx and 3xx: the command was accepted (or DATA may proceed)."""
        return self.code < 400

    @property
    def is_transient(self) -> bool:
        """4xx: try again later."""
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        """5xx: do not retry."""
        return self.code >= 500

    def with_text(self, text: str) -> Reply:
        """The same code and enhanced code with other text."""
        return Reply(self.code, self.enhanced, text)

    def __str__(self) -> str:
        if self.enhanced:
            return f"{self.code} {self.enhanced} {self.text}"
        return f"{self.code} {self.text}"


# Positive
OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Ok")
RESET_OK = Reply(250, "2.0.0", "Ok")
NOOP_OK = Reply(250, "2.0.0", "Ok")
START_MAIL_INPUT = Reply(354, None, "End data with <CR><LF>.<CR><LF>")
CLOSING = Reply(221, "2.0.0", "Bye")
CANNOT_VRFY = Reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = Reply(
    214, "2.0.0", "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP"
)
READY_TO_START_TLS = Reply(220, "2.0.0", "Ready to start TLS")
AUTH_SUCCEEDED = Reply(235, "2.7.0", "Authentication successful")


def queued_as(queue_id: str) -> Reply:
    """The reply to a message that is now durable in the queue."""
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")


# Transient failures (4xx)
SERVICE_NOT_AVAILABLE = Reply(421, "4.3.2", "Service not available, closing transmission channel")
IDLE_TIMEOUT = Reply(421, "4.4.2", "Error: timeout exceeded, closing transmission channel")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Error: too many errors, closing transmission channel")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Error: too many connections, try again later")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, closing transmission channel")
LOCAL_ERROR = Reply(451, "4.3.0", "Error: queue file write error")
PLUGIN_ERROR = Reply(451, "4.3.0", "Error: internal error, try again later")
INSUFFICIENT_STORAGE = Reply(452, "4.3.1", "Error: insufficient system storage")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")
RATE_LIMITED = Reply(450, "4.7.1", "Error: rate limit exceeded, try again later")
TLS_NOT_AVAILABLE = Reply(454, "4.7.0", "TLS not available due to temporary reason")
AUTH_TEMPORARY_FAILURE = Reply(454, "4.7.0", "Temporary authentication failure")

# Permanent failures (5xx)
UNKNOWN_COMMAND = Reply(500, "5.5.2", "Error: command not recognized")
LINE_TOO_LONG = Reply(500, "5.5.6", "Error: line too long")
SYNTAX_ERROR = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
BAD_ADDRESS_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")
BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")
HELO_REQUIRED = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
BAD_SEQUENCE = Reply(503, "5.5.1", "Error: bad sequence of commands")
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
NEED_RECIPIENTS = Reply(503, "5.5.1", "Error: need RCPT command")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Error: already authenticated")
PARAMETER_NOT_IMPLEMENTED = Reply(555, "5.5.4", "Unsupported option")
COMMAND_NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
MUST_ISSUE_STARTTLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
AUTH_FAILED = Reply(535, "5.7.8", "Error: authentication failed")
ENCRYPTION_REQUIRED_FOR_AUTH = Reply(
    538, "5.7.11", "Encryption required for requested authentication mechanism"
)
AUTH_MECHANISM_UNKNOWN = Reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_CANCELLED = Reply(501, "5.7.0", "Authentication cancelled")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Error: cannot decode AUTH response")  # RFC 4954 §4
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Error: message file too big")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address rejected: not owned by user")
SMTPUTF8_REQUIRED = Reply(553, "5.6.7", "Error: SMTPUTF8 is required for non-ASCII addresses")
TOO_MANY_HOPS = Reply(554, "5.4.6", "Error: too many hops (Received headers), mail loop?")
BARE_LINE_ENDING = Reply(
    550, "5.6.11", "Error: bare <CR> or <LF> in message data (SMTP smuggling protection)"
)
HEADERS_TOO_BIG = Reply(552, "5.3.4", "Error: message header size exceeds limit")
TEXT_LINE_TOO_LONG = Reply(500, "5.5.6", "Error: message has a line too long (RFC 5321 4.5.3.1.6)")
TRANSACTION_FAILED = Reply(554, "5.0.0", "Error: transaction failed")

# Outbound delivery (smtp/client_session.py): what a mail host's answer, or the lack of one,
# means for each recipient when no reply from the host itself applies.
CONNECTION_LOST = Reply(421, "4.4.2", "Lost connection with mail host")
CONVERSATION_TIMED_OUT = Reply(421, "4.4.2", "Timed out while talking to mail host")
MALFORMED_REPLY = Reply(451, "4.5.0", "Malformed reply from mail host")
UNEXPECTED_REPLY = Reply(451, "4.5.0", "Unexpected reply from mail host")
GREETING_REFUSED = Reply(450, "4.4.0", "Mail host refused to talk to us")
RSET_REFUSED = Reply(451, "4.5.0", "Mail host refused RSET")
TLS_REQUIRED_NOT_OFFERED = Reply(450, "4.7.4", "TLS is required, but was not offered by host")
TLS_REQUIRED_REFUSED = Reply(450, "4.7.4", "TLS is required, but host refused to start TLS")
TLS_HANDSHAKE_FAILED = Reply(421, "4.7.5", "TLS handshake with mail host failed")
# A handshake failure (so "may" falls back to clear text), never started: the host sent more
# after its 220, which a man in the middle may have injected (RFC 3207 §4.2, CVE-2011-0411).
STARTTLS_INJECTION = TLS_HANDSHAKE_FAILED.with_text(
    f"{TLS_HANDSHAKE_FAILED.text}: data after its 220 to STARTTLS (possible injection)"
)
MESSAGE_TOO_BIG_FOR_HOST = Reply(552, "5.3.4", "Message size exceeds the size limit of host")
SMTPUTF8_NOT_OFFERED = Reply(554, "5.6.7", "SMTPUTF8 is required, but was not offered by host")
