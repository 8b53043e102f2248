"""TLS contexts: the inbound server context ([tls]) and the outbound policy ([delivery] tls).

Owns every OpenSSL setting the relay uses, so that protocol versions, ciphers and
verification are decided in one place. It does not speak SMTP: the server and client
protocols call ``transport.startTLS`` with the objects made here.

Invariants: inbound TLS is never older than TLS 1.2; a failed certificate reload leaves the
previous certificate in service; an outbound connection is reported as verified only when
the chain and the host name were checked (RFC 7435: opportunistic TLS authenticates
nothing).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import interfaces, ssl

# IOpenSSLTrustRoot is what ssl.platformTrust() returns; Twisted exports it only here.
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from twistedrelay.config import ConfigError

# TLS 1.2: forward secrecy and AEAD only (ECDHE with AES-GCM or ChaCha20-Poly1305), as in
# Mozilla's "intermediate" profile. TLS 1.3 suites are OpenSSL's defaults, all of them AEAD.
SERVER_CIPHERS_TLS12 = b"ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"

# Options for every server context: no compression (CRIME), no renegotiation (client-
# initiated renegotiation is a cheap CPU attack), and our cipher order, not the client's.
_SERVER_OPTIONS = SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_CIPHER_SERVER_PREFERENCE


#: The private key types OpenSSL can sign a handshake with (pyOpenSSL's use_privatekey).
SIGNING_KEY_TYPES = (
    dsa.DSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
    rsa.RSAPrivateKey,
)


@implementer(interfaces.IOpenSSLServerConnectionCreator)
class ServerTLS:
    """The inbound TLS context, for STARTTLS and for implicit TLS (port 465).

    Pass the instance itself to ``transport.startTLS(server_tls)``, to
    ``SSL4ServerEndpoint(reactor, port, server_tls)`` or to ``TLSMemoryBIOFactory``. Each new
    connection uses the context current at its start, so :meth:`reload` affects only new
    connections.
    """

    def __init__(self, certificate: Path, private_key: Path, source: str) -> None:
        """Load the certificate chain and key.

        :param certificate: PEM file: the server certificate, then any intermediates.
        :param private_key: PEM file with the unencrypted private key.
        :param source: the config file name, for error messages.
        :raises ConfigError: a file cannot be read or parsed, or the key does not match.
        """
        self.certificate = certificate
        self.private_key = private_key
        self.source = source
        self._context = self._build_context()

    def reload(self) -> None:
        """Re-read both files (on SIGHUP); on any error keep the current context.

        :raises ConfigError: naming the file that is wrong; the old certificate stays in use.
        """
        self._context = self._build_context()

    def serverConnectionForTLS(self, tls_protocol: TLSMemoryBIOProtocol) -> SSL.Connection:  # noqa: N802
        """Twisted's IOpenSSLServerConnectionCreator: one connection on the current context."""
        return SSL.Connection(self._context, None)

    def _build_context(self) -> SSL.Context:
        chain = self._read_chain()
        key = self._read_key()
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_options(_SERVER_OPTIONS)
        context.set_cipher_list(SERVER_CIPHERS_TLS12)
        # A session ID context lets clients resume sessions (OpenSSL refuses without one).
        context.set_session_id(b"twistedrelay")
        try:
            context.use_certificate(chain[0])
            for intermediate in chain[1:]:
                context.add_extra_chain_cert(intermediate)
        except SSL.Error as e:
            # e.g. a key too weak for OpenSSL's security level
            raise ConfigError(
                self.source, "tls.certificate", f"{self.certificate}: {_ssl_reason(e)}"
            ) from None
        if not isinstance(key, SIGNING_KEY_TYPES):
            raise ConfigError(
                self.source, "tls.private_key", f"{self.private_key}: unsupported key type"
            )
        try:
            context.use_privatekey(key)
            context.check_privatekey()
        except SSL.Error as e:
            raise ConfigError(
                self.source,
                "tls.private_key",
                f"{self.private_key} does not match {self.certificate} ({_ssl_reason(e)})",
            ) from None
        return context

    def _read_chain(self) -> list[x509.Certificate]:
        data = _read(self.certificate, self.source, "tls.certificate")
        try:
            return x509.load_pem_x509_certificates(data)
        except ValueError:
            raise ConfigError(
                self.source,
                "tls.certificate",
                f"{self.certificate}: no PEM certificate found",
            ) from None

    def _read_key(self) -> PrivateKeyTypes:
        data = _read(self.private_key, self.source, "tls.private_key")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            # TypeError: the key is encrypted; the relay cannot ask for a passphrase.
            raise ConfigError(
                self.source,
                "tls.private_key",
                f"{self.private_key}: not an unencrypted PEM private key ({e})",
            ) from None
        return key


