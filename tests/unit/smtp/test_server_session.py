"""Tests for twistedrelay.smtp.server_session.ServerSession: the inbound conversation."""

from __future__ import annotations

import pytest

from tests.unit.smtp.session_driver import Transcript, accept_everything, drive
from twistedrelay.smtp import replies
from twistedrelay.smtp.replies import Reply
from twistedrelay.smtp.server_session import (
    Auth,
    AuthContinuation,
    Close,
    DataChunk,
    DataEnd,
    DataStart,
    Event,
    Helo,
    MailFrom,
    Output,
    RcptTo,
    ServerSession,
    SessionSettings,
    StartTLS,
)

SETTINGS = SessionSettings(hostname="mx.test")
EHLO = b"EHLO client.test\r\n"
MAIL = b"MAIL FROM:<sender@example.org>\r\n"
RCPT = b"RCPT TO:<rcpt@example.com>\r\n"


def run(*lines: bytes, settings: SessionSettings = SETTINGS, **kwargs: object) -> Transcript:
    """Send ``lines`` in one write, as a pipelining client would."""
    return drive([b"".join(lines)], settings=settings, **kwargs)  # type: ignore[arg-type]


def last_reply(transcript: Transcript) -> bytes:
    """The last complete reply line on the wire."""
    return transcript.wire.rstrip(b"\r\n").rsplit(b"\r\n", 1)[-1] + b"\r\n"


def test_greeting() -> None:
    """The greeting names the host (RFC 5321 §4.3.1)."""
    assert ServerSession(SETTINGS).greeting() == b"220 mx.test ESMTP twistedrelay\r\n"


def test_ehlo_lists_extensions() -> None:
    """EHLO answers with the capability list of DESIGN: no STARTTLS/AUTH unless configured."""
    transcript = run(EHLO)
    assert transcript.text.endswith(
        "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 36700160\r\n250-ENHANCEDSTATUSCODES\r\n"
        "250-8BITMIME\r\n250-SMTPUTF8\r\n250 CHUNKING\r\n"
    )
    assert transcript.events == [Helo("client.test", True)]


def test_ehlo_advertises_starttls_and_auth_when_configured() -> None:
    """STARTTLS and AUTH appear when the adapter offers them."""
    settings = SessionSettings(
        "mx.test", 1000, starttls_offered=True, auth_mechanisms=("PLAIN", "LOGIN")
    )
    text = run(EHLO, settings=settings).text
    assert "250-SIZE 1000\r\n" in text
    assert "250-STARTTLS\r\n" in text
    assert "250-AUTH PLAIN LOGIN\r\n" in text


def test_helo_single_line() -> None:
    """HELO gets one line and no extensions."""
    transcript = run(b"HELO client.test\r\n")
    assert last_reply(transcript) == b"250 mx.test\r\n"
    assert transcript.events == [Helo("client.test", False)]


def test_rejected_helo_is_sent_as_given_and_not_remembered() -> None:
    """A negative decision is the reply; MAIL afterwards still needs a greeting."""
    refusal = Reply(504, "5.5.2", "Helo command rejected")

    def decide(event: Event) -> Reply:
        return refusal if isinstance(event, Helo) else replies.OK

    transcript = run(EHLO, MAIL, decide=decide)
    assert transcript.text.endswith(
        "504 5.5.2 Helo command rejected\r\n" + str(replies.HELO_REQUIRED) + "\r\n"
    )


@pytest.mark.parametrize("line", [b"EHLO\r\n", b"HELO \r\n", b"EHLO a b\r\n", b"EHLO a\x01\r\n"])
def test_helo_without_valid_name_is_syntax_error(line: bytes) -> None:
    """HELO/EHLO needs one name: 501 5.5.4."""
    assert last_reply(run(line)) == replies.SYNTAX_ERROR.to_bytes()


