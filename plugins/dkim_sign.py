"""DKIM signing (RFC 6376) of outgoing mail at the data hook, with dkimpy.

Signs for the domain of the message's ``From:`` header, the domain DMARC aligns with. A key
configured for ``example.org`` also signs mail from its subdomains (``d=example.org``,
which DMARC's relaxed alignment accepts); the most specific configured domain wins. A
message without a parseable ``From:`` address, or from a domain without a key, is passed on
unsigned (and says so in the log line's results). The signature is returned as an added
``DKIM-Signature`` header; the stored body is never rewritten.

Canonicalization is relaxed/relaxed (RFC 6376 §3.4.2, §3.4.4), which survives the header
refolding and trailing-whitespace changes of other relays. List this plugin after every
plugin that adds or drops headers, and never drop a header it signs.

Needs the optional ``dkim`` extra (``pip install 'twistedrelay[dkim]'``: dkimpy, and PyNaCl
for ``ed25519-sha256``). Signing is done in the relay's thread pool when it
offers one (dkimpy's RSA is pure Python: about 6 ms per message, plus hashing the body).

Settings (``[plugins.dkim_sign]``), one domain::

    domain = "example.org"
    selector = "s1"
    private_key = "/etc/twistedrelay/dkim/example.org.pem"
    algorithm = "rsa-sha256"            # or "ed25519-sha256"; default rsa-sha256
    headers = ["From", "To", "Subject", "Date", "Message-ID"]   # default: dkimpy's list

or several (``algorithm`` may also be set per domain)::

    [plugins.dkim_sign.domains]
    "example.org" = { selector = "s1", private_key = "/etc/dkim/example.org.pem" }
    "example.net" = { selector = "ed1", private_key = "/etc/dkim/example.net.key",
                      algorithm = "ed25519-sha256" }

RSA keys are PEM files (PKCS#1 or PKCS#8); Ed25519 keys are a PEM file or the base64 seed
that dkimpy's ``dknewkey`` writes.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twistedrelay.hooks import (
    DataContext,
    Decision,
    PluginEnvironment,
    SettingsError,
    check_settings,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

ALGORITHMS = ("rsa-sha256", "ed25519-sha256")
_DOMAIN_KEYS = {"selector", "private_key", "algorithm"}
_SIGNATURE_PREFIX = b"DKIM-Signature: "


@dataclass(frozen=True, slots=True)
class SigningKey:
    """What signs for one domain: ``d=domain``, ``s=selector``, the key and ``a=``."""

    domain: str
    selector: str
    private_key: bytes
    algorithm: str


def _require_dkim() -> Any:  # Any: the dkim module, imported only when needed
    try:
        import dkim
    except ImportError:
        raise ImportError("dkim_sign needs dkimpy: pip install 'twistedrelay[dkim]'") from None
    return dkim


def _string(key: str, value: Any) -> str:  # Any: a raw TOML value
    if not isinstance(value, str) or not value:
        raise SettingsError(key, f"expected a non-empty string, got {value!r}")
    return value


def _read_key(key: str, path: str, algorithm: str) -> bytes:
    """Read a private key file into the form dkimpy wants for ``algorithm``."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SettingsError(key, f"cannot read {path}: {e.strerror}") from None
    try:
        return _normalise_key(data, algorithm)
    except ValueError as e:
        raise SettingsError(key, f"{path}: {e}") from None


def _normalise_key(data: bytes, algorithm: str) -> bytes:
    dkim = _require_dkim()
    if algorithm == "ed25519-sha256":
        try:
            import nacl.encoding
            import nacl.signing
        except ImportError:
            raise ValueError("ed25519-sha256 needs PyNaCl: pip install pynacl") from None
        if b"-----BEGIN" in data:
            data = _pem_to_ed25519_seed(data)
        try:
            nacl.signing.SigningKey(data.strip(), encoder=nacl.encoding.Base64Encoder)
        except (ValueError, TypeError, binascii.Error) as e:
            raise ValueError(f"not an Ed25519 private key: {e}") from None
        return data.strip()
    if b"-----BEGIN PRIVATE KEY-----" in data:
        data = _pkcs8_to_pkcs1(data)
    try:
        dkim.crypto.parse_pem_private_key(data)
    except dkim.crypto.UnparsableKeyError as e:
        raise ValueError(f"not an RSA private key in PEM: {e}") from None
    return data


def _load_pem(data: bytes) -> PrivateKeyTypes:
    try:
        from cryptography.hazmat.primitives.serialization import load_pem_private_key
    except ImportError:
        raise ValueError("PKCS#8 keys need the cryptography package") from None
    return load_pem_private_key(data, password=None)


