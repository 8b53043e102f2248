"""bounce: the RFC 3464 DSN, parsed back with the stdlib email package field by field."""

from __future__ import annotations

import email
import email.policy
from email.message import Message

import pytest

from twistedrelay.bounce import FailedRecipient, build_dsn, extract_headers, should_bounce
from twistedrelay.delivery.outcome import classify_dns_failure, classify_reply
from twistedrelay.queue.entry import Envelope, Recipient
from twistedrelay.resolver import NoSuchDomain
from twistedrelay.smtp.replies import Reply

ARRIVAL = 1_700_000_000.0
NOW = ARRIVAL + 3600
ORIGINAL = b"From: Alice <alice@example.org>\r\nSubject: Hello\r\nMessage-ID: <m1@example.org>\r\n"
USER_UNKNOWN = Reply(550, "5.1.1", "<bob@example.com>: Recipient address rejected")


def envelope(**changes) -> Envelope:
    fields = {
        "queue_id": "4FQ7abc",
        "sender": "alice@example.org",
        "recipients": (Recipient("bob@example.com"), Recipient("carol@example.net")),
        "arrival_time": ARRIVAL,
    }
    fields.update(changes)
    return Envelope(**fields)


def bob_failed() -> FailedRecipient:
    return FailedRecipient.from_outcome(
        Recipient("bob@example.com", {"ORCPT": "rfc822;Bob+2BTag@example.com"}),
        classify_reply(USER_UNKNOWN),
        remote_mta="mx1.example.com",
    )


def carol_failed() -> FailedRecipient:
    return FailedRecipient.from_outcome(
        Recipient("carol@example.net"), classify_dns_failure(NoSuchDomain("example.net"))
    )


def parse(raw: bytes) -> Message:
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def build(env: Envelope | None = None, failed=None) -> bytes:
    return build_dsn(
        env or envelope(),
        failed or [bob_failed(), carol_failed()],
        ORIGINAL,
        "relay.example.test",
        NOW,
    )


def test_dsn_top_level_headers():
    """From MAILER-DAEMON, To the sender, the Postfix subject, Auto-Submitted, Date, Message-ID."""
    dsn = parse(build())
    assert dsn["From"] == "MAILER-DAEMON@relay.example.test (Mail Delivery System)"
    assert dsn["To"] == "<alice@example.org>"
    assert dsn["Subject"] == "Undelivered Mail Returned to Sender"
    assert dsn["Auto-Submitted"] == "auto-replied"
    assert email.utils.parsedate_to_datetime(dsn["Date"]).timestamp() == NOW
    assert dsn["Message-ID"].startswith("<") and dsn["Message-ID"].endswith("@relay.example.test>")
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"


def test_dsn_has_three_parts_in_rfc_order():
    """Human text, delivery status, original headers (RFC 6522 §3)."""
    parts = parse(build()).get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]


def test_human_part_names_each_failed_recipient_and_why():
    """The explanation lists every failed recipient with its diagnostic."""
    text = parse(build()).get_payload()[0].get_payload()
    assert "This is the mail system at host relay.example.test." in text
    assert "<bob@example.com>: host mx1.example.com said: 550 5.1.1" in text
    assert "<carol@example.net>:" in text and "example.net" in text


def test_per_message_fields():
    """Reporting-MTA, X-Queue-ID and Arrival-Date come first in the delivery status."""
    status = parse(build()).get_payload()[1].get_payload()
    per_message = status[0]
    assert per_message["Reporting-MTA"] == "dns; relay.example.test"
    assert per_message["X-Queue-ID"] == "4FQ7abc"
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == ARRIVAL
    assert per_message["Original-Envelope-Id"] is None


