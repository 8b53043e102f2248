"""Inbound TLS and AUTH end to end: STARTTLS, implicit TLS, submission, throttle, sender rules.

Real reactor, loopback sockets, the test PKI of testing/certs.py, and a users file written
by auth.set_password. Clients are smtplib or raw sockets, run in threads so the reactor
keeps serving.
"""

from __future__ import annotations

import base64
import smtplib
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, threads
from twisted.internet.task import LoopingCall

from twistedrelay.auth import LoginThrottle, set_password
from twistedrelay.queue.store import read_entry_metadata
from twistedrelay.smtp import replies
from twistedrelay.testing.certs import TestCertificates, make_test_certificates
from twistedrelay.testing.inbound import InboundHarness
from twistedrelay.testing.waiting import wait_until

USER = "alice@example.org"
PASSWORD = "correct horse battery staple"
MESSAGE = b"Subject: tls test\r\n\r\nbody\r\n"


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TestCertificates:
    return make_test_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "users"
    set_password(path, USER, PASSWORD)
    set_password(path, "bob@example.org", "bob's password")
    return path


def _client_context(certs: TestCertificates) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs.ca_certificate))


def _start(
    tmp_path: Path,
    certs: TestCertificates,
    users_file: Path,
    auth: dict[str, Any] | None = None,
    throttle: LoginThrottle | None = None,
) -> InboundHarness:
    settings = {
        "relay": {"mynetworks": ["127.0.0.1/32"], "domains": ["example.org"]},
        "tls": {"certificate": str(certs.server_certificate), "private_key": str(certs.server_key)},
        "auth": {"users_file": str(users_file), **(auth or {})},
    }
    harness = InboundHarness(
        _reactor(),
        tmp_path,
        settings,
        listeners=("smtp", "submission", "submissions"),
        throttle=throttle,
    )
    harness.start()
    return harness


@pytest.fixture
def relay(tmp_path: Path, certs: TestCertificates, users_file: Path) -> Iterator[InboundHarness]:
    harness = _start(tmp_path, certs, users_file)
    yield harness
    pytest_twisted.blockon(defer.ensureDeferred(harness.stop()))


def _queued_content(harness: InboundHarness, queue_id: str) -> bytes:
    path = harness.store.layout.entry_path("incoming", queue_id)
    _, content_size = read_entry_metadata(path)
    with open(path, "rb") as f:
        return f.read(content_size)


def _received_header(content: bytes) -> str:
    assert content.startswith(b"Received: from "), content[:200]
    lines = content.split(b"\r\n")
    end = next(i for i in range(1, len(lines)) if not lines[i].startswith(b"\t"))
    return " ".join(line.decode().strip() for line in lines[:end])


# -- STARTTLS --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_starttls_with_smtplib_records_version_and_cipher(
    relay: InboundHarness, certs: TestCertificates
) -> None:
    """smtplib upgrades with STARTTLS (certificate verified); Received names version and cipher."""

    def send() -> tuple[bool, bool]:
        with smtplib.SMTP("127.0.0.1", relay.ports["smtp"], timeout=10) as client:
            client.ehlo()
            offered_before = client.has_extn("starttls")
            client.starttls(context=_client_context(certs))
            client.ehlo()
            offered_after = client.has_extn("starttls")
            client.sendmail("someone@elsewhere.test", ["bob@example.org"], MESSAGE)
        return offered_before, offered_after

    offered_before, offered_after = await threads.deferToThread(send)
    assert (offered_before, offered_after) == (True, False)
    (queue_id,) = relay.queued
    received = _received_header(_queued_content(relay, queue_id))
    assert "(using TLSv1.3 with cipher TLS_" in received, received
    assert "bits))" in received
    assert "with ESMTPS id" in received
    envelope, _ = read_entry_metadata(relay.store.layout.entry_path("incoming", queue_id))
    assert envelope.tls is not None and envelope.tls.startswith("TLSv1.3 with cipher")


def _read_reply(stream: Any) -> bytes:
    """One whole (possibly multi-line) reply from a socket or SSL socket, line by line."""
    out = b""
    while True:
        line = b""
        while not line.endswith(b"\r\n"):
            chunk = stream.recv(1)
            if not chunk:
                return out + line
            line += chunk
        out += line
        if line[3:4] == b" ":
            return out


