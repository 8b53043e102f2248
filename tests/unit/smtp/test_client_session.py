"""ClientSession: the outbound SMTP conversation, driven with plain bytes (no reactor)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twistedrelay.smtp import replies
from twistedrelay.smtp.client_session import (
    Capabilities,
    ClientSession,
    Closed,
    ContentEncoder,
    ProtocolError,
    Ready,
    RecipientResult,
    ReplyParser,
    SendContent,
    SessionFailed,
    SessionStateError,
    Stage,
    StartTLS,
    TransactionComplete,
    encode_content,
    parse_ehlo_reply,
)
from twistedrelay.smtp.replies import Reply

GREETING = b"220 mx.example.test ESMTP\r\n"
EHLO_FULL = (
    b"250-mx.example.test\r\n250-PIPELINING\r\n250-SIZE 10000\r\n250-8BITMIME\r\n"
    b"250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250-DSN\r\n250-AUTH PLAIN LOGIN\r\n"
    b"250 STARTTLS\r\n"
)
EHLO_PLAIN = b"250-mx.example.test\r\n250 ENHANCEDSTATUSCODES\r\n"
OK = b"250 2.0.0 Ok\r\n"
GO_AHEAD = b"354 End data with <CR><LF>.<CR><LF>\r\n"
NO_USER = b"550 5.1.1 No such user\r\n"
MAILBOX_BUSY = b"450 4.2.1 Mailbox busy\r\n"
RECIPIENTS = [("a@example.test", {}), ("b@example.test", {}), ("c@example.test", {})]


def ready_session(ehlo: bytes = EHLO_FULL, tls_level: str = "none") -> ClientSession:
    """A session past the greeting and EHLO."""
    session = ClientSession("relay.test", tls_level)
    assert session.receive(GREETING) == []
    assert session.data_to_send() == b"EHLO relay.test\r\n"
    events = session.receive(ehlo)
    assert len(events) == 1 and isinstance(events[0], Ready)
    assert session.data_to_send() == b""
    return session


def reply_of(raw: bytes) -> Reply:
    (reply,) = ReplyParser().feed(raw)
    return reply


def results(events: list) -> list[tuple[str, int]]:
    """(recipient, code) pairs of the single TransactionComplete in ``events``."""
    (complete,) = [e for e in events if isinstance(e, TransactionComplete)]
    return [(r.recipient, r.reply.code) for r in complete.result.recipients]


# -- reply parsing ---------------------------------------------------------------------------


def test_multiline_reply_with_enhanced_codes_is_one_reply():
    """Continuation lines join into one Reply and the enhanced code is lifted out of each."""
    raw = b"550-5.1.1 The account\r\n550-5.1.1 does not exist\r\n550 5.1.1 Try again\r\n"
    assert ReplyParser().feed(raw) == [
        Reply(550, "5.1.1", "The account\ndoes not exist\nTry again")
    ]


def test_enhanced_code_of_another_class_stays_in_the_text():
    """A 250 reply whose text starts 5.0.0 has no enhanced code (RFC 3463 class must match)."""
    assert reply_of(b"250 5.0.0 odd\r\n") == Reply(250, None, "5.0.0 odd")


def test_reply_without_text_and_bare_lf_are_accepted():
    """'250' alone and LF line endings from sloppy hosts still parse."""
    assert ReplyParser().feed(b"250\n354 go\n") == [Reply(250, None, ""), Reply(354, None, "go")]


@pytest.mark.parametrize(
    "raw",
    [b"hello\r\n", b"25\r\n", b"600 nope\r\n", b"250x\r\n", b"250-a\r\n251 b\r\n"],
)
def test_malformed_reply_lines_raise_protocol_error(raw):
    """Lines that are not reply lines, or a code change mid-reply, are protocol errors."""
    with pytest.raises(ProtocolError):
        ReplyParser().feed(raw)


def test_overlong_reply_line_is_a_protocol_error():
    """A host cannot make us buffer without bound."""
    with pytest.raises(ProtocolError):
        ReplyParser().feed(b"250 " + b"x" * 5000)


@given(st.binary(max_size=300))
def test_reply_parser_raises_only_protocol_error(data):
    """Any input yields replies or ProtocolError, never another exception."""
    try:
        ReplyParser().feed(data)
    except ProtocolError:
        pass


@given(
    st.lists(
        st.tuples(
            st.sampled_from([220, 250, 354, 421, 450, 550]),
            st.lists(st.text(alphabet="abc 5.1", max_size=20), min_size=1, max_size=4),
        ),
        min_size=1,
        max_size=5,
    ),
    st.integers(min_value=1, max_value=50),
)
def test_reply_parsing_is_chunk_size_invariant(specs, chunk_size):
    """Feeding the same replies in chunks of any size gives the same replies."""
    raw = b"".join(Reply(code, None, "\n".join(lines)).to_bytes() for code, lines in specs)
    whole = ReplyParser().feed(raw)
    parser = ReplyParser()
    chunked = []
    for i in range(0, len(raw), chunk_size):
        chunked.extend(parser.feed(raw[i : i + chunk_size]))
    assert chunked == whole and len(whole) == len(specs)


def test_ehlo_keywords_are_parsed_into_capabilities():
    """Every extension the relay cares about is recognised in an EHLO reply."""
    caps = parse_ehlo_reply(reply_of(EHLO_FULL))
    assert caps.extended and caps.pipelining and caps.eightbitmime and caps.smtputf8
    assert caps.starttls and caps.enhanced_status_codes and caps.dsn and caps.offers_size
    assert caps.size_limit == 10000
    assert caps.auth_mechanisms == {"PLAIN", "LOGIN"}


def test_size_zero_or_absent_means_no_limit():
    """RFC 1870 §4: SIZE 0 (or bare SIZE) declares no fixed limit."""
    assert parse_ehlo_reply(reply_of(b"250-mx\r\n250 SIZE 0\r\n")).size_limit is None
    assert parse_ehlo_reply(reply_of(b"250-mx\r\n250 SIZE\r\n")).offers_size
    assert Capabilities().size_limit is None


# -- opening the connection ------------------------------------------------------------------


def test_greeting_is_answered_with_ehlo_and_capabilities_make_ready():
    """220 → EHLO hostname; 250 → Ready carrying the parsed capabilities."""
    session = ClientSession("relay.test")
    assert session.awaiting == "greeting"
    session.receive(GREETING)
    assert session.data_to_send() == b"EHLO relay.test\r\n"
    assert session.awaiting == "EHLO"
    (event,) = session.receive(EHLO_FULL)
    assert event == Ready(parse_ehlo_reply(reply_of(EHLO_FULL)), tls=False)
    assert session.stage is Stage.READY and session.awaiting is None


def test_ehlo_rejected_with_5xx_falls_back_to_helo():
    """RFC 5321 §3.2: a host that rejects EHLO gets HELO; no extensions are then assumed."""
    session = ClientSession("relay.test")
    session.receive(GREETING)
    session.data_to_send()
    assert session.receive(b"502 5.5.1 Command not implemented\r\n") == []
    assert session.data_to_send() == b"HELO relay.test\r\n"
    assert session.receive(b"250 mx.example.test\r\n") == [Ready(Capabilities(), tls=False)]


def test_helo_rejected_fails_the_session_and_quits():
    """When HELO is refused too, the session fails with that reply and sends QUIT."""
    session = ClientSession("relay.test")
    session.receive(GREETING)
    session.receive(b"500 no\r\n")
    session.data_to_send()
    events = session.receive(b"554 5.7.1 go away\r\n")
    assert events == [SessionFailed(Reply(554, "5.7.1", "go away"))]
    assert session.data_to_send() == b"QUIT\r\n"
    assert session.receive(b"221 bye\r\n") == [Closed()]
    assert session.stage is Stage.CLOSED


def test_ehlo_tempfail_fails_the_session():
    """A 4xx to EHLO is not a reason to try HELO: the session fails and quits."""
    session = ClientSession("relay.test")
    session.receive(GREETING)
    session.data_to_send()
    assert session.receive(b"451 4.3.0 later\r\n") == [SessionFailed(Reply(451, "4.3.0", "later"))]
    assert session.data_to_send() == b"QUIT\r\n"


def test_554_greeting_fails_the_session_and_sends_quit():
    """RFC 5321 §3.1: after a 554 greeting the client sends QUIT. The failure is temporary
    (Postfix's smtp_skip_5xx_greeting): the next host is tried, the mail deferred."""
    session = ClientSession("relay.test")
    events = session.receive(b"554 5.3.2 No SMTP service here\r\n")
    refused = replies.GREETING_REFUSED
    expected = refused.with_text(f"{refused.text}: 554 5.3.2 No SMTP service here")
    assert events == [SessionFailed(expected)]
    assert session.data_to_send() == b"QUIT\r\n"


def test_421_greeting_fails_the_session_without_quit():
    """RFC 5321 §3.8: a 421 means the host is closing; nothing more is sent."""
    session = ClientSession("relay.test")
    events = session.receive(b"421 4.3.2 busy\r\n")
    assert events == [SessionFailed(Reply(421, "4.3.2", "busy"))]
    assert session.data_to_send() == b"" and session.stage is Stage.CLOSED


def test_malformed_reply_fails_the_session_as_protocol_error():
    """Garbage from the host fails the session with 451 4.5.0 and closes without QUIT."""
    session = ClientSession("relay.test")
    (event,) = session.receive(b"HTTP/1.1 400 Bad Request\r\n")
    assert isinstance(event, SessionFailed)
    assert (event.reply.code, event.reply.enhanced) == (451, "4.5.0")
    assert session.stage is Stage.CLOSED and session.data_to_send() == b""


def test_unsolicited_421_while_idle_fails_the_session():
    """A host may announce 421 at any time (RFC 5321 §3.8), even between transactions."""
    session = ready_session()
    events = session.receive(b"421 4.4.2 idle timeout\r\n")
    assert events == [SessionFailed(Reply(421, "4.4.2", "idle timeout"))]


def test_unsolicited_other_reply_is_a_protocol_error():
    """Replies nobody asked for mean the conversation is out of step."""
    session = ready_session()
    (event,) = session.receive(OK)
    assert isinstance(event, SessionFailed) and event.reply.enhanced == "4.5.0"


def test_unknown_tls_level_is_refused():
    """A typo in the TLS level is a programming error, caught at construction."""
    with pytest.raises(ValueError):
        ClientSession("relay.test", "sometimes")


# -- STARTTLS --------------------------------------------------------------------------------


def test_starttls_is_issued_when_offered_and_ehlo_repeated_after_handshake():
    """level "may": STARTTLS, 220 → StartTLS, then EHLO again over TLS (RFC 3207 §4.2)."""
    session = ClientSession("relay.test", "may")
    session.receive(GREETING)
    session.data_to_send()
    assert session.receive(EHLO_FULL) == []
    assert session.data_to_send() == b"STARTTLS\r\n"
    assert session.receive(b"220 2.0.0 Ready to start TLS\r\n") == [StartTLS()]
    assert session.data_to_send() == b""
    assert session.tls_established() == []
    assert session.data_to_send() == b"EHLO relay.test\r\n"
    assert session.capabilities == Capabilities()
    (event,) = session.receive(b"250-mx.example.test\r\n250 PIPELINING\r\n")
    assert event == Ready(Capabilities(True, {"PIPELINING": ""}), tls=True)


def test_starttls_refused_at_level_may_carries_on_in_plaintext():
    """Opportunistic TLS: a refusal means plaintext, not failure."""
    session = ClientSession("relay.test", "may")
    session.receive(GREETING)
    session.receive(EHLO_FULL)
    session.data_to_send()
    (event,) = session.receive(b"454 4.7.0 TLS not available\r\n")
    assert isinstance(event, Ready) and not event.tls


def test_starttls_refused_at_level_encrypt_fails_with_4_7_4():
    """Mandatory TLS: a refused STARTTLS fails the session (deferred), and QUIT is sent."""
    session = ClientSession("relay.test", "encrypt")
    session.receive(GREETING)
    session.receive(EHLO_FULL)
    session.data_to_send()
    (event,) = session.receive(b"454 4.7.0 TLS not available\r\n")
    assert isinstance(event, SessionFailed)
    assert (event.reply.code, event.reply.enhanced) == (450, "4.7.4")
    assert "454 4.7.0 TLS not available" in event.reply.text
    assert session.data_to_send() == b"QUIT\r\n"


@pytest.mark.parametrize("level", ["encrypt", "verify"])
def test_tls_required_but_not_offered_fails_the_session(level):
    """Mandatory TLS with a host that does not offer STARTTLS: 4.7.4, QUIT."""
    session = ClientSession("relay.test", level)
    session.receive(GREETING)
    assert session.receive(EHLO_PLAIN) == [SessionFailed(replies.TLS_REQUIRED_NOT_OFFERED)]
    assert session.data_to_send().endswith(b"QUIT\r\n")


def test_tls_level_none_never_issues_starttls():
    """Level "none" ignores an offered STARTTLS."""
    session = ready_session(EHLO_FULL, "none")
    assert session.capabilities.starttls and not session.tls


def test_starttls_response_injection_fails_the_session():
    """CVE-2011-0411: replies sent with the 220 before the handshake are never trusted."""
    session = ClientSession("relay.test", "may")
    session.receive(GREETING)
    session.receive(EHLO_FULL)
    session.data_to_send()
    events = session.receive(b"220 go ahead\r\n250-injected\r\n")
    assert events == [SessionFailed(replies.STARTTLS_INJECTION)]  # and no StartTLS
    assert session.stage is Stage.CLOSED


def test_tls_established_outside_the_handshake_is_a_state_error():
    """Calling the adapter API out of order is reported, not silently ignored."""
    with pytest.raises(SessionStateError):
        ready_session().tls_established()


# -- transactions with PIPELINING ------------------------------------------------------------


def test_pipelined_transaction_sends_mail_rcpts_and_data_in_one_batch():
    """RFC 2920: MAIL, every RCPT and DATA leave in one write, with SIZE declared."""
    session = ready_session()
    assert session.begin("s@example.org", RECIPIENTS, 1234) == []
    assert session.data_to_send() == (
        b"MAIL FROM:<s@example.org> SIZE=1234\r\n"
        b"RCPT TO:<a@example.test>\r\nRCPT TO:<b@example.test>\r\n"
        b"RCPT TO:<c@example.test>\r\nDATA\r\n"
    )
    assert session.receive(OK * 4 + GO_AHEAD) == [SendContent()]
    assert session.encode_content(b"Subject: hi\r\n\r\n.dot\r\n") == (
        b"Subject: hi\r\n\r\n..dot\r\n"
    )
    assert session.end_content() == []
    assert session.data_to_send() == b".\r\n"
    assert session.awaiting == "end of data"
    events = session.receive(b"250 2.0.0 Ok: queued as 123\r\n")
    final = Reply(250, "2.0.0", "Ok: queued as 123")
    assert events == [
        TransactionComplete(
            result=type(events[0].result)(tuple(RecipientResult(a, final) for a, _ in RECIPIENTS))
        )
    ]
    assert len(events[0].result.accepted) == 3
    assert session.stage is Stage.DONE and session.transaction_count == 1


def test_pipelined_partial_recipient_failure_keeps_each_reply():
    """A 5xx and a 4xx RCPT decide those recipients; the rest get the final reply."""
    session = ready_session()
    session.begin("s@example.org", RECIPIENTS, 10)
    session.data_to_send()
    assert session.receive(OK + OK + NO_USER + MAILBOX_BUSY + GO_AHEAD) == [SendContent()]
    session.end_content()
    events = session.receive(OK)
    assert results(events) == [
        ("a@example.test", 250),
        ("b@example.test", 550),
        ("c@example.test", 450),
    ]


def test_pipelined_all_recipients_rejected_and_data_refused_sends_no_content():
    """Every RCPT failed and the host answers DATA 554: the transaction ends, nothing sent."""
    session = ready_session()
    session.begin("s@example.org", RECIPIENTS[:2], 10)
    session.data_to_send()
    events = session.receive(OK + NO_USER + NO_USER + b"554 5.5.1 No valid recipients\r\n")
    assert results(events) == [("a@example.test", 550), ("b@example.test", 550)]
    assert session.data_to_send() == b"" and session.stage is Stage.DONE


def test_pipelined_all_recipients_rejected_but_data_accepted_sends_a_lone_dot():
    """RFC 2920 §3.1: a 354 after no accepted RCPT gets an empty message, never content."""
    session = ready_session()
    session.begin("s@example.org", RECIPIENTS[:1], 10)
    session.data_to_send()
    assert session.receive(OK + NO_USER + GO_AHEAD) == []
    assert session.data_to_send() == b".\r\n"
    events = session.receive(b"554 5.5.1 no recipients\r\n")
    assert results(events) == [("a@example.test", 550)]


def test_pipelined_mail_rejected_decides_every_recipient():
    """A refused MAIL FROM is the reply for all, whatever the pipelined RCPTs got."""
    session = ready_session()
    session.begin("s@example.org", RECIPIENTS[:2], 10)
    session.data_to_send()
    rejected = b"553 5.7.1 Sender rejected\r\n"
    need_mail = b"503 5.5.1 need MAIL\r\n"
    events = session.receive(rejected + need_mail * 3)
    assert results(events) == [("a@example.test", 553), ("b@example.test", 553)]


@pytest.mark.parametrize("data_reply", [b"451 4.3.0 later\r\n", b"554 5.6.0 no\r\n"])
def test_data_rejected_decides_the_accepted_recipients(data_reply):
    """A refused DATA applies to accepted recipients; rejected ones keep their RCPT reply."""
    session = ready_session()
    session.begin("s@example.org", RECIPIENTS[:2], 10)
    session.data_to_send()
    events = session.receive(OK + OK + NO_USER + data_reply)
    code = int(data_reply[:3])
    assert results(events) == [("a@example.test", code), ("b@example.test", 550)]


@pytest.mark.parametrize("final", [b"452 4.3.1 full\r\n", b"554 5.7.1 spam\r\n"])
def test_final_reply_applies_to_every_accepted_recipient(final):
    """The reply to the content decides all recipients that RCPT accepted."""
    session = ready_session()
    session.begin("s@example.org", RECIPIENTS, 10)
    session.receive(OK + OK + NO_USER + OK + GO_AHEAD)
    session.end_content()
    events = session.receive(final)
    code = int(final[:3])
    assert results(events) == [
        ("a@example.test", code),
        ("b@example.test", 550),
        ("c@example.test", code),
    ]


@pytest.mark.parametrize("data_reply", [b"250 2.0.0 ok whatever\r\n", b"334 go on\r\n"])
def test_a_success_to_data_other_than_354_delivers_nothing(data_reply):
    """RFC 5321 §4.3.2: only 354 lets the content go. A 250 to DATA is not a delivery (no
    content was sent): the accepted recipients are deferred and the connection dropped."""
    session = ready_session()
    session.begin("s@example.org", RECIPIENTS[:2], 10)
    session.data_to_send()
    events = session.receive(OK + OK + NO_USER + data_reply)
    assert results(events) == [("a@example.test", 451), ("b@example.test", 550)]
    (complete,) = [e for e in events if isinstance(e, TransactionComplete)]
    assert complete.result.recipients[0].reply.text.endswith(data_reply.decode().strip())
    assert isinstance(events[-1], SessionFailed) and session.stage is Stage.CLOSED
    assert not any(isinstance(e, SendContent) for e in events)


@pytest.mark.parametrize("final", [b"354 more please\r\n", b"334 what\r\n"])
@pytest.mark.parametrize("chunked", [False, True], ids=["DATA", "BDAT"])
def test_a_3xx_to_the_end_of_the_message_is_no_delivery(final, chunked):
    """Only 2xx after the content delivers: a 3xx defers, and the connection is dropped."""
    if chunked:
        session = ready_session(EHLO_CHUNKING)
        session.begin("s@example.org", RECIPIENTS[:1], len(MESSAGE), chunk=MESSAGE)
        session.data_to_send()
        events = session.receive(OK + OK + final)
    else:
        session = ready_session()
        session.begin("s@example.org", RECIPIENTS[:1], 10)
        session.receive(OK + OK + GO_AHEAD)
        session.end_content()
        events = session.receive(final)
    assert results(events) == [("a@example.test", 451)]
    assert isinstance(events[-1], SessionFailed) and session.stage is Stage.CLOSED


def test_a_552_to_rcpt_is_taken_as_452():
    """RFC 5321 §4.5.3.1.10: the recipient is deferred, not bounced."""
    session = ready_session()
    session.begin("s@example.org", RECIPIENTS[:2], 10)
    session.data_to_send()
    events = session.receive(OK + b"552 5.2.2 mailbox full\r\n" + OK + GO_AHEAD)
    session.end_content()
    events += session.receive(OK)
    (complete,) = [e for e in events if isinstance(e, TransactionComplete)]
    first, second = complete.result.recipients
    assert (first.reply.code, first.reply.enhanced, first.reply.text) == (
        452,
        "4.2.2",
        "mailbox full",
    )
    assert second.reply.code == 250


# -- transactions without PIPELINING ---------------------------------------------------------


def test_without_pipelining_commands_go_one_per_reply():
    """Each command waits for the previous reply; DATA follows the last RCPT."""
    session = ready_session(EHLO_PLAIN)
    session.begin("s@example.org", RECIPIENTS[:2], 10)
    assert session.data_to_send() == b"MAIL FROM:<s@example.org>\r\n"
    assert session.receive(OK) == []
    assert session.data_to_send() == b"RCPT TO:<a@example.test>\r\n"
    assert session.awaiting == "RCPT TO"
    assert session.receive(NO_USER) == []
    assert session.data_to_send() == b"RCPT TO:<b@example.test>\r\n"
    assert session.receive(OK) == []
    assert session.data_to_send() == b"DATA\r\n"
    assert session.receive(GO_AHEAD) == [SendContent()]
    assert session.encode_content(b"x") == b"x"
    session.end_content()
    assert session.data_to_send() == b"\r\n.\r\n"
    assert results(session.receive(OK)) == [("a@example.test", 550), ("b@example.test", 250)]


def test_without_pipelining_rejected_mail_sends_no_rcpt():
    """MAIL refused: the transaction ends at once with that reply for everyone."""
    session = ready_session(EHLO_PLAIN)
    session.begin("s@example.org", RECIPIENTS[:2], 10)
    session.data_to_send()
    events = session.receive(b"451 4.3.0 try later\r\n")
    assert results(events) == [("a@example.test", 451), ("b@example.test", 451)]
    assert session.data_to_send() == b""


def test_without_pipelining_no_accepted_recipient_means_no_data():
    """All RCPT refused: DATA is never sent."""
    session = ready_session(EHLO_PLAIN)
    session.begin("s@example.org", RECIPIENTS[:1], 10)
    session.receive(OK)
    session.data_to_send()
    events = session.receive(NO_USER)
    assert results(events) == [("a@example.test", 550)]
    assert session.data_to_send() == b""


# -- parameters and negotiation --------------------------------------------------------------


def test_message_bigger_than_host_size_limit_fails_all_with_5_3_4_unsent():
    """SIZE limit exceeded: every recipient gets 552 5.3.4 and nothing is written."""
    session = ready_session()
    (event,) = session.begin("s@example.org", RECIPIENTS[:2], 10001)
    assert isinstance(event, TransactionComplete) and not event.result.sent
    assert {(r.reply.code, r.reply.enhanced) for r in event.result.recipients} == {(552, "5.3.4")}
    assert session.data_to_send() == b"" and session.stage is Stage.READY


def test_no_size_declared_when_host_does_not_offer_size():
    """SIZE= is only declared to a host that offers SIZE (RFC 1870)."""
    session = ready_session(EHLO_PLAIN)
    session.begin("", RECIPIENTS[:1], 99999999)
    assert session.data_to_send() == b"MAIL FROM:<>\r\n"


def test_8bit_body_declared_only_when_offered():
    """BODY=8BITMIME goes to hosts that offer 8BITMIME (RFC 6152), and only for 8-bit mail."""
    session = ready_session()
    session.begin("s@example.org", RECIPIENTS[:1], 5, body_8bit=True)
    assert session.data_to_send().startswith(b"MAIL FROM:<s@example.org> SIZE=5 BODY=8BITMIME\r\n")
    plain = ready_session(EHLO_PLAIN)
    plain.begin("s@example.org", RECIPIENTS[:1], 5, body_8bit=True)
    assert plain.data_to_send() == b"MAIL FROM:<s@example.org>\r\n"


def test_smtputf8_declared_when_needed_and_offered():
    """Non-ASCII addresses imply SMTPUTF8, which is declared and sent as UTF-8."""
    session = ready_session()
    session.begin("josé@example.org", [("zoë@example.test", {})], 5)
    assert (
        session.data_to_send()
        == (
            "MAIL FROM:<josé@example.org> SIZE=5 SMTPUTF8\r\nRCPT TO:<zoë@example.test>\r\nDATA\r\n"
        ).encode()
    )


@pytest.mark.parametrize(
    ("sender", "recipient", "flag"),
    [("s@example.org", "a@example.test", True), ("josé@example.org", "a@example.test", False)],
)
def test_smtputf8_needed_but_not_offered_bounces_all_with_5_6_7(sender, recipient, flag):
    """RFC 6531 §3.4: a message needing SMTPUTF8 cannot go to a host without it."""
    session = ready_session(EHLO_PLAIN)
    (event,) = session.begin(sender, [(recipient, {})], 5, smtputf8=flag)
    assert event.result.recipients == (RecipientResult(recipient, replies.SMTPUTF8_NOT_OFFERED),)
    assert session.data_to_send() == b""


def test_dsn_parameters_passed_on_only_to_hosts_offering_dsn():
    """RFC 3461 RET/ENVID/NOTIFY/ORCPT are relayed to a DSN host and dropped otherwise."""
    rcpt = [("a@example.test", {"NOTIFY": "FAILURE", "ORCPT": "rfc822;a@example.test", "X": "1"})]
    params = {"RET": "HDRS", "ENVID": "abc", "BODY": "8BITMIME"}
    session = ready_session()
    session.begin("s@example.org", rcpt, 5, mail_params=params)
    assert session.data_to_send() == (
        b"MAIL FROM:<s@example.org> SIZE=5 RET=HDRS ENVID=abc\r\n"
        b"RCPT TO:<a@example.test> NOTIFY=FAILURE ORCPT=rfc822;a@example.test\r\nDATA\r\n"
    )
    plain = ready_session(EHLO_PLAIN)
    plain.begin("s@example.org", rcpt, 5, mail_params=params)
    assert plain.data_to_send() == b"MAIL FROM:<s@example.org>\r\n"


def test_begin_needs_a_ready_session_and_recipients():
    """Starting a transaction mid-transaction, or with no recipients, is refused."""
    session = ready_session()
    with pytest.raises(ValueError):
        session.begin("s@example.org", [], 1)
    session.begin("s@example.org", RECIPIENTS[:1], 1)
    with pytest.raises(SessionStateError):
        session.begin("s@example.org", RECIPIENTS[:1], 1)
    with pytest.raises(SessionStateError):
        ClientSession("relay.test").begin("s@example.org", RECIPIENTS[:1], 1)


# -- CHUNKING (RFC 3030) ---------------------------------------------------------------------

EHLO_CHUNKING = b"250-mx.example.test\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 8BITMIME\r\n"
MESSAGE = b"Subject: x\r\n\r\n.leading dot stays as it is\r\n"


def test_chunking_host_gets_the_message_as_bdat_in_the_command_write() -> None:
    """MAIL, RCPTs and BDAT <size> LAST with the raw message in one write; its 250 decides."""
    session = ready_session(EHLO_CHUNKING)
    assert session.begin("s@example.org", RECIPIENTS[:2], len(MESSAGE), chunk=MESSAGE) == []
    assert session.data_to_send() == (
        b"MAIL FROM:<s@example.org>\r\nRCPT TO:<a@example.test>\r\n"
        b"RCPT TO:<b@example.test>\r\nBDAT %d LAST\r\n" % len(MESSAGE) + MESSAGE
    )
    assert session.awaiting == "MAIL FROM"
    events = session.receive(OK + OK + NO_USER + b"250 2.0.0 queued as X\r\n")
    assert not any(isinstance(e, SendContent) for e in events)
    assert results(events) == [("a@example.test", 250), ("b@example.test", 550)]
    (ready,) = session.reset()
    assert isinstance(ready, Ready)
    assert session.data_to_send() == b""


def test_a_refused_bdat_decides_the_accepted_recipients_and_reuse_starts_with_rset() -> None:
    """Every RCPT refused: the host refuses the BDAT (RFC 3030 §2); RSET leads the next."""
    session = ready_session(EHLO_CHUNKING)
    session.begin("s@example.org", RECIPIENTS[:1], len(MESSAGE), chunk=MESSAGE)
    session.data_to_send()
    events = session.receive(OK + NO_USER + b"554 5.5.1 No valid recipients\r\n")
    assert results(events) == [("a@example.test", 550)]
    (ready,) = session.reset()
    assert isinstance(ready, Ready)
    session.begin("s@example.org", RECIPIENTS[1:2], len(MESSAGE), chunk=MESSAGE)
    assert session.data_to_send().startswith(b"RSET\r\nMAIL FROM:")


def test_a_tempfailed_bdat_defers_the_accepted_recipients() -> None:
    """A 451 to the BDAT is every accepted recipient's reply."""
    session = ready_session(EHLO_CHUNKING)
    session.begin("s@example.org", RECIPIENTS[:2], len(MESSAGE), chunk=MESSAGE)
    session.data_to_send()
    events = session.receive(OK + OK + OK + b"451 4.3.0 try later\r\n")
    assert results(events) == [("a@example.test", 451), ("b@example.test", 451)]


def test_without_chunking_or_pipelining_the_chunk_is_ignored_and_data_is_used() -> None:
    """A host without CHUNKING (or without PIPELINING) gets DATA and a dot-stuffed body."""
    for ehlo in (EHLO_FULL, b"250-mx.example.test\r\n250 CHUNKING\r\n"):
        session = ready_session(ehlo)
        session.begin("s@example.org", RECIPIENTS[:1], len(MESSAGE), chunk=MESSAGE)
        sent = session.data_to_send()
        assert b"BDAT" not in sent
        assert sent.endswith(b"DATA\r\n") or sent == b"MAIL FROM:<s@example.org>\r\n"


# -- reuse, QUIT, failures in flight ---------------------------------------------------------


def deliver_one(session: ClientSession, recipients=RECIPIENTS[:1]) -> list:
    session.begin("s@example.org", recipients, 10)
    session.data_to_send()
    session.receive(OK * (len(recipients) + 1) + GO_AHEAD)
    session.encode_content(b"body\r\n")
    session.end_content()
    session.data_to_send()
    return session.receive(OK)


def test_with_pipelining_rset_goes_in_front_of_the_next_mail():
    """Reuse costs no round trip: Ready at once, RSET pipelined before the next MAIL."""
    session = ready_session()
    assert results(deliver_one(session)) == [("a@example.test", 250)]
    (event,) = session.reset()
    assert isinstance(event, Ready)
    assert session.data_to_send() == b""
    session.begin("s@example.org", RECIPIENTS[1:2], 10)
    assert session.data_to_send() == (
        b"RSET\r\nMAIL FROM:<s@example.org> SIZE=10\r\nRCPT TO:<b@example.test>\r\nDATA\r\n"
    )
    assert session.receive(OK + OK + OK + GO_AHEAD) == [SendContent()]
    session.encode_content(b"body\r\n")
    session.end_content()
    session.data_to_send()
    assert results(session.receive(OK)) == [("b@example.test", 250)]
    assert session.transaction_count == 2


def test_a_refused_pipelined_rset_defers_the_transaction_behind_it():
    """RSET refused in front of MAIL: its recipients are deferred (451), the session fails
    and is closed without QUIT (the host may have taken the pipelined DATA)."""
    session = ready_session()
    deliver_one(session)
    session.reset()
    session.begin("s@example.org", RECIPIENTS[:2], 10)
    session.data_to_send()
    events = session.receive(b"500 5.5.1 what\r\n" + OK + OK + OK + GO_AHEAD)
    assert results(events) == [("a@example.test", 451), ("b@example.test", 451)]
    assert isinstance(events[-1], SessionFailed)
    assert "refused RSET" in events[-1].reply.text
    assert session.data_to_send() == b""
    assert session.stage is Stage.CLOSED


def test_without_pipelining_rset_is_sent_at_once_and_ready_follows_its_250():
    """A host without PIPELINING: RSET → 250 → Ready, then the next transaction."""
    session = ready_session(EHLO_PLAIN)
    session.begin("s@example.org", RECIPIENTS[:1], 10)
    session.data_to_send()
    session.receive(OK)
    session.data_to_send()
    assert results(session.receive(NO_USER)) == [("a@example.test", 550)]
    assert session.reset() == []
    assert session.data_to_send() == b"RSET\r\n"
    (event,) = session.receive(OK)
    assert isinstance(event, Ready)
    session.begin("s@example.org", RECIPIENTS[1:2], 10)
    assert session.data_to_send() == b"MAIL FROM:<s@example.org>\r\n"


def test_rset_refused_fails_the_session():
    """A host that refuses RSET cannot be reused: the session fails and quits."""
    session = ready_session(EHLO_PLAIN)
    session.begin("s@example.org", RECIPIENTS[:1], 10)
    session.data_to_send()
    session.receive(b"550 5.7.1 no\r\n")
    session.reset()
    assert session.data_to_send() == b"RSET\r\n"
    assert session.receive(b"500 what\r\n") == [SessionFailed(Reply(500, None, "what"))]
    assert session.data_to_send() == b"QUIT\r\n"


def test_quit_closes_after_the_host_answers():
    """QUIT → 221 → Closed."""
    session = ready_session()
    deliver_one(session)
    session.quit()
    assert session.data_to_send() == b"QUIT\r\n"
    assert session.receive(b"221 2.0.0 Bye\r\n") == [Closed()]
    assert session.receive(OK) == []


def test_421_mid_transaction_completes_unresolved_recipients_with_it():
    """A 421 after some RCPTs: decided recipients keep their reply, the rest get the 421."""
    session = ready_session()
    session.begin("s@example.org", RECIPIENTS, 10)
    session.data_to_send()
    events = session.receive(OK + NO_USER + b"421 4.3.2 shutting down\r\n" + OK)
    assert results(events) == [
        ("a@example.test", 550),
        ("b@example.test", 421),
        ("c@example.test", 421),
    ]
    assert events[-1] == SessionFailed(Reply(421, "4.3.2", "shutting down"))
    assert session.data_to_send() == b"" and session.stage is Stage.CLOSED


@pytest.mark.parametrize("stage", ["rcpt", "content", "end of data"])
def test_abort_completes_the_transaction_with_the_given_reply(stage):
    """Connection lost at any stage: every undecided recipient gets CONNECTION_LOST."""
    session = ready_session()
    session.begin("s@example.org", RECIPIENTS[:2], 10)
    session.data_to_send()
    if stage == "rcpt":
        session.receive(OK + NO_USER)
    else:
        session.receive(OK + NO_USER + OK + GO_AHEAD)
        if stage == "end of data":
            session.end_content()
    events = session.abort(replies.CONNECTION_LOST)
    assert results(events) == [("a@example.test", 550), ("b@example.test", 421)]
    assert session.stage is Stage.CLOSED and session.data_to_send() == b""


def test_abort_when_idle_reports_nothing():
    """With no transaction in flight, aborting only closes the session."""
    session = ready_session()
    assert session.abort(replies.CONVERSATION_TIMED_OUT) == []
    assert session.receive(OK) == []


def test_content_methods_refused_outside_content_stage():
    """encode_content/end_content are only valid after SendContent."""
    session = ready_session()
    with pytest.raises(SessionStateError):
        session.encode_content(b"x")
    with pytest.raises(SessionStateError):
        session.end_content()


def conversation(chunk_size: int) -> tuple[list, bytes]:
    """Run a whole pipelined conversation, feeding the host's bytes in chunks."""
    session = ClientSession("relay.test")
    events: list = []
    sent = []

    def feed(raw: bytes) -> None:
        for i in range(0, len(raw), chunk_size):
            events.extend(session.receive(raw[i : i + chunk_size]))
        sent.append(session.data_to_send())

    feed(b"220-mx.example.test hello\r\n220 more\r\n")
    feed(EHLO_FULL)
    session.begin("s@example.org", RECIPIENTS, 10)
    sent.append(session.data_to_send())
    feed(OK + OK + NO_USER + b"451-4.3.0 busy\r\n451 4.3.0 now\r\n" + GO_AHEAD)
    sent.append(session.encode_content(b"hello\r\n"))
    session.end_content()
    sent.append(session.data_to_send())
    feed(OK)
    events.extend(session.reset())
    session.quit()
    sent.append(session.data_to_send())
    feed(b"221 bye\r\n")
    return events, b"".join(sent)


def test_conversation_is_chunk_size_invariant():
    """The host's bytes in chunks from 1 byte to all at once give the same events and output."""
    reference = conversation(10_000)
    assert [type(e) for e in reference[0]] == [
        Ready,
        SendContent,
        TransactionComplete,
        Ready,
        Closed,
    ]
    assert results(reference[0]) == [
        ("a@example.test", 250),
        ("b@example.test", 550),
        ("c@example.test", 451),
    ]
    for chunk_size in range(1, 80):
        assert conversation(chunk_size) == reference


# -- content encoding ------------------------------------------------------------------------


def reference_encoding(content: bytes) -> bytes:
    """Line-by-line encoding: the obviously-correct (slow) version of ContentEncoder."""
    normalised = re.sub(rb"\r\n|\r|\n", b"\r\n", content)
    lines = normalised.split(b"\r\n")
    stuffed = b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)
    if stuffed and not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed + b".\r\n"