def test_per_recipient_fields_for_a_rejected_recipient():
    """Every RFC 3464 §2.3 field of a recipient refused by the mail host, ORCPT xtext-decoded."""
    bob = parse(build()).get_payload()[1].get_payload()[1]
    assert bob["Final-Recipient"] == "rfc822; bob@example.com"
    assert bob["Original-Recipient"] == "rfc822; Bob+Tag@example.com"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx1.example.com"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@example.com>: Recipient address rejected"
    assert email.utils.parsedate_to_datetime(bob["Last-Attempt-Date"]).timestamp() == NOW


def test_per_recipient_fields_for_a_dns_failure():
    """Without a reply there is no Remote-MTA and the diagnostic is not an smtp one."""
    carol = parse(build()).get_payload()[1].get_payload()[2]
    assert carol["Final-Recipient"] == "rfc822; carol@example.net"
    assert carol["Original-Recipient"] is None
    assert carol["Status"] == "5.1.2"
    assert carol["Remote-MTA"] is None
    assert carol["Diagnostic-Code"].startswith("X-twistedrelay; Host or domain name not found")


def test_original_headers_are_returned():
    """The third part carries the original header section, and only it."""
    headers = parse(build()).get_payload()[2]
    assert headers.get_payload() == ORIGINAL.decode()


def test_envid_is_reported_as_original_envelope_id():
    """RFC 3464 §2.2.1: the sender's ENVID comes back, xtext-decoded."""
    dsn = build(envelope(mail_params={"ENVID": "QQ+2B123"}))
    per_message = parse(dsn).get_payload()[1].get_payload()[0]
    assert per_message["Original-Envelope-Id"] == "QQ+123"


def test_dsn_uses_crlf_line_endings_only():
    """Every line ends in CRLF: no bare LF or CR."""
    raw = build()
    assert raw.count(b"\n") == raw.count(b"\r\n") == raw.count(b"\r")


def test_host_supplied_text_cannot_inject_header_lines():
    """CR/LF inside a reply's text become spaces: no forged fields in the report."""
    evil = Reply(550, "5.1.1", "nope\r\nAction: delivered\nStatus: 2.0.0")
    failed = [FailedRecipient(Recipient("bob@example.com"), "5.1.1", "x", evil, "mx.example")]
    bob = parse(build(failed=failed)).get_payload()[1].get_payload()[1]
    assert bob["Action"] == "failed" and bob["Status"] == "5.1.1"
    assert bob.get_all("Action") == ["failed"]


def test_smtputf8_message_gets_global_types():
    """RFC 6533: an internationalised message gets message/global-delivery-status."""
    env = envelope(sender="josé@example.org", smtputf8=True)
    failed = [FailedRecipient(Recipient("zoë@example.com"), "5.1.1", "unknown", USER_UNKNOWN)]
    raw = build(env, failed)
    dsn = email.message_from_bytes(raw, policy=email.policy.SMTPUTF8)
    types = [p.get_content_type() for p in dsn.iter_parts()]
    assert types == ["text/plain", "message/global-delivery-status", "message/global-headers"]
    assert "Final-Recipient: utf-8; zoë@example.com" in raw.decode()


def test_never_bounce_a_bounce():
    """A message with the null sender gets no DSN (RFC 5321 §4.5.5)."""
    assert should_bounce(envelope())
    assert not should_bounce(envelope(sender=""))
    with pytest.raises(ValueError):
        build(envelope(sender=""))


def test_dsn_needs_a_failed_recipient():
    """An empty report is a caller bug."""
    with pytest.raises(ValueError):
        build_dsn(envelope(), [], ORIGINAL, "relay.example.test", NOW)


@pytest.mark.parametrize(
    ("content", "headers"),
    [
        (b"A: 1\r\nB: 2\r\n\r\nbody\r\n", b"A: 1\r\nB: 2\r\n"),
        (b"A: 1\n\nbody", b"A: 1\n"),
        (b"A: 1\r\n", b"A: 1\r\n"),
    ],
)
def test_extract_headers_stops_at_the_first_empty_line(content, headers):
    """The header section ends at the first empty line (RFC 5322 §2.1)."""
    assert extract_headers(content) == headers
