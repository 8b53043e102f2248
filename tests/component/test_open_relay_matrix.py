"""The open-relay matrix: who may send where, on every listener.

Source inside or outside ``relay.mynetworks`` (127.0.0.1 vs 127.0.0.2) × authenticated or
not × a ``relay.domains`` or a foreign recipient × the smtp, submission and submissions
listeners, all over TLS. Only trusted or authenticated clients reach foreign domains; the
submission listeners refuse MAIL before AUTH whatever the source.
"""

from __future__ import annotations

import smtplib
import ssl
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import threads

from twistedrelay.auth import set_password
from twistedrelay.testing.certs import make_test_certificates
from twistedrelay.testing.inbound import InboundHarness

USER = "alice@example.org"
PASSWORD = "matrix password"
TRUSTED, STRANGER = "127.0.0.1", "127.0.0.2"
LOCAL, FOREIGN = "bob@example.org", "carol@foreign.test"
MAIL_OK, RCPT_OK, RELAY_DENIED, AUTH_REQUIRED = 250, 250, 554, 530


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def _expected(listener: str, source: str, authenticated: bool, recipient: str) -> tuple[int, ...]:
    """(MAIL code,) when MAIL is refused, else (MAIL code, RCPT code): the policy under test."""
    if listener != "smtp" and not authenticated:
        return (AUTH_REQUIRED,)
    may_relay = authenticated or source == TRUSTED
    return (MAIL_OK, RCPT_OK if may_relay or recipient == LOCAL else RELAY_DENIED)


def _probe(
    port: int, listener: str, source: str, authenticated: bool, context: ssl.SSLContext
) -> dict[str, tuple[int, ...]]:
    """One TLS session from ``source``: for each recipient, MAIL (and RCPT when MAIL passed)."""
    if listener == "submissions":
        client: smtplib.SMTP = smtplib.SMTP_SSL(
            "127.0.0.1", port, timeout=10, source_address=(source, 0), context=context
        )
    else:
        client = smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        client.ehlo()
        if listener != "submissions":
            client.starttls(context=context)
            client.ehlo()
        if authenticated:
            client.login(USER, PASSWORD)
        seen = {}
        for recipient in (LOCAL, FOREIGN):
            mail, _ = client.docmd("MAIL", "FROM:<someone@sender.test>")
            if mail != 250:
                seen[recipient] = (mail,)
                continue
            rcpt, _ = client.docmd("RCPT", f"TO:<{recipient}>")
            seen[recipient] = (mail, rcpt)
            client.docmd("RSET")
        client.quit()
        return seen
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_only_trusted_or_authenticated_clients_relay_on_any_listener(
    tmp_path: Path,
) -> None:
    """Every cell of source × AUTH × domain × listener gets the reply the relay policy says."""
    certs = make_test_certificates(tmp_path / "certs")
    users = tmp_path / "users"
    set_password(users, USER, PASSWORD)
    harness = InboundHarness(
        _reactor(),
        tmp_path,
        {
            "relay": {"mynetworks": [f"{TRUSTED}/32"], "domains": ["example.org"]},
            "tls": {
                "certificate": str(certs.server_certificate),
                "private_key": str(certs.server_key),
            },
            "auth": {"users_file": str(users)},
        },
        listeners=("smtp", "submission", "submissions"),
    )
    harness.start()
    context = ssl.create_default_context(cafile=str(certs.ca_certificate))
    mismatches = []
    cells = 0
    try:
        for listener, port in harness.ports.items():
            for source in (TRUSTED, STRANGER):
                for authenticated in (False, True):
                    seen = await threads.deferToThread(
                        _probe, port, listener, source, authenticated, context
                    )
                    for recipient, codes in seen.items():
                        cells += 1
                        expected = _expected(listener, source, authenticated, recipient)
                        if codes != expected:
                            cell = (listener, source, authenticated, recipient)
                            mismatches.append((cell, codes, expected))
    finally:
        await harness.stop()
    assert cells == 3 * 2 * 2 * 2
    assert mismatches == []
    assert harness.queued == []
    denied = [line for line in harness.mail_log() if "reject: RCPT" in line and "554 5.7.1" in line]
    assert len(denied) == 1, harness.mail_log()  # smtp × stranger × unauthenticated × foreign