def test_full_transaction_and_event_sequence() -> None:
    """A whole pipelined session gives its events in order and ordered replies."""
    transcript = run(EHLO, MAIL, RCPT, b"DATA\r\n", b"Subject: t\r\n\r\nbody\r\n.\r\n", b"QUIT\r\n")
    kinds = [type(event) for event in transcript.events]
    assert kinds == [Helo, MailFrom, RcptTo, DataStart, DataChunk, DataEnd, Output, Close]
    assert transcript.final_codes == [220, 250, 250, 250, 354, 250, 221]
    assert transcript.messages == [b"Subject: t\r\n\r\nbody\r\n"]
    assert transcript.closed == "quit"


def test_session_state_during_transaction() -> None:
    """The adapter can read the envelope from the session before DATA ends."""
    session = ServerSession(SETTINGS)
    assert session.receive(EHLO) == [Helo("client.test", True)]
    session.respond(replies.OK)
    assert (session.helo_name, session.extended) == ("client.test", True)
    assert session.receive(b"MAIL FROM:<a@b.c> BODY=8BITMIME\r\n") == [
        MailFrom("a@b.c", {"BODY": "8BITMIME"})
    ]
    session.respond(replies.SENDER_OK)
    assert session.receive(b"RCPT TO:<d@e.f> NOTIFY=NEVER\r\n") == [
        RcptTo("d@e.f", {"NOTIFY": "NEVER"})
    ]
    session.respond(replies.RECIPIENT_OK)
    assert session.sender == "a@b.c"
    assert session.mail_params == {"BODY": "8BITMIME"}
    assert session.recipients == (("d@e.f", {"NOTIFY": "NEVER"}),)
    assert session.receive(b"DATA\r\n") == [DataStart()]
    assert not session.in_data
    assert session.respond(replies.START_MAIL_INPUT) == replies.START_MAIL_INPUT.to_bytes()
    assert session.in_data
    assert session.receive(b"x\r\n.\r\n") == [DataChunk(b"x\r\n"), DataEnd(3, None)]
    assert session.respond(replies.queued_as("Q1")) == b"250 2.0.0 Ok: queued as Q1\r\n"
    assert (session.sender, session.recipients, session.in_data) == (None, (), False)
    assert session.helo_name == "client.test"


def test_receive_while_decision_pending_only_buffers() -> None:
    """Input during a pending decision is held until respond() and receive(b"")."""
    session = ServerSession(SETTINGS)
    assert session.receive(EHLO + b"NOOP\r\n") == [Helo("client.test", True)]
    assert session.receive(b"NOOP\r\n") == []
    session.respond(replies.OK)
    assert session.receive(b"") == [Output(replies.NOOP_OK.to_bytes() * 2)]


def test_respond_without_pending_decision_is_an_error() -> None:
    """respond() is only for decision events."""
    with pytest.raises(RuntimeError):
        ServerSession(SETTINGS).respond(replies.OK)


def test_pipelined_commands_get_ordered_replies() -> None:
    """RFC 2920: replies come in command order even with decisions interleaved."""
    transcript = run(
        EHLO, b"NOOP\r\n", MAIL, b"RCPT TO:<bad>\r\n", RCPT, b"VRFY x\r\n", b"RSET\r\n", b"HELP\r\n"
    )
    assert transcript.final_codes == [220, 250, 250, 250, 501, 250, 252, 250, 214]