def _read(path: Path, source: str, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(source, key, f"cannot read {path}: {e.strerror or e}") from None


def _ssl_reason(error: SSL.Error) -> str:
    reasons = [part[2] for part in error.args[0] if len(part) == 3] if error.args else []
    return ", ".join(str(r) for r in reasons) or str(error)


def describe_tls(transport: object) -> str | None:
    """Describe the TLS session of a connection, for the Received header and the logs.

    :returns: e.g. ``"TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)"``, or None
        when the transport is not (yet) encrypted.
    """
    handle = _ssl_handle(transport)
    if handle is None:
        return None
    cipher = handle.get_cipher_name()
    if cipher is None:
        return None
    bits = handle.get_cipher_bits()
    # Postfix's form "(secret/algorithm bits)"; OpenSSL's secret bits equal the algorithm's
    # bits for every cipher we allow.
    return f"{handle.get_protocol_version_name()} with cipher {cipher} ({bits}/{bits} bits)"


def tls_version(transport: object) -> str | None:
    """The TLS version of a connection once its handshake is done, e.g. ``"TLSv1.3"``.

    :returns: None when the transport is not encrypted or the handshake has not completed.
    """
    handle = _ssl_handle(transport)
    if handle is None or handle.get_cipher_name() is None:
        return None
    return str(handle.get_protocol_version_name())


def _ssl_handle(transport: object) -> SSL.Connection | None:
    get_handle = getattr(transport, "getHandle", None)
    handle = get_handle() if get_handle is not None else None
    return handle if isinstance(handle, SSL.Connection) else None


# -- outbound ------------------------------------------------------------------------------


def tls_level_for(destination_name: str, default: str, policy: Mapping[str, str]) -> str:
    """The outbound TLS level for a destination (``delivery.tls`` and ``delivery.tls_policy``).

    The most specific key wins: the exact name, then ``.parent`` keys that match any
    subdomain (``.example.com`` matches ``mx.example.com``, as in Postfix's tls_policy).

    :param destination_name: the destination domain (or next-hop host name).
    :param default: ``delivery.tls``.
    :param policy: ``delivery.tls_policy``, keys in lower case.
    :returns: one of ``none``, ``may``, ``encrypt``, ``verify``.
    """
    name = destination_name.lower().rstrip(".")
    if name in policy:
        return policy[name]
    labels = name.split(".")
    for i in range(1, len(labels)):
        parent = "." + ".".join(labels[i:])
        if parent in policy:
            return policy[parent]
    return default


VERIFICATION_ERRORS = (SSL.Error, VerificationError)
"""How a failed outbound handshake shows in ``connectionLost``: a bad chain is an
``SSL.Error``, a certificate that does not name the mail host a ``VerificationError``."""


@dataclass(frozen=True, slots=True)
class ClientTLSOptions:
    """What to do about TLS on one outbound connection."""

    level: str
    """``none``, ``may``, ``encrypt`` or ``verify``."""
    creator: interfaces.IOpenSSLClientConnectionCreator | None
    """Pass to ``transport.startTLS``; None when the level is ``none``."""

    @property
    def offers_tls(self) -> bool:
        """Whether to issue STARTTLS when the server offers it."""
        return self.level != "none"

    @property
    def requires_tls(self) -> bool:
        """Whether a server without STARTTLS (or a failed handshake) defers the delivery."""
        return self.level in ("encrypt", "verify")

    @property
    def verifies(self) -> bool:
        """Whether a completed handshake proves the chain and the host name were verified."""
        return self.level == "verify"

    def describe(self, tls_used: bool) -> str:
        """The delivery log's words: "TLS used and verified", "TLS used, not verified", "no TLS"."""
        if not tls_used:
            return "no TLS"
        return "TLS used and verified" if self.verifies else "TLS used, not verified"

    def log_value(self, version: str | None) -> str:
        """The delivery log's ``tls=`` value, without commas so the line stays key=value.

        :param version: the negotiated version (:func:`tls_version`); None for clear text.
        :returns: ``"none"``, or e.g. ``"TLSv1.3 verified"`` / ``"TLSv1.3 not verified"``.
        """
        if version is None:
            return "none"
        return f"{version} {'verified' if self.verifies else 'not verified'}"


class ClientTLS:
    """Outbound TLS contexts for mail hosts, per the delivery TLS policy.

    ``may`` and ``encrypt`` do not verify the certificate: opportunistic TLS (RFC 7435 §3)
    protects against passive eavesdropping only, and most MX certificates would not verify.
    ``verify`` checks the chain against ``ca_file`` (or the system store) and the mail host
    name with service-identity (RFC 6125); a handshake that fails verification fails.
    """

    def __init__(self, ca_file: Path | None = None, source: str = "") -> None:
        """Load the trust anchors for ``verify``.

        :param ca_file: PEM file of CA certificates; None means the system store.
        :param source: the config file name, for error messages.
        :raises ConfigError: ``ca_file`` cannot be read or holds no certificate.
        """
        self._trust_root = _load_trust_root(ca_file, source)
        # Opportunistic contexts do not depend on the host name, so one serves them all.
        self._unverified_context = ssl.CertificateOptions(verify=False).getContext()

    def options_for(self, hostname: str, level: str) -> ClientTLSOptions:
        """The TLS options for a connection to mail host ``hostname`` at ``level``.

        :param hostname: the MX host name (or IP address) the certificate must name.
        :param level: from :func:`tls_level_for`.
        :raises ValueError: an unknown level.
        """
        if level == "none":
            return ClientTLSOptions(level, None)
        if level in ("may", "encrypt"):
            creator = _UnverifiedClientCreator(self._unverified_context, hostname)
            return ClientTLSOptions(level, creator)
        if level == "verify":
            verifying = ssl.optionsForClientTLS(
                hostname,
                trustRoot=self._trust_root,
                extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2},
            )
            return ClientTLSOptions(level, verifying)
        raise ValueError(f"unknown TLS level {level!r}")