@pytest.mark.parametrize(
    "injected", [b"RSET\r\n", b"MAIL FROM:<mallory@elsewhere.test>\r\n", b"HELP\r\n"]
)
@pytest_twisted.ensureDeferred
async def test_command_pipelined_with_starttls_is_discarded(
    relay: InboundHarness, certs: TestCertificates, injected: bytes
) -> None:
    """STARTTLS injection: a command sent in the same packet as STARTTLS is never answered."""

    def session() -> list[bytes]:
        with socket.create_connection(("127.0.0.1", relay.ports["smtp"]), timeout=5) as raw:
            _read_reply(raw)
            raw.sendall(b"EHLO client.test\r\n")
            _read_reply(raw)
            raw.sendall(b"STARTTLS\r\n" + injected)
            ready = _read_reply(raw)
            tls = _client_context(certs).wrap_socket(raw, server_hostname="localhost")
            tls.sendall(b"NOOP\r\n")
            first = _read_reply(tls)
            tls.sendall(b"MAIL FROM:<alice@elsewhere.test>\r\n")
            mail = _read_reply(tls)
            tls.sendall(b"QUIT\r\n")
            bye = _read_reply(tls)
            return [ready, first, mail, bye]

    ready, first, mail, bye = await threads.deferToThread(session)
    assert ready.startswith(b"220 2.0.0")
    # The first reply over TLS answers NOOP: nothing answers the injected command.
    assert first == replies.OK.to_bytes(), first
    # A fresh session after the handshake (RFC 3207 §4.2): no HELO yet, no transaction.
    assert mail == replies.HELO_REQUIRED.to_bytes(), mail
    assert bye.startswith(b"221 ")
    assert relay.queued == []


# -- AUTH on the submission listener ---------------------------------------------------------


def _submission_client(port: int) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, timeout=10)
    client.ehlo()
    return client


@pytest_twisted.ensureDeferred
async def test_submission_offers_auth_only_after_tls(
    relay: InboundHarness, certs: TestCertificates
) -> None:
    """Before TLS: no AUTH in EHLO, AUTH gets 538, MAIL gets 530; after STARTTLS, AUTH works."""

    def session() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        client = _submission_client(relay.ports["submission"])
        try:
            seen["auth_before"] = client.has_extn("auth")
            seen["auth_plain_before"] = client.docmd(
                "AUTH", "PLAIN " + base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
            )
            seen["mail_before"] = client.docmd("MAIL", "FROM:<alice@example.org>")
            client.starttls(context=_client_context(certs))
            client.ehlo()
            seen["auth_after"] = client.esmtp_features.get("auth", "")
            seen["mail_unauthenticated"] = client.docmd("MAIL", "FROM:<alice@example.org>")
            seen["login"] = client.login(USER, PASSWORD)
            seen["refused"] = client.sendmail(USER, ["carol@foreign.test"], MESSAGE)
        finally:
            client.close()
        return seen

    seen = await threads.deferToThread(session)
    assert seen["auth_before"] is False
    assert seen["auth_plain_before"] == (
        538,
        b"5.7.11 Encryption required for requested authentication mechanism",
    )
    assert seen["mail_before"][0] == 530 and seen["mail_before"][1].startswith(b"5.7.0")
    assert seen["auth_after"].split() == ["PLAIN", "LOGIN"]
    assert seen["mail_unauthenticated"][0] == 530
    assert seen["login"][0] == 235
    assert seen["refused"] == {}
    (queue_id,) = relay.queued
    envelope, _ = read_entry_metadata(relay.store.layout.entry_path("incoming", queue_id))
    assert envelope.authenticated_as == USER
    assert envelope.listener == "submission"
    assert "with ESMTPSA id" in _received_header(_queued_content(relay, queue_id))
    assert any(USER in line and "auth" in line for line in relay.mail_log())


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@pytest_twisted.ensureDeferred
async def test_auth_mechanisms_succeed_over_starttls(
    relay: InboundHarness, certs: TestCertificates, mechanism: str
) -> None:
    """AUTH PLAIN and AUTH LOGIN both accept the user set with set_password."""

    def session() -> tuple[int, bytes]:
        client = _submission_client(relay.ports["submission"])
        try:
            client.starttls(context=_client_context(certs))
            client.ehlo()
            client.user, client.password = USER, PASSWORD
            authobject = client.auth_plain if mechanism == "PLAIN" else client.auth_login
            return client.auth(mechanism, authobject, initial_response_ok=mechanism == "PLAIN")
        finally:
            client.close()

    code, text = await threads.deferToThread(session)
    assert code == 235, text