@pytest.mark.parametrize(
    ("lines", "reply"),
    [
        ((b"FOO\r\n",), replies.UNKNOWN_COMMAND),
        ((b"\xff\xfe\r\n",), replies.UNKNOWN_COMMAND),
        ((b"MAIL FROM:<a@b.c>\r\n",), replies.HELO_REQUIRED),
        ((b"RCPT TO:<a@b.c>\r\n",), replies.NEED_MAIL),
        ((EHLO, b"RCPT TO:<a@b.c>\r\n"), replies.NEED_MAIL),
        ((EHLO, b"DATA\r\n"), replies.NEED_MAIL),
        ((EHLO, MAIL, b"DATA\r\n"), replies.NEED_RECIPIENTS),
        ((EHLO, MAIL, MAIL), replies.NESTED_MAIL),
        ((EHLO, b"MAIL TO:<a@b.c>\r\n"), replies.SYNTAX_ERROR),
        ((EHLO, b"MAIL FROM:<a@@b.c>\r\n"), replies.BAD_SENDER_SYNTAX),
        ((EHLO, b"MAIL FROM:<a@b.c> FOO=1\r\n"), replies.PARAMETER_NOT_IMPLEMENTED),
        ((EHLO, b"MAIL FROM:<a@b.c> SIZE=x\r\n"), replies.SYNTAX_ERROR),
        ((EHLO, b"MAIL FROM:<a@b.c> SIZE=36700161\r\n"), replies.MESSAGE_TOO_BIG),
        ((EHLO, b"MAIL FROM:<a@b.c> BODY=BINARYMIME\r\n"), replies.SYNTAX_ERROR),
        ((EHLO, b"MAIL FROM:<a@b.c> SMTPUTF8=yes\r\n"), replies.SYNTAX_ERROR),
        ((EHLO, b"MAIL FROM:<a@b.c> AUTH=<>\r\n"), replies.PARAMETER_NOT_IMPLEMENTED),
        ((EHLO, b"MAIL FROM:<a@b.c> RET=ALL\r\n"), replies.SYNTAX_ERROR),
        ((EHLO, "MAIL FROM:<ü@b.c>\r\n".encode()), replies.SMTPUTF8_REQUIRED),
        ((EHLO, b"MAIL FROM:<a@b.c> \xff\r\n"), replies.SYNTAX_ERROR),
        ((b"HELO x\r\n", b"MAIL FROM:<a@b.c> SIZE=10\r\n"), replies.PARAMETER_NOT_IMPLEMENTED),
        ((b"HELO x\r\n", b"MAIL FROM:<a@b.c> SMTPUTF8\r\n"), replies.PARAMETER_NOT_IMPLEMENTED),
        ((EHLO, MAIL, b"RCPT TO:<a@b..c>\r\n"), replies.BAD_ADDRESS_SYNTAX),
        ((EHLO, MAIL, b"RCPT TO:<>\r\n"), replies.BAD_ADDRESS_SYNTAX),
        ((EHLO, MAIL, b"RCPT TO:<a@b.c> FOO\r\n"), replies.PARAMETER_NOT_IMPLEMENTED),
        ((EHLO, MAIL, b"RCPT TO:<a@b.c> NOTIFY=SOMETIMES\r\n"), replies.SYNTAX_ERROR),
        ((EHLO, MAIL, b"RCPT TO:<a@b.c> ORCPT=rfc822\r\n"), replies.SYNTAX_ERROR),
        ((EHLO, MAIL, "RCPT TO:<ü@b.c>\r\n".encode()), replies.SMTPUTF8_REQUIRED),
        ((EHLO, MAIL, RCPT, b"DATA now\r\n"), replies.SYNTAX_ERROR),
        ((b"RSET x\r\n",), replies.SYNTAX_ERROR),
        ((b"QUIT now\r\n",), replies.SYNTAX_ERROR),
        ((b"VRFY\r\n",), replies.SYNTAX_ERROR),
        ((b"TURN\r\n",), replies.COMMAND_NOT_IMPLEMENTED),
        ((b"ETRN example.com\r\n",), replies.COMMAND_NOT_IMPLEMENTED),
        ((b"EXPN list\r\n",), replies.COMMAND_NOT_IMPLEMENTED),
        ((b"BDAT 10 LAST\r\n",), replies.COMMAND_NOT_IMPLEMENTED),
        ((b"STARTTLS\r\n",), replies.COMMAND_NOT_IMPLEMENTED),
        ((EHLO, b"AUTH PLAIN\r\n"), replies.COMMAND_NOT_IMPLEMENTED),
    ],
)
def test_error_replies(lines: tuple[bytes, ...], reply: Reply) -> None:
    """Each bad command gets the RFC's answer from the catalogue."""
    transcript = run(*lines)
    assert last_reply(transcript) == reply.to_bytes()
    assert transcript.closed is None