def _load_trust_root(ca_file: Path | None, source: str) -> IOpenSSLTrustRoot:
    if ca_file is None:
        platform: IOpenSSLTrustRoot = ssl.platformTrust()  # unannotated in Twisted
        return platform
    data = _read(ca_file, source, "delivery.ca_file")
    try:
        anchors = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(
            source, "delivery.ca_file", f"{ca_file}: no PEM certificate found"
        ) from None
    trust: IOpenSSLTrustRoot = ssl.trustRootFromCertificates(  # unannotated in Twisted
        [ssl.Certificate.loadPEM(a.public_bytes(serialization.Encoding.PEM)) for a in anchors]
    )
    return trust


@implementer(interfaces.IOpenSSLClientConnectionCreator)
class _UnverifiedClientCreator:
    """An unverified client connection that still sends SNI (some servers select on it)."""

    def __init__(self, context: SSL.Context, hostname: str) -> None:
        self._context = context
        self._hostname = hostname

    def clientConnectionForTLS(self, tls_protocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """Twisted's IOpenSSLClientConnectionCreator: one client connection."""
        connection = SSL.Connection(self._context, None)
        # RFC 6066 §3: SNI carries DNS names only, never an address literal.
        if not _is_ip_address(self._hostname):
            try:
                connection.set_tlsext_host_name(self._hostname.encode("idna"))
            except UnicodeError:
                pass  # a name IDNA cannot encode: go without SNI, as nothing is verified
        connection.set_connect_state()
        return connection


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True
