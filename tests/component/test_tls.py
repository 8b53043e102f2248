"""Component tests of twistedrelay.tls: real handshakes over loopback on the real reactor."""

from __future__ import annotations

import shutil
import socket
import ssl
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from twisted.internet import defer, endpoints, protocol, threads
from twisted.internet.interfaces import IHandshakeListener, IListeningPort
from twisted.python.failure import Failure
from zope.interface import implementer

from twistedrelay.config import ConfigError
from twistedrelay.testing.certs import TestCertificates, make_test_certificates
from twistedrelay.tls import VERIFICATION_ERRORS, ClientTLS, ServerTLS, describe_tls

HOST = "mx.example.test"
TIMEOUT = 10.0


@pytest.fixture
def certs(tmp_path: Path) -> TestCertificates:
    return make_test_certificates(tmp_path / "pki", HOST)


@pytest.fixture
def server_tls(certs: TestCertificates) -> ServerTLS:
    return ServerTLS(certs.server_certificate, certs.server_key, "relay.toml")


# -- a tiny server: reports its TLS session to the client ----------------------------------


@implementer(IHandshakeListener)
class DescribingServer(protocol.Protocol):
    """Writes describe_tls() after the handshake; on a plain port, "STARTTLS" starts TLS."""

    def __init__(self, server_tls: ServerTLS, before: list[str | None]) -> None:
        self.server_tls = server_tls
        self.before = before

    def connectionMade(self) -> None:
        self.before.append(describe_tls(self.transport))

    def dataReceived(self, data: bytes) -> None:
        if data == b"STARTTLS\r\n":
            self.transport.write(b"220 go ahead\r\n")
            self.transport.startTLS(self.server_tls)  # type: ignore[attr-defined]

    def handshakeCompleted(self) -> None:
        self.transport.write(f"{describe_tls(self.transport)}\r\n".encode())


async def listen(reactor: Any, server_tls: ServerTLS, *, implicit: bool) -> IListeningPort:
    """Listen on 127.0.0.1 (kernel-chosen port), with implicit TLS or plain + STARTTLS."""
    before: list[str | None] = []
    factory = protocol.Factory.forProtocol(lambda: DescribingServer(server_tls, before))
    factory.before = before  # type: ignore[attr-defined]
    if implicit:
        endpoint = endpoints.SSL4ServerEndpoint(reactor, 0, server_tls, interface="127.0.0.1")
    else:
        endpoint = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    return await endpoint.listen(factory)


@pytest.fixture
def reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@pytest.fixture
def ports() -> Any:
    opened: list[IListeningPort] = []
    yield opened
    for port in opened:
        pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


# -- a stdlib client, run in a thread ------------------------------------------------------


