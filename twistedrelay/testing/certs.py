"""Test certificates: a small private PKI written to a directory, made in milliseconds.

Owns certificate generation for tests only (ours and plugin authors'); nothing here is fit
for production keys. The PKI is a root CA, an intermediate CA, a server certificate issued
by the intermediate (so a served chain file matters, as in production), and an unrelated
self-signed certificate for the same names. Keys are EC P-256 because they are fast to make.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK = ipaddress.ip_address("127.0.0.1")


@dataclass(frozen=True, slots=True)
class TestCertificates:
    """Paths of the PEM files made by :func:`make_test_certificates`."""

    __test__ = False  # not a pytest test class, despite the name

    ca_certificate: Path
    """The root CA: the trust anchor a verifying client uses (``delivery.ca_file``)."""
    server_certificate: Path
    """The server's chain file: leaf then intermediate (``tls.certificate``)."""
    server_key: Path
    """The server's private key (``tls.private_key``)."""
    server_leaf_certificate: Path
    """The leaf alone: a server that serves it cannot be verified by a client."""
    self_signed_certificate: Path
    """A self-signed certificate for the same names, trusted by nobody."""
    self_signed_key: Path


def make_test_certificates(
    directory: Path, hostname: str = "localhost", *, serial_number: int | None = None
) -> TestCertificates:
    """Write a fresh test PKI into ``directory`` (created when missing).

    The server and self-signed certificates name ``hostname`` (DNS) and 127.0.0.1 (IP).

    :param serial_number: the server certificate's serial (random when None), so a test can
        tell two server certificates apart.
    :returns: the paths of the files written.
    """
    directory.mkdir(parents=True, exist_ok=True)
    root_key = _new_key()
    root = _issue("twistedrelay test root CA", root_key, root_key, None, is_ca=True, path_length=1)
    intermediate_key = _new_key()
    intermediate = _issue(
        "twistedrelay test intermediate CA",
        intermediate_key,
        root_key,
        root,
        is_ca=True,
        path_length=0,
    )
    server_key = _new_key()
    server = _issue(
        hostname, server_key, intermediate_key, intermediate, serial_number=serial_number
    )
    self_signed_key = _new_key()
    self_signed = _issue(hostname, self_signed_key, self_signed_key, None)

    paths = TestCertificates(
        ca_certificate=directory / "ca.pem",
        server_certificate=directory / "server-chain.pem",
        server_key=directory / "server-key.pem",
        server_leaf_certificate=directory / "server-leaf.pem",
        self_signed_certificate=directory / "self-signed.pem",
        self_signed_key=directory / "self-signed-key.pem",
    )
    paths.ca_certificate.write_bytes(_pem(root))
    paths.server_certificate.write_bytes(_pem(server) + _pem(intermediate))
    paths.server_leaf_certificate.write_bytes(_pem(server))
    paths.server_key.write_bytes(_key_pem(server_key))
    paths.self_signed_certificate.write_bytes(_pem(self_signed))
    paths.self_signed_key.write_bytes(_key_pem(self_signed_key))
    return paths


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _issue(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer_key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    *,
    is_ca: bool = False,
    path_length: int | None = None,
    serial_number: int | None = None,
) -> x509.Certificate:
    """Issue a certificate for ``name`` signed by ``issuer`` (self-signed when None)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(serial_number or x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=path_length), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    if is_ca:
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
        builder = builder.add_extension(usage, critical=True)
    else:
        san = x509.SubjectAlternativeName([x509.DNSName(name), x509.IPAddress(LOOPBACK)])
        builder = builder.add_extension(san, critical=False).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