@pytest_twisted.ensureDeferred
async def test_wrong_passwords_get_535_then_slower_answers(
    tmp_path: Path, certs: TestCertificates, users_file: Path
) -> None:
    """Failed logins answer 535 5.7.8; past the throttle threshold the answers are delayed."""
    throttle = LoginThrottle(threshold=2, base_delay_seconds=0.4, max_delay_seconds=1.0)
    harness = _start(tmp_path, certs, users_file, throttle=throttle)

    def session() -> list[tuple[int, float]]:
        results = []
        client = _submission_client(harness.ports["submission"])
        try:
            client.starttls(context=_client_context(certs))
            client.ehlo()
            for attempt in range(3):
                plain = base64.b64encode(f"\0{USER}\0wrong {attempt}".encode()).decode()
                started = time.monotonic()
                code, _ = client.docmd("AUTH", f"PLAIN {plain}")
                results.append((code, time.monotonic() - started))
        finally:
            client.close()
        return results

    try:
        results = await threads.deferToThread(session)
    finally:
        await harness.stop()
    assert [code for code, _ in results] == [535, 535, 535]
    # The throttle's delay comes on top of the scrypt check, so the third answer takes at
    # least the base delay however loaded the machine is (a relative comparison with the
    # first answer is not: scrypt alone can take half a second under load).
    assert results[2][1] >= 0.4, results
    assert throttle.delay_for("127.0.0.1", time.time()) >= 0.4
    failures = [line for line in harness.mail_log() if "auth" in line and USER in line]
    assert len(failures) == 3, harness.mail_log()


@pytest_twisted.ensureDeferred
async def test_a_throttled_address_gets_one_password_check_at_a_time(
    tmp_path: Path, certs: TestCertificates, users_file: Path
) -> None:
    """Past the threshold, parallel connections do not multiply the guesses: while one
    delayed check runs, another AUTH from the address is answered 454 at once."""
    throttle = LoginThrottle(threshold=1, base_delay_seconds=2.0, max_delay_seconds=2.0)
    harness = _start(tmp_path, certs, users_file, throttle=throttle)
    throttle.record_failure("127.0.0.1", time.time())

    def guess(attempt: int) -> tuple[int, float]:
        client = _submission_client(harness.ports["submission"])
        try:
            client.starttls(context=_client_context(certs))
            client.ehlo()
            plain = base64.b64encode(f"\0{USER}\0wrong {attempt}".encode()).decode()
            started = time.monotonic()
            code, _ = client.docmd("AUTH", f"PLAIN {plain}")
            return code, time.monotonic() - started
        finally:
            client.close()

    try:
        first = threads.deferToThread(guess, 1)
        await wait_until(_reactor(), lambda: throttle.checking("127.0.0.1"), "a check running")
        second = await threads.deferToThread(guess, 2)
        first_result = await first
    finally:
        await harness.stop()
    assert second[0] == 454 and second[1] < 1.5, second
    assert first_result[0] == 535 and first_result[1] >= 2.0, first_result


@pytest_twisted.ensureDeferred
async def test_plaintext_auth_allowed_on_loopback_when_configured(
    tmp_path: Path, certs: TestCertificates, users_file: Path
) -> None:
    """auth.allow_plaintext_on_loopback: AUTH is offered and accepted from 127.0.0.1 without TLS."""
    harness = _start(tmp_path, certs, users_file, auth={"allow_plaintext_on_loopback": True})

    def session() -> tuple[bool, tuple[int, bytes], dict[str, Any]]:
        client = _submission_client(harness.ports["submission"])
        try:
            offered = client.has_extn("auth")
            login = client.login(USER, PASSWORD)
            refused = client.sendmail(USER, ["carol@foreign.test"], MESSAGE)
        finally:
            client.close()
        return offered, login, refused

    try:
        offered, login, refused = await threads.deferToThread(session)
    finally:
        await harness.stop()
    assert offered is True
    assert login[0] == 235
    assert refused == {}
    assert len(harness.queued) == 1