def _pkcs8_to_pkcs1(data: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization

    key = _load_pem(data)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _pem_to_ed25519_seed(data: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization

    raw = _load_pem(data).private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )
    return base64.b64encode(raw)


def _domain(key: str, value: Any) -> str:  # Any: a raw TOML value
    domain = _string(key, value).lower().rstrip(".")
    # d= is ASCII (RFC 6376 §3.5); internationalised domains are given as A-labels.
    if not domain.isascii() or "." not in domain or " " in domain:
        raise SettingsError(key, f"expected a domain name in ASCII (A-labels), got {value!r}")
    return domain


def _algorithm(key: str, value: Any) -> str:  # Any: a raw TOML value
    if value not in ALGORITHMS:
        raise SettingsError(key, f"expected one of {', '.join(ALGORITHMS)}, got {value!r}")
    return str(value)


def setup(settings: Mapping[str, Any], environment: PluginEnvironment) -> DKIMSign:
    """Read the keys of ``[plugins.dkim_sign]``.

    :raises SettingsError: an unknown key, a missing or unreadable key file, a bad domain.
    :raises ImportError: dkimpy (or PyNaCl for Ed25519) is not installed.
    """
    _require_dkim()
    check_settings(
        settings, {"domain", "selector", "private_key", "algorithm", "headers", "domains"}
    )
    default_algorithm = _algorithm("algorithm", settings.get("algorithm", "rsa-sha256"))
    keys: dict[str, SigningKey] = {}
    single = [k for k in ("domain", "selector", "private_key") if k in settings]
    if single:
        for key in ("domain", "selector", "private_key"):
            if key not in settings:
                raise SettingsError(key, "missing (domain, selector and private_key go together)")
        domain = _domain("domain", settings["domain"])
        keys[domain] = SigningKey(
            domain,
            _string("selector", settings["selector"]),
            _read_key(
                "private_key", _string("private_key", settings["private_key"]), default_algorithm
            ),
            default_algorithm,
        )
    domains = settings.get("domains", {})
    if not isinstance(domains, Mapping):
        raise SettingsError("domains", f"expected a table of domain = {{...}}, got {domains!r}")
    for name, table in domains.items():
        prefix = f"domains.{name}"
        if not isinstance(table, Mapping):
            raise SettingsError(prefix, f"expected a table, got {table!r}")
        try:
            check_settings(table, _DOMAIN_KEYS)
        except SettingsError as e:
            raise SettingsError(f"{prefix}.{e.key}", e.problem) from None
        for key in ("selector", "private_key"):
            if key not in table:
                raise SettingsError(f"{prefix}.{key}", "missing")
        domain = _domain(prefix, name)
        if domain in keys:
            raise SettingsError(prefix, "configured twice")
        algorithm = _algorithm(f"{prefix}.algorithm", table.get("algorithm", default_algorithm))
        path = _string(f"{prefix}.private_key", table["private_key"])
        keys[domain] = SigningKey(
            domain,
            _string(f"{prefix}.selector", table["selector"]),
            _read_key(f"{prefix}.private_key", path, algorithm),
            algorithm,
        )
    if not keys:
        raise SettingsError("domain", "missing: set domain/selector/private_key or domains")
    headers = settings.get("headers")
    if headers is not None:
        if not isinstance(headers, list) or not all(isinstance(h, str) and h for h in headers):
            raise SettingsError("headers", f"expected a list of header names, got {headers!r}")
        # RFC 6376 §5.4: the From header field MUST be signed.
        if "from" not in (h.lower() for h in headers):
            raise SettingsError("headers", "must include From (RFC 6376 §5.4)")
    return DKIMSign(environment, keys, headers)


class DKIMSign:
    """The data hook that adds a DKIM-Signature for the From: domain."""

    def __init__(
        self,
        environment: PluginEnvironment,
        keys: Mapping[str, SigningKey],
        headers: list[str] | None,
    ) -> None:
        self.name = environment.name
        self.keys = dict(keys)
        self.headers = None if headers is None else [h.lower().encode("ascii") for h in headers]
        self._run_in_thread = environment.run_in_thread

    def key_for(self, domain: str) -> SigningKey | None:
        """The key for ``domain`` or its nearest configured parent domain."""
        labels = domain.lower().rstrip(".").split(".")
        for i in range(len(labels) - 1):
            key = self.keys.get(".".join(labels[i:]))
            if key is not None:
                return key
        return None

    async def hook_data(self, ctx: DataContext) -> Decision:
        """Sign the stored message for its From: domain, if there is a key for it."""
        domain = from_domain(ctx.header_values("From"))
        if domain is None:
            ctx.results.add(self.name, "not signed: no From address")
            return Decision.proceed()
        key = self.key_for(domain)
        if key is None:
            ctx.results.add(self.name, f"not signed: no key for {domain}")
            return Decision.proceed()
        if self._run_in_thread is None:
            value = sign(ctx.read_message(), key, self.headers)
        else:
            value = await self._run_in_thread(sign, ctx.read_message(), key, self.headers)
        ctx.results.add(self.name, f"signed d={key.domain} s={key.selector}")
        return Decision.add_header("DKIM-Signature", value)


def from_domain(from_values: list[str]) -> str | None:
    """The domain of the first address in the first From: header, or None."""
    if not from_values:
        return None
    for _, address in email.utils.getaddresses(from_values[:1]):
        _, at, domain = address.rpartition("@")
        if at and domain and "." in domain:
            return domain.lower().rstrip(".")
    return None


def sign(message: bytes, key: SigningKey, headers: list[bytes] | None) -> str:
    """The DKIM-Signature header value (folded, without the name) for ``message``.

    :raises dkim.DKIMException: the message cannot be signed (e.g. malformed headers).
    """
    dkim = _require_dkim()
    field: bytes = dkim.sign(
        message,
        key.selector.encode("ascii"),
        key.domain.encode("ascii"),
        key.private_key,
        canonicalize=(b"relaxed", b"relaxed"),
        signature_algorithm=key.algorithm.encode("ascii"),
        include_headers=headers,
    )
    return field.removeprefix(_SIGNATURE_PREFIX).removesuffix(b"\r\n").decode("ascii")