def decode_data(encoded: bytes) -> bytes:
    """What a receiving server stores: the terminator removed and leading dots unstuffed."""
    assert encoded.endswith(b"\r\n.\r\n") or encoded == b".\r\n"
    body = encoded[:-3]
    lines = body.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


@pytest.mark.parametrize(
    ("content", "encoded"),
    [
        (b"", b".\r\n"),
        (b"a\r\n", b"a\r\n.\r\n"),
        (b"a", b"a\r\n.\r\n"),
        (b".\r\n", b"..\r\n.\r\n"),
        (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
        (b"a\n.b\n", b"a\r\n..b\r\n.\r\n"),
        (b"a\r.b\r", b"a\r\n..b\r\n.\r\n"),
        (b"..x\r\n", b"...x\r\n.\r\n"),
    ],
)
def test_encode_content_stuffs_dots_and_normalises_line_endings(content, encoded):
    """RFC 5321 §4.5.2 dot-stuffing, CRLF everywhere, one terminator."""
    assert encode_content(content) == encoded == reference_encoding(content)


SAMPLE = b"From: a\r\n\r\n.first\r\nline\r\n..two\r\n.\r\nlast\n.\r\r\n.end"


def test_content_split_at_every_position_encodes_the_same():
    """Two chunks split at every byte position give the one-shot encoding."""
    expected = encode_content(SAMPLE)
    for cut in range(len(SAMPLE) + 1):
        encoder = ContentEncoder()
        got = encoder.encode(SAMPLE[:cut]) + encoder.encode(SAMPLE[cut:]) + encoder.finish()
        assert got == expected, cut


def test_content_fed_one_byte_at_a_time_encodes_the_same():
    """Chunks down to single bytes give the one-shot encoding."""
    encoder = ContentEncoder()
    got = b"".join(encoder.encode(SAMPLE[i : i + 1]) for i in range(len(SAMPLE)))
    assert got + encoder.finish() == encode_content(SAMPLE)


def test_dot_line_starting_exactly_at_16k_chunk_boundary_is_stuffed():
    """The Twisted SMTPClient bug: a "." opening the second 16 KiB chunk must be stuffed."""
    first = b"x" * (16384 - 2) + b"\r\n"
    second = b".\r\nstill the message\r\n"
    assert len(first) == 16384
    encoder = ContentEncoder()
    encoded = encoder.encode(first) + encoder.encode(second) + encoder.finish()
    assert encoded == first + b"..\r\nstill the message\r\n.\r\n"
    assert decode_data(encoded) == first + second


@settings(max_examples=300)
@given(
    st.binary(max_size=200).map(lambda b: b.replace(b"a", b".").replace(b"b", b"\r")),
    st.lists(st.integers(min_value=0, max_value=200), max_size=6),
)
def test_content_encoding_matches_reference_for_any_chunking(content, cuts):
    """Any content cut anywhere encodes like the line-by-line reference, and decodes back."""
    points = sorted({min(c, len(content)) for c in cuts})
    encoder = ContentEncoder()
    out = b""
    start = 0
    for point in [*points, len(content)]:
        out += encoder.encode(content[start:point])
        start = point
    out += encoder.finish()
    assert out == reference_encoding(content)
    normalised = re.sub(rb"\r\n|\r|\n", b"\r\n", content)
    ends_line = normalised.endswith(b"\r\n") or not normalised
    assert decode_data(out) == normalised + (b"" if ends_line else b"\r\n")