def stdlib_handshake(
    port: int,
    *,
    ca_file: Path | None = None,
    starttls: bool = False,
    only_version: ssl.TLSVersion | None = None,
) -> tuple[str, str, bytes]:
    """Connect, handshake and read the server's line: (line, TLS version, peer cert DER)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca_file is not None:
        context.load_verify_locations(ca_file)
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if only_version is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = context.maximum_version = only_version
        # Let this client speak old versions at all, so the refusal is the server's.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        if starttls:
            sock.sendall(b"STARTTLS\r\n")
            assert read_line(sock) == "220 go ahead"
        with context.wrap_socket(sock, server_hostname=HOST) as tls:
            line = read_line(tls)
            return line, tls.version() or "", tls.getpeercert(binary_form=True) or b""


def read_line(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\r\n") and len(data) < 1000:
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data.decode().rstrip("\r\n")


def serial_of(der: bytes) -> int:
    return x509.load_der_x509_certificate(der).serial_number


# -- inbound -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_implicit_tls_handshake_and_description(reactor, ports, server_tls, certs):
    """A client verifying against the CA completes a handshake on an implicit-TLS port."""
    port = await listen(reactor, server_tls, implicit=True)
    ports.append(port)
    line, version, _ = await threads.deferToThread(
        stdlib_handshake, port.getHost().port, ca_file=certs.ca_certificate
    )
    assert version in ("TLSv1.2", "TLSv1.3")
    assert line.startswith(f"{version} with cipher ")
    assert line.endswith(" bits)")


@pytest_twisted.ensureDeferred
async def test_starttls_upgrades_a_plain_connection(reactor, ports, server_tls, certs):
    """transport.startTLS(server_tls) works; describe_tls is None before the upgrade."""
    port = await listen(reactor, server_tls, implicit=False)
    ports.append(port)
    line, version, _ = await threads.deferToThread(
        stdlib_handshake, port.getHost().port, ca_file=certs.ca_certificate, starttls=True
    )
    assert line.startswith(f"{version} with cipher ")
    assert port.factory.before == [None]


@pytest.mark.parametrize("old", ["TLSv1", "TLSv1_1"])
@pytest_twisted.ensureDeferred
async def test_tls_older_than_1_2_is_refused(reactor, ports, server_tls, old):
    """A client offering only TLS 1.0 or 1.1 gets a protocol-version alert from the server."""
    port = await listen(reactor, server_tls, implicit=True)
    ports.append(port)
    with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):
        await threads.deferToThread(
            stdlib_handshake, port.getHost().port, only_version=getattr(ssl.TLSVersion, old)
        )


@pytest_twisted.ensureDeferred
async def test_tls_1_2_uses_ecdhe_with_aead(reactor, ports, server_tls):
    """A TLS 1.2 client gets a forward-secret AEAD cipher."""
    port = await listen(reactor, server_tls, implicit=True)
    ports.append(port)
    line, version, _ = await threads.deferToThread(
        stdlib_handshake, port.getHost().port, only_version=ssl.TLSVersion.TLSv1_2
    )
    assert version == "TLSv1.2"
    assert line.startswith("TLSv1.2 with cipher ECDHE-")
    assert "GCM" in line or "CHACHA20" in line


@pytest_twisted.ensureDeferred
async def test_reload_serves_the_new_certificate(reactor, ports, server_tls, certs, tmp_path):
    """After the files change, reload() makes new connections get the new certificate."""
    port = await listen(reactor, server_tls, implicit=True)
    ports.append(port)
    number = port.getHost().port
    _, _, first = await threads.deferToThread(stdlib_handshake, number)
    fresh = make_test_certificates(tmp_path / "fresh", HOST, serial_number=4242)
    shutil.copy(fresh.server_certificate, certs.server_certificate)
    shutil.copy(fresh.server_key, certs.server_key)
    server_tls.reload()
    _, _, second = await threads.deferToThread(stdlib_handshake, number)
    assert serial_of(first) != 4242
    assert serial_of(second) == 4242


@pytest_twisted.ensureDeferred
async def test_failed_reload_keeps_the_old_certificate(reactor, ports, server_tls, certs):
    """A broken certificate file makes reload() raise and leaves the old one in service."""
    port = await listen(reactor, server_tls, implicit=True)
    ports.append(port)
    number = port.getHost().port
    _, _, before = await threads.deferToThread(stdlib_handshake, number)
    certs.server_certificate.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"^relay.toml: tls.certificate: .*server-chain.pem"):
        server_tls.reload()
    _, _, after = await threads.deferToThread(stdlib_handshake, number)
    assert after == before


@pytest_twisted.ensureDeferred
async def test_chain_file_lets_clients_verify(reactor, ports, certs):
    """Serving leaf + intermediate verifies against the root; the leaf alone does not."""
    leaf_only = ServerTLS(certs.server_leaf_certificate, certs.server_key, "relay.toml")
    port = await listen(reactor, leaf_only, implicit=True)
    ports.append(port)
    with pytest.raises(ssl.SSLCertVerificationError):
        await threads.deferToThread(
            stdlib_handshake, port.getHost().port, ca_file=certs.ca_certificate
        )


@pytest.mark.parametrize(
    ("certificate", "key", "config_key", "problem"),
    [
        ("missing.pem", "server_key", "tls.certificate", "cannot read .*missing.pem"),
        ("server_key", "server_key", "tls.certificate", "no PEM certificate"),
        ("server_certificate", "server_certificate", "tls.private_key", "not an unencrypted"),
        ("server_certificate", "self_signed_key", "tls.private_key", "does not match"),
    ],
)
def test_bad_files_are_config_errors_naming_the_file(certs, certificate, key, config_key, problem):
    """Unreadable, wrong or mismatched files give a ConfigError naming key and file."""

    def path(name: str) -> Path:
        return getattr(certs, name, certs.ca_certificate.parent / name)

    with pytest.raises(ConfigError, match=rf"^relay.toml: {config_key}: .*{problem}"):
        ServerTLS(path(certificate), path(key), "relay.toml")


# -- outbound: ClientTLS against a real server ---------------------------------------------


@implementer(IHandshakeListener)
class HandshakeClient(protocol.Protocol):
    """Fires ``done`` with describe_tls() at handshake, or fails with the loss reason."""

    def __init__(self) -> None:
        self.done: defer.Deferred[str] = defer.Deferred()

    def handshakeCompleted(self) -> None:
        self.done.callback(describe_tls(self.transport) or "")
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if not self.done.called:
            self.done.errback(reason)


async def client_handshake(reactor: Any, port: int, creator: Any) -> str:
    client = HandshakeClient()
    endpoint = endpoints.wrapClientTLS(
        creator, endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=TIMEOUT)
    )
    await endpoints.connectProtocol(endpoint, client)
    return await client.done.addTimeout(TIMEOUT, reactor)


async def serve(reactor, ports, certificate: Path, key: Path) -> int:
    port = await listen(reactor, ServerTLS(certificate, key, "relay.toml"), implicit=True)
    ports.append(port)
    return port.getHost().port


@pytest.mark.parametrize("hostname", [HOST, "127.0.0.1"])
@pytest_twisted.ensureDeferred
async def test_verify_succeeds_against_the_trusted_ca(reactor, ports, certs, hostname):
    """'verify' completes against a chain from ca_file naming the host (DNS or IP)."""
    port = await serve(reactor, ports, certs.server_certificate, certs.server_key)
    options = ClientTLS(certs.ca_certificate).options_for(hostname, "verify")
    description = await client_handshake(reactor, port, options.creator)
    assert description.startswith("TLSv1.")
    assert options.describe(tls_used=True) == "TLS used and verified"


@pytest.mark.parametrize(
    ("certificate", "key", "hostname"),
    [
        ("self_signed_certificate", "self_signed_key", HOST),
        ("server_certificate", "server_key", "other.example.test"),
        ("server_leaf_certificate", "server_key", HOST),
    ],
    ids=["self-signed", "wrong-host-name", "missing-intermediate"],
)
@pytest_twisted.ensureDeferred
async def test_verify_fails_without_a_valid_certificate(
    reactor, ports, certs, certificate, key, hostname
):
    """'verify' fails the handshake for a self-signed cert, a wrong name or a broken chain."""
    port = await serve(reactor, ports, getattr(certs, certificate), getattr(certs, key))
    options = ClientTLS(certs.ca_certificate).options_for(hostname, "verify")
    with pytest.raises(VERIFICATION_ERRORS):
        await client_handshake(reactor, port, options.creator)


@pytest.mark.parametrize("level", ["may", "encrypt"])
@pytest_twisted.ensureDeferred
async def test_opportunistic_levels_accept_a_self_signed_certificate(reactor, ports, certs, level):
    """'may' and 'encrypt' encrypt with any certificate and report it as not verified."""
    port = await serve(reactor, ports, certs.self_signed_certificate, certs.self_signed_key)
    options = ClientTLS(certs.ca_certificate).options_for(HOST, level)
    assert (await client_handshake(reactor, port, options.creator)).startswith("TLSv1.")
    assert options.describe(tls_used=True) == "TLS used, not verified"