@pytest.mark.parametrize(
    ("lines", "reply"),
    [
        ((b"NOOP anything\r\n",), replies.NOOP_OK),
        ((b"noop\r\n",), replies.NOOP_OK),
        ((b"VRFY someone\r\n",), replies.CANNOT_VRFY),
        ((b"HELP\r\n",), replies.HELP),
        ((b"HELP MAIL\r\n",), replies.HELP),
        ((b"RSET\r\n",), replies.RESET_OK),
        ((b"NOOP\n",), replies.NOOP_OK),
    ],
)
def test_self_answered_commands(lines: tuple[bytes, ...], reply: Reply) -> None:
    """NOOP, VRFY, HELP and RSET are answered by the session; a bare LF ends a command."""
    assert last_reply(run(*lines)) == reply.to_bytes()


def test_accepted_parameters_reach_the_event() -> None:
    """SIZE, BODY, SMTPUTF8, RET, ENVID at MAIL and NOTIFY, ORCPT at RCPT are accepted."""
    transcript = run(
        EHLO,
        "MAIL FROM: <ü@exämple.org> SIZE=36700160 BODY=7bit SMTPUTF8 RET=HDRS ENVID=x+2B1"
        "\r\n".encode(),
        "RCPT TO:<用户@例子.广告> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@b\r\n".encode(),
        b"RCPT TO:<Postmaster>\r\n",
    )
    mail, rcpt, postmaster = transcript.events[1:]
    assert mail == MailFrom(
        "ü@exämple.org",
        {"SIZE": "36700160", "BODY": "7bit", "SMTPUTF8": None, "RET": "HDRS", "ENVID": "x+2B1"},
    )
    assert rcpt == RcptTo("用户@例子.广告", {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;a@b"})
    assert postmaster == RcptTo("Postmaster", {})


def test_null_sender_is_accepted() -> None:
    """``MAIL FROM:<>`` is the null reverse-path of bounces."""
    assert run(EHLO, b"MAIL FROM:<>\r\n").events[-1] == MailFrom("", {})


def test_rejected_sender_keeps_no_transaction() -> None:
    """After a refused MAIL, RCPT still needs MAIL."""

    def decide(event: Event) -> Reply:
        return replies.SENDER_NOT_OWNED if isinstance(event, MailFrom) else accept_everything(event)

    transcript = run(EHLO, MAIL, RCPT, decide=decide)
    assert transcript.final_codes[-2:] == [553, 503]


def test_too_many_recipients() -> None:
    """More than max_recipients accepted recipients is 452 4.5.3."""
    settings = SessionSettings("mx.test", max_recipients=2)
    transcript = run(EHLO, MAIL, RCPT, RCPT, RCPT, settings=settings)
    assert transcript.final_codes[-3:] == [250, 250, 452]
    assert last_reply(transcript) == replies.TOO_MANY_RECIPIENTS.to_bytes()


def test_refused_recipients_do_not_count_and_data_needs_one_accepted() -> None:
    """Only recipients the adapter accepted count; with none, DATA is 503 5.5.1."""

    def decide(event: Event) -> Reply:
        return replies.RELAY_DENIED if isinstance(event, RcptTo) else accept_everything(event)

    transcript = run(EHLO, MAIL, RCPT, b"DATA\r\n", decide=decide)
    assert last_reply(transcript) == replies.NEED_RECIPIENTS.to_bytes()


def test_rset_and_ehlo_reset_the_transaction() -> None:
    """RSET and a second EHLO clear sender and recipients (RFC 5321 §4.1.4)."""
    for reset in (b"RSET\r\n", EHLO):
        transcript = run(EHLO, MAIL, RCPT, reset, b"DATA\r\n")
        assert last_reply(transcript) == replies.NEED_MAIL.to_bytes()


def test_refused_data_start_keeps_transaction() -> None:
    """A non-354 answer to DATA leaves the transaction open; the body lines are commands."""

    def decide(event: Event) -> Reply:
        return replies.LOCAL_ERROR if isinstance(event, DataStart) else accept_everything(event)

    session = ServerSession(SETTINGS)
    transcript = drive([EHLO + MAIL + RCPT + b"DATA\r\n"], decide=decide, session=session)
    assert last_reply(transcript) == replies.LOCAL_ERROR.to_bytes()
    assert session.recipients == (("rcpt@example.com", {}),)
    assert not session.in_data


def test_data_end_errors_are_reported_and_nothing_is_queued() -> None:
    """Bare LF, too many hops and size limit: DataEnd carries the error, the reply is sent."""
    cases = [
        (b"a\nb\r\n.\r\n", SETTINGS, replies.BARE_LINE_ENDING),
        (b"a\rb\r\n.\r\n", SETTINGS, replies.BARE_LINE_ENDING),
        (b"Received: x\r\n" * 51 + b"\r\n.\r\n", SETTINGS, replies.TOO_MANY_HOPS),
        (
            b"x" * 200 + b"\r\n.\r\n",
            SessionSettings("mx.test", max_message_size=100),
            replies.MESSAGE_TOO_BIG,
        ),
        (
            b"X: " + b"y" * 2000 + b"\r\n\r\n.\r\n",
            SessionSettings("mx.test", max_header_size=1024),
            replies.HEADERS_TOO_BIG,
        ),
    ]
    for body, settings, error in cases:
        transcript = run(EHLO, MAIL, RCPT, b"DATA\r\n", body, b"NOOP\r\n", settings=settings)
        assert transcript.messages == []
        assert transcript.rejected == [error]
        assert transcript.text.endswith(error.to_bytes().decode() + "250 2.0.0 Ok\r\n")


def test_fifty_received_headers_are_fine() -> None:
    """Exactly max_received_headers Received: fields is accepted."""
    transcript = run(EHLO, MAIL, RCPT, b"DATA\r\n", b"Received: x\r\n" * 50 + b"\r\n.\r\n")
    assert len(transcript.messages) == 1


def test_two_messages_in_one_session() -> None:
    """After DATA ends, a new transaction can start on the same session."""
    message = MAIL + RCPT + b"DATA\r\nhello\r\n.\r\n"
    transcript = run(EHLO, message, message, b"QUIT\r\n")
    assert transcript.messages == [b"hello\r\n", b"hello\r\n"]


def test_line_too_long_is_discarded_and_session_continues() -> None:
    """A command line over max_line_length is 500 5.5.6; the next line is read normally."""
    settings = SessionSettings("mx.test", max_line_length=512)
    long_line = b"NOOP " + b"x" * 600 + b"\r\n"
    for chunks in ([long_line + b"NOOP\r\n"], [long_line[:300], long_line[300:], b"NOOP\r\n"]):
        transcript = drive(chunks, settings=settings)
        assert transcript.text.endswith(str(replies.LINE_TOO_LONG) + "\r\n250 2.0.0 Ok\r\n")
    # A line of exactly max_line_length bytes (CRLF included) is fine.
    exact = b"NOOP " + b"x" * (512 - 7) + b"\r\n"
    assert last_reply(drive([exact], settings=settings)) == replies.NOOP_OK.to_bytes()


def test_line_too_long_without_newline_does_not_buffer() -> None:
    """An endless line is answered once and dropped, so memory stays bounded."""
    session = ServerSession(SessionSettings("mx.test", max_line_length=512))
    assert session.receive(b"x" * 1000) == [Output(replies.LINE_TOO_LONG.to_bytes())]
    for _ in range(100):
        assert session.receive(b"x" * 1000) == []
    assert session.receive(b"\r\nNOOP\r\n") == [Output(replies.NOOP_OK.to_bytes())]


def test_junk_commands_past_the_limit_count_as_errors() -> None:
    """A session of nothing but NOOP, RSET, VRFY and HELP ends at the error limit (Postfix's
    smtpd_junk_command_limit), instead of holding its connection for ever."""
    settings = SessionSettings("mx.test", max_errors=3)
    junk = [b"NOOP\r\n", b"RSET\r\n", b"VRFY x\r\n", b"HELP\r\n"] * 30
    transcript = run(EHLO, *junk, settings=settings)
    assert transcript.closed == "too_many_errors"
    assert transcript.text.count("\r\n250 2.0.0 Ok") + transcript.text.count("\r\n252 ") >= 50
    assert last_reply(transcript) == replies.TOO_MANY_ERRORS.to_bytes()


def test_the_junk_count_starts_again_after_each_message() -> None:
    """A client that RSETs between many messages on one connection is not cut off."""
    settings = SessionSettings("mx.test", max_errors=3)
    message = [MAIL, RCPT, b"DATA\r\n", b"Subject: x\r\n\r\nbody\r\n.\r\n", b"RSET\r\n"]
    transcript = run(EHLO, *([b"NOOP\r\n"] * 60 + message) * 4, settings=settings)
    assert transcript.closed is None
    assert len(transcript.messages) == 4


def test_too_many_errors_closes_with_421() -> None:
    """At max_errors the session sends 421 4.7.0 and Close; later input is ignored."""
    settings = SessionSettings("mx.test", max_errors=3)
    session = ServerSession(settings)
    transcript = drive([b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n"], session=session)
    assert transcript.final_codes == [220, 500, 500, 500, 421]
    assert last_reply(transcript) == replies.TOO_MANY_ERRORS.to_bytes()
    assert transcript.closed == "too_many_errors"
    assert isinstance(transcript.events[-1], Close)
    assert session.is_closed
    assert session.receive(b"NOOP\r\n") == []


def test_adapter_errors_count_toward_the_limit() -> None:
    """Errors the adapter answers (e.g. relay denied) count; Close follows receive(b"")."""
    session = ServerSession(SessionSettings("mx.test", max_errors=2))
    session.receive(EHLO)
    session.respond(replies.OK)
    session.receive(MAIL)
    session.respond(replies.OK)
    session.receive(RCPT + RCPT)
    assert session.respond(replies.RELAY_DENIED) == replies.RELAY_DENIED.to_bytes()
    assert session.receive(b"") == [RcptTo("rcpt@example.com", {})]
    out = session.respond(replies.RELAY_DENIED)
    assert out == replies.RELAY_DENIED.to_bytes() + replies.TOO_MANY_ERRORS.to_bytes()
    assert session.receive(b"") == [Close("too_many_errors")]
    assert session.error_count == 2


def test_quit_closes() -> None:
    """QUIT answers 221 2.0.0 and closes; later pipelined input is ignored."""
    transcript = run(b"QUIT\r\nNOOP\r\n")
    assert transcript.final_codes == [220, 221]
    assert transcript.closed == "quit"


def test_undecodable_command_is_answered_not_raised() -> None:
    """Invalid UTF-8 in an argument is 501; in the verb 500."""
    assert last_reply(run(EHLO, b"MAIL FROM:<\xff@b.c>\r\n")) == replies.SYNTAX_ERROR.to_bytes()
    assert last_reply(run(b"N\xffOP\r\n")) == replies.UNKNOWN_COMMAND.to_bytes()


def test_auth_required_before_mail() -> None:
    """On submission, MAIL before AUTH is 530 5.7.0."""
    settings = SessionSettings("mx.test", auth_mechanisms=("PLAIN",), auth_required=True)
    assert last_reply(run(EHLO, MAIL, settings=settings)) == replies.AUTH_REQUIRED.to_bytes()


def test_auth_with_initial_response_then_mail() -> None:
    """AUTH PLAIN <ir> → Auth event; 235 authenticates; MAIL is then allowed."""
    settings = SessionSettings("mx.test", auth_mechanisms=("PLAIN", "LOGIN"), auth_required=True)
    session = ServerSession(settings)
    transcript = drive([EHLO + b"AUTH plain AHVzZXIAcGFzcw==\r\n" + MAIL], session=session)
    assert transcript.events[1] == Auth("PLAIN", "AHVzZXIAcGFzcw==")
    assert isinstance(transcript.events[2], MailFrom)
    assert session.is_authenticated
    assert session.authenticated_as == "user"
    assert transcript.final_codes == [220, 250, 235, 250]


def test_auth_continuation_and_cancel() -> None:
    """A 334 makes the next line an AuthContinuation; ``*`` cancels with 501 5.7.0."""
    settings = SessionSettings("mx.test", auth_mechanisms=("LOGIN",))
    session = ServerSession(settings)
    session.receive(EHLO)
    session.respond(replies.OK)
    assert session.receive(b"AUTH LOGIN\r\n") == [Auth("LOGIN", None)]
    session.respond(Reply(334, None, "VXNlcm5hbWU6"))
    assert session.receive(b"dXNlcg==\r\n") == [AuthContinuation("dXNlcg==")]
    session.respond(Reply(334, None, "UGFzc3dvcmQ6"))
    assert session.receive(b"*\r\nNOOP\r\n") == [
        Output(replies.AUTH_CANCELLED.to_bytes() + replies.NOOP_OK.to_bytes())
    ]
    assert not session.is_authenticated


def test_auth_failure_and_sequence_errors() -> None:
    """535 leaves the session unauthenticated; AUTH needs EHLO, no transaction, no prior AUTH."""
    settings = SessionSettings("mx.test", auth_mechanisms=("PLAIN",))

    def decide(event: Event) -> Reply:
        return replies.AUTH_FAILED if isinstance(event, Auth) else accept_everything(event)

    session = ServerSession(settings)
    transcript = drive([EHLO + b"AUTH PLAIN =\r\n"], settings, decide, session)
    assert transcript.events[1] == Auth("PLAIN", "")
    assert not session.is_authenticated
    assert last_reply(run(b"AUTH PLAIN\r\n", settings=settings)) == replies.HELO_REQUIRED.to_bytes()
    assert (
        last_reply(run(b"HELO x\r\n", b"AUTH PLAIN\r\n", settings=settings))
        == replies.BAD_SEQUENCE.to_bytes()
    )
    assert (
        last_reply(run(EHLO, MAIL, b"AUTH PLAIN\r\n", settings=settings))
        == replies.BAD_SEQUENCE.to_bytes()
    )
    assert (
        last_reply(run(EHLO, b"AUTH CRAM-MD5\r\n", settings=settings))
        == replies.AUTH_MECHANISM_UNKNOWN.to_bytes()
    )
    assert last_reply(run(EHLO, b"AUTH\r\n", settings=settings)) == replies.SYNTAX_ERROR.to_bytes()
    again = run(EHLO, b"AUTH PLAIN =\r\n", b"AUTH PLAIN =\r\n", settings=settings)
    assert last_reply(again) == replies.ALREADY_AUTHENTICATED.to_bytes()


def test_235_needs_an_identity() -> None:
    """respond(235) without authenticated_as is a programming error."""
    session = ServerSession(SessionSettings("mx.test", auth_mechanisms=("PLAIN",)))
    session.receive(EHLO)
    session.respond(replies.OK)
    session.receive(b"AUTH PLAIN =\r\n")
    with pytest.raises(ValueError):
        session.respond(replies.AUTH_SUCCEEDED)


def test_starttls_resets_the_session() -> None:
    """After tls_started the client must greet again (RFC 3207 §4.2) and STARTTLS is gone."""
    settings = SessionSettings("mx.test", starttls_offered=True)
    session = ServerSession(settings)
    session.receive(EHLO)
    session.respond(replies.OK)
    assert session.receive(b"STARTTLS\r\n") == [StartTLS()]
    assert session.respond(replies.READY_TO_START_TLS) == replies.READY_TO_START_TLS.to_bytes()
    session.tls_started(SessionSettings("mx.test", auth_mechanisms=("PLAIN",)))
    assert session.is_tls
    assert session.helo_name is None
    assert session.receive(MAIL) == [Output(replies.HELO_REQUIRED.to_bytes())]
    transcript = drive([EHLO + b"STARTTLS\r\n"], session=session)
    assert "STARTTLS" not in transcript.text.split("ESMTP twistedrelay", 1)[1].split("\r\n250 ")[0]
    assert "250-AUTH PLAIN\r\n" in transcript.text
    assert last_reply(transcript) == replies.BAD_SEQUENCE.to_bytes()


def test_starttls_in_transaction_or_with_argument() -> None:
    """STARTTLS inside a transaction is 503; with an argument 501."""
    settings = SessionSettings("mx.test", starttls_offered=True)
    assert (
        last_reply(run(EHLO, MAIL, b"STARTTLS\r\n", settings=settings))
        == replies.BAD_SEQUENCE.to_bytes()
    )
    assert (
        last_reply(run(b"STARTTLS now\r\n", settings=settings)) == replies.SYNTAX_ERROR.to_bytes()
    )


def test_refused_starttls_changes_nothing() -> None:
    """A 454 to STARTTLS keeps the plaintext session going."""

    def decide(event: Event) -> Reply:
        return (
            replies.TLS_NOT_AVAILABLE if isinstance(event, StartTLS) else accept_everything(event)
        )

    settings = SessionSettings("mx.test", starttls_offered=True)
    transcript = run(EHLO, b"STARTTLS\r\n", MAIL, settings=settings, decide=decide)
    assert transcript.final_codes[-2:] == [454, 250]


def split_every_way(data: bytes) -> list[list[bytes]]:
    """Whole, one byte at a time, and in two at every point."""
    return [[data], [data[i : i + 1] for i in range(len(data))]] + [
        [data[:i], data[i:]] for i in range(1, len(data))
    ]


def test_whole_session_is_chunk_size_invariant() -> None:
    """Every split of a session's input gives the same replies and the same messages."""
    data = (
        EHLO
        + b"NOOP\r\n"
        + MAIL
        + RCPT
        + b"RCPT TO:<bad\r\n"
        + b"DATA\r\n"
        + b"Received: a\r\nSubject: x\r\n\r\n..dot\r\n.\r\n"
        + b"RSET\n"
        + MAIL
        + RCPT
        + b"DATA\r\nsecond\r\n.\r\n"
        + b"QUIT\r\n"
    )
    expected = drive([data])
    assert expected.messages == [b"Received: a\r\nSubject: x\r\n\r\n.dot\r\n", b"second\r\n"]
    assert expected.closed == "quit"
    for chunks in split_every_way(data):
        transcript = drive(chunks)
        assert (transcript.wire, transcript.messages) == (expected.wire, expected.messages)


def test_too_long_auth_line_ends_the_exchange() -> None:
    """A too-long line during AUTH ends the exchange: the next line is a command again."""
    session = ServerSession(
        SessionSettings("mx.test", max_line_length=512, auth_mechanisms=("PLAIN",))
    )
    session.receive(EHLO)
    session.respond(replies.OK)
    session.receive(b"AUTH PLAIN\r\n")
    session.respond(Reply(334, None, ""))
    assert session.receive(b"A" * 600 + b"\r\nNOOP\r\n") == [
        Output(replies.LINE_TOO_LONG.to_bytes() + replies.NOOP_OK.to_bytes())
    ]
