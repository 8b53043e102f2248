"""t10: authenticated submission over TLS under twistd, and the certificate reloaded on SIGHUP.

One relay with ``[tls]``, a ``smtp.submission`` listener and a users file made with
``twistedrelay passwd``; ``relay.mynetworks`` excludes loopback, so only AUTH lets a client
relay. Every domain is routed to a sink subprocess.
"""

from __future__ import annotations

import shutil
import signal
import smtplib
import ssl
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

from tests.system.harness import (
    QUEUED_RE,
    RelayProcess,
    SinkProcess,
    wait_until,
    write_relay_config,
)
from twistedrelay.testing.certs import TestCertificates, make_test_certificates

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]

USER = "alice@example.org"
PASSWORD = "s3cret submission password"
TWISTEDRELAY = str(Path(sys.executable).with_name("twistedrelay"))
DELIVERY_TIMEOUT_SECONDS = 20.0


def _add_user(users_file: Path) -> None:
    """``twistedrelay passwd FILE USER`` with the password on standard input."""
    result = subprocess.run(
        [TWISTEDRELAY, "passwd", str(users_file), USER],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert users_file.read_text().startswith(f"{USER}:scrypt$")
    assert users_file.stat().st_mode & 0o077 == 0


def _start_relay(
    tmp_path: Path,
    sink: SinkProcess,
    certs: TestCertificates,
    start_relay: Callable[..., RelayProcess],
) -> tuple[RelayProcess, int]:
    users_file = tmp_path / "users"
    _add_user(users_file)
    config = write_relay_config(
        tmp_path,
        route=f"127.0.0.1:{sink.port}",
        workers=1,
        extra=(
            "[tls]\n"
            f'certificate = "{certs.server_certificate}"\n'
            f'private_key = "{certs.server_key}"\n'
            "[auth]\n"
            f'users_file = "{users_file}"\n'
        ),
    )
    text = config.read_text()
    # Loopback is not trusted here: relaying must come from AUTH, not from mynetworks.
    text = text.replace('mynetworks = ["127.0.0.0/8"]', 'mynetworks = ["192.0.2.1/32"]')
    text = text.replace(
        'listen = ["127.0.0.1:0"]\n', 'listen = ["127.0.0.1:0"]\nsubmission = ["127.0.0.1:0"]\n'
    )
    config.write_text(text)
    relay = start_relay(config, tmp_path / "run", workers=1)
    port = relay.wait_for_log(r"listening for submission on 127\.0\.0\.1:(\d+)").group(1)
    return relay, int(port)


def _received_with(sink: SinkProcess, message_id: str) -> list[bytes]:
    needle = f"Message-ID: {message_id}".encode()
    return [raw for raw in sink.messages() if needle in raw]


def _served_serial(port: int, certs: TestCertificates) -> int:
    """The serial number of the certificate the submission listener presents after STARTTLS."""
    context = ssl.create_default_context(cafile=str(certs.ca_certificate))
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        try:
            client.starttls(context=context)
        except ssl.SSLCertVerificationError:
            return 0  # a certificate the trusted CA did not issue (not renewed yet)
        der = client.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
    return int(x509.load_der_x509_certificate(der).serial_number)


@pytest.mark.skipif(shutil.which("swaks") is None, reason="make test installs swaks")
def test_swaks_tls_auth_relays_through_submission_and_sighup_reloads_the_certificate(
    tmp_path: Path,
    start_sink: Callable[[Path], SinkProcess],
    start_relay: Callable[..., RelayProcess],
) -> None:
    """swaks --tls --auth PLAIN relays a message to the sink; SIGHUP serves new certificates."""
    sink = start_sink(tmp_path / "sink")
    certs = make_test_certificates(tmp_path / "tls", serial_number=1001)
    relay, port = _start_relay(tmp_path, sink, certs, start_relay)

    message_id = f"<{uuid.uuid4().hex}@client.example.org>"
    swaks = [
        "swaks",
        "--server",
        f"127.0.0.1:{port}",
        "--helo",
        "client.example.org",
        "--from",
        USER,
        "--to",
        "bob@foreign.test",
        "--header",
        f"Message-ID: {message_id}",
        "--body",
        "sent by swaks over TLS",
        "--timeout",
        "15",
    ]
    without_auth = subprocess.run(
        [*swaks, "--tls"], capture_output=True, text=True, timeout=30, check=False
    )
    assert without_auth.returncode != 0
    assert "530 5.7.0" in without_auth.stdout, without_auth.stdout
    result = subprocess.run(
        [
            *swaks,
            "--tls",
            "--tls-verify",
            "--tls-ca-path",
            str(certs.ca_certificate),
            "--auth",
            "PLAIN",
            "--auth-user",
            USER,
            "--auth-password",
            PASSWORD,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "235 2.7.0" in result.stdout
    assert QUEUED_RE.search(result.stdout), result.stdout
    wait_until(
        lambda: _received_with(sink, message_id),
        DELIVERY_TIMEOUT_SECONDS,
        f"the sink to receive {message_id}",
    )
    (delivered,) = _received_with(sink, message_id)
    assert b"X-Sink-Rcpt-To: <bob@foreign.test>" in delivered
    assert b"with ESMTPSA id" in delivered
    assert b"(using TLSv1." in delivered
    log = relay.log()
    assert "auth" in log and USER in log
    assert PASSWORD not in log

    # SIGHUP: the same file names, new content; new connections get the new certificate.
    assert _served_serial(port, certs) == 1001
    renewed = make_test_certificates(tmp_path / "renewed", serial_number=2002)
    certs.server_certificate.write_bytes(renewed.server_certificate.read_bytes())
    certs.server_key.write_bytes(renewed.server_key.read_bytes())
    certs.ca_certificate.write_bytes(renewed.ca_certificate.read_bytes())
    relay.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: _served_serial(port, certs) == 2002, 15.0, "the renewed certificate")