@pytest_twisted.ensureDeferred
async def test_restrict_sender_refuses_another_users_address(
    tmp_path: Path, certs: TestCertificates, users_file: Path
) -> None:
    """auth.restrict_sender: another user's address as MAIL FROM is 553 5.7.1; one's own is 250."""
    harness = _start(tmp_path, certs, users_file, auth={"restrict_sender": True})

    def session() -> list[tuple[int, bytes]]:
        client = _submission_client(harness.ports["submission"])
        try:
            client.starttls(context=_client_context(certs))
            client.ehlo()
            client.login(USER, PASSWORD)
            other = client.docmd("MAIL", "FROM:<bob@example.org>")
            own = client.docmd("MAIL", f"FROM:<{USER.upper()}>")
            client.docmd("RSET")
            null = client.docmd("MAIL", "FROM:<>")
        finally:
            client.close()
        return [other, own, null]

    try:
        other, own, null = await threads.deferToThread(session)
    finally:
        await harness.stop()
    assert other == (553, b"5.7.1 Sender address rejected: not owned by user")
    assert own[0] == 250
    assert null[0] == 250


# -- implicit TLS ----------------------------------------------------------------------------


def _flood_over_tls(port: int, certs: TestCertificates) -> int:
    """Over implicit TLS, send EHLO lines without reading until the server stops taking
    them (a send blocks for a second), at most 20 s; return the bytes sent."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", port))
    sock = _client_context(certs).wrap_socket(raw, server_hostname="localhost")
    sock.settimeout(1.0)
    chunk, sent, deadline = b"EHLO x\r\n" * 2048, 0, time.monotonic() + 20
    try:
        while time.monotonic() < deadline:
            sock.sendall(chunk)
            sent += len(chunk)
    except TimeoutError:
        pass
    finally:
        sock.close()
    return sent


@pytest_twisted.ensureDeferred
async def test_implicit_tls_sessions_stop_reading_a_client_that_never_reads(
    relay: InboundHarness, certs: TestCertificates
) -> None:
    """The reply backpressure holds over implicit TLS too, once the handshake is done."""
    sessions = relay.service.factories["submissions"].sessions
    paused: list[frozenset[str]] = []

    def watch() -> None:
        paused.extend(session.reading_paused_for for session in sessions)

    watcher = LoopingCall(watch)
    watcher.start(0.2)
    try:
        sent = await threads.deferToThread(_flood_over_tls, relay.ports["submissions"], certs)
    finally:
        watcher.stop()
    assert sent > 0
    assert frozenset({"replies"}) in paused


@pytest_twisted.ensureDeferred
async def test_implicit_tls_listener_authenticates_and_queues(
    relay: InboundHarness, certs: TestCertificates
) -> None:
    """smtp.submissions: SMTP_SSL verifies the chain, AUTH is offered at once, mail queues."""

    def session() -> tuple[bool, dict[str, Any]]:
        with smtplib.SMTP_SSL(
            "127.0.0.1", relay.ports["submissions"], timeout=10, context=_client_context(certs)
        ) as client:
            client.ehlo()
            starttls_offered = client.has_extn("starttls")
            client.login(USER, PASSWORD)
            return starttls_offered, client.sendmail(USER, ["carol@foreign.test"], MESSAGE)

    starttls_offered, refused = await threads.deferToThread(session)
    assert starttls_offered is False
    assert refused == {}
    (queue_id,) = relay.queued
    envelope, _ = read_entry_metadata(relay.store.layout.entry_path("incoming", queue_id))
    assert envelope.listener == "submissions"
    assert envelope.authenticated_as == USER
    received = _received_header(_queued_content(relay, queue_id))
    assert "(using TLSv1.3 with cipher TLS_" in received, received
    assert "with ESMTPSA id" in received
