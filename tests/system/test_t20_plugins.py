"""t20: issue 8 from an operator's seat: ``enabled = ["rate_limit", "dkim_sign"]`` under twistd.

A two-worker relay routes every domain to ``twistedrelay bench sink --save-dir``. Messages
it relays carry a DKIM signature that dkimpy verifies against the published key, and a
flood from one client address, spread over both workers' sessions, is throttled to the
configured limit: the counters live in one SQLite file shared by the workers.
"""

from __future__ import annotations

import base64
import email.policy
import math
import re
import signal
import smtplib
import sys
import time
from email.message import EmailMessage
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.system.harness import RelayProcess, wait_until, write_relay_config

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]

LIMIT = 3
WINDOW_SECONDS = 3600
PER_WORKER = 3
MAX_SESSIONS = 40
DELIVERY_TIMEOUT_SECONDS = 20.0
SINK_HEADER = re.compile(rb"\AX-Sink-(?:Mail-From|Rcpt-To): [^\r\n]*\r\n")


def _write_key(path: Path) -> bytes:
    """Write a fresh RSA key (PKCS#8 PEM) and return its DKIM TXT record (RFC 6376 §3.6.1)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


def _message(number: int, source: str) -> bytes:
    message = EmailMessage()
    message["From"] = "Alice <alice@example.org>"
    message["To"] = "bob@example.net"
    message["Subject"] = f"t20 flood {number} from {source}"
    message["Message-ID"] = f"<t20-{source}-{number}@example.org>"
    message.set_content("A message in a flood.\n")
    return message.as_bytes(policy=email.policy.SMTP)


def _open_sessions(relay: RelayProcess, source: str) -> dict[str, list[smtplib.SMTP]]:
    """Open sessions from ``source`` until each worker serves at least PER_WORKER of them.

    The worker of a session is read from its ``connect from [ip]:port`` log line.

    :returns: the open sessions by worker slot (the caller closes them).
    """
    by_worker: dict[str, list[smtplib.SMTP]] = {}
    for _ in range(MAX_SESSIONS):
        client = smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=15, source_address=(source, 0))
        client.ehlo("client.example.org")
        port = client.sock.getsockname()[1]
        slot = relay.wait_for_log(rf"worker (\d+): .*connect from \[{re.escape(source)}\]:{port} ")
        by_worker.setdefault(slot.group(1), []).append(client)
        if len(by_worker) == 2 and all(len(c) >= PER_WORKER for c in by_worker.values()):
            break
    return by_worker


def _flood(relay: RelayProcess, source: str) -> dict[str, list[str]]:
    """Send one message in each session, alternating between the workers' sessions.

    :returns: per worker slot, the reply to each MAIL FROM (after DATA for accepted ones).
    """
    by_worker = _open_sessions(relay, source)
    try:
        assert sorted(by_worker) == ["0", "1"], "the kernel gave every session to one worker"
        replies: dict[str, list[str]] = {slot: [] for slot in by_worker}
        pairs = zip(by_worker["0"], by_worker["1"], strict=False)  # 0, 1, 0, 1, …
        for number, (slot, client) in enumerate(
            (slot, client) for pair in pairs for slot, client in zip(("0", "1"), pair, strict=True)
        ):
            code, text = client.mail("alice@example.org")
            if code == 250:
                assert client.rcpt("bob@example.net")[0] == 250
                code, text = client.data(_message(number, source))
                assert code == 250, text
                replies[slot].append("queued")
            else:
                replies[slot].append(f"{code} {text.decode()}")
        return replies
    finally:
        for clients in by_worker.values():
            for client in clients:
                client.close()


def _unwrap(saved: bytes) -> bytes:
    """The content as the sink received it, without the sink's X-Sink-* envelope lines."""
    while match := SINK_HEADER.match(saved):
        saved = saved[match.end() :]
    return saved


