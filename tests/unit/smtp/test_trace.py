"""The Received header: RFC 5321 §4.4 fields and RFC 3848 protocol names."""

import email

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twistedrelay.smtp.trace import build_received_header, printable, protocol_name


@pytest.mark.parametrize(
    ("extended", "tls", "authenticated", "smtputf8", "name"),
    [
        (False, False, False, False, "SMTP"),
        (True, False, False, False, "ESMTP"),
        (True, True, False, False, "ESMTPS"),
        (True, False, True, False, "ESMTPA"),
        (True, True, True, False, "ESMTPSA"),
        (True, True, True, True, "UTF8SMTPSA"),
    ],
)
def test_protocol_names(extended: bool, tls: bool, authenticated: bool, smtputf8: bool, name: str):
    """RFC 3848 and RFC 6531 name the protocol by TLS and AUTH."""
    assert protocol_name(extended, tls, authenticated, smtputf8) == name


def test_header_names_client_relay_queue_id_tls_and_single_recipient():
    """The header parses as one field and carries every trace item."""
    raw = build_received_header(
        helo="client.example",
        client_address="192.0.2.1",
        hostname="relay.example.test",
        protocol="ESMTPS",
        queue_id="660DBBD430901004F4C0",
        date_epoch=0,
        tls="TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)",
        recipient="b@example.net",
    )
    message = email.message_from_bytes(raw + b"\r\nbody")
    value = " ".join(message["Received"].split())
    assert value.startswith("from client.example ([192.0.2.1]) (using TLSv1.3 with cipher")
    assert "by relay.example.test (twistedrelay) with ESMTPS id 660DBBD430901004F4C0" in value
    assert "for <b@example.net>;" in value
    assert raw.endswith(b"\r\n") and raw.count(b"\r\n") == 4


def test_no_helo_and_no_single_recipient():
    """An unknown HELO reads "unknown"; no for clause when the recipient is not given."""
    raw = build_received_header(
        helo=None,
        client_address="::1",
        hostname="h",
        protocol="SMTP",
        queue_id="X",
        date_epoch=0,
    )
    assert raw.startswith(b"Received: from unknown ([::1])\r\n")
    assert b"for <" not in raw


@given(st.text())
def test_client_text_cannot_break_the_header(text: str):
    """Whatever the client says in HELO, the header stays one field of printable lines."""
    raw = build_received_header(
        helo=text,
        client_address="192.0.2.1",
        hostname="h",
        protocol="ESMTP",
        queue_id="X",
        date_epoch=0,
    )
    assert raw.count(b"\r\n") == 2
    assert all(c.isprintable() and c not in "()\\" for c in printable(text))