def test_signed_mail_verifies_and_a_flood_is_limited_across_both_workers(
    tmp_path, start_relay, start_sink
):
    """Relayed mail carries a DKIM-Signature that verifies; the flood gets LIMIT messages in."""
    sink = start_sink(tmp_path / "sink")
    key_file = tmp_path / "dkim.pem"
    txt = _write_key(key_file)
    config = write_relay_config(
        tmp_path,
        route=f"127.0.0.1:{sink.port}",
        workers=2,
        extra=(
            "[plugins]\n"
            'enabled = ["rate_limit", "dkim_sign"]\n'
            "[plugins.rate_limit]\n"
            f"per_client = {{ messages = {LIMIT}, window_seconds = {WINDOW_SECONDS} }}\n"
            "[plugins.dkim_sign]\n"
            'domain = "example.org"\n'
            'selector = "s1"\n'
            f'private_key = "{key_file}"\n'
        ),
    )
    relay: RelayProcess = start_relay(config, tmp_path / "run", workers=2)

    # Fixed windows: a flood that straddles a window boundary is sent again from another
    # client address (which then starts just after the boundary).
    for source in ("127.0.0.2", "127.0.0.3"):
        window = math.floor(time.time() / WINDOW_SECONDS)
        replies = _flood(relay, source)
        if math.floor(time.time() / WINDOW_SECONDS) == window:
            break
    # Sessions alternate between the workers (0, 1, 0, 1, …): worker 0 queues two messages,
    # worker 1 one, and then both refuse: each saw the other's count in the shared state.
    refused = "450 4.7.1 Error: rate limit exceeded, try again later"
    assert replies["0"][:2] == ["queued", "queued"] and replies["1"][:1] == ["queued"]
    assert set(replies["0"][2:]) == {refused} and set(replies["1"][1:]) == {refused}
    log = relay.log()
    assert re.search(
        rf"reject: MAIL from \[{re.escape(source)}\]: 450 4\.7\.1 .*plugin=rate_limit "
        r"results=\(rate_limit:limit reached per_client:",
        log,
    )

    def delivered() -> list[bytes] | None:
        messages = [m for m in sink.messages() if f"from {source}".encode() in m]
        return messages if len(messages) >= LIMIT else None

    saved = wait_until(delivered, DELIVERY_TIMEOUT_SECONDS, f"{LIMIT} messages at the sink")
    assert len(saved) == LIMIT
    records = {"s1._domainkey.example.org": txt}

    def lookup(name: bytes, timeout: float = 5) -> bytes | None:
        return records.get(name.decode("ascii").rstrip("."))

    for raw in saved:
        content = _unwrap(raw)
        assert content.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")
        assert b" d=example.org;" in content and b" s=s1;" in content
        assert dkim.verify(content, dnsfunc=lookup)
    assert not dkim.verify(_unwrap(saved[0]).replace(b"flood", b"FLOOD"), dnsfunc=lookup)


def test_sighup_applies_new_plugin_settings_and_refuses_bad_ones(tmp_path, start_relay, start_sink):
    """A SIGHUP with changed [plugins] sets them up anew in every worker; one with a bad
    plugin setting is refused by the master, as check-config would refuse it."""
    sink = start_sink(tmp_path / "sink")

    def configure(example: str) -> Path:
        return write_relay_config(
            tmp_path,
            route=f"127.0.0.1:{sink.port}",
            workers=2,
            extra=f'[plugins]\nenabled = ["example"]\n[plugins.example]\n{example}\n',
        )

    config = configure("add_header = false")
    relay: RelayProcess = start_relay(config, tmp_path / "run", workers=2)
    configure("add_header = true")
    relay.proc.send_signal(signal.SIGHUP)
    for slot in (0, 1):
        relay.wait_for_log(rf"worker {slot} reloaded")
    for number in range(4):  # sessions alternate between the workers
        with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=15) as client:
            client.sendmail("a@example.org", ["b@example.net"], _message(number, "reload"))

    def delivered() -> list[bytes] | None:
        messages = [m for m in sink.messages() if b"from reload" in m]
        return messages if len(messages) == 4 else None

    saved = wait_until(delivered, DELIVERY_TIMEOUT_SECONDS, "4 messages at the sink")
    assert all(b"\r\nX-Example: yes\r\n" in m or m.startswith(b"X-Example: yes") for m in saved)

    configure('add_header = "yes"')
    relay.proc.send_signal(signal.SIGHUP)
    relay.wait_for_log(r"SIGHUP: refusing the new config, keeping the old one: .*plugins\.example")
