"""The dkim_sign plugin: signatures that dkimpy verifies against a TXT record."""

from __future__ import annotations

import base64
import importlib.util
from pathlib import Path
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.internet import defer, task

from twistedrelay.config import ConfigError, PluginsConfig
from twistedrelay.hooks import DataContext, HookRunner, Verdict, load_plugins

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: quarterly report\r\n"
    b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"Message-ID: <1@example.org>\r\n"
    b"\r\n"
    b"Numbers attached.\r\n"
)

requires_nacl = pytest.mark.skipif(
    importlib.util.find_spec("nacl") is None, reason="PyNaCl is needed for ed25519-sha256"
)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def write_pem(path: Path, key: Any, fmt: serialization.PrivateFormat) -> str:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    )
    return str(path)


def txt_record(key: Any) -> bytes:
    """The DKIM key record (RFC 6376 §3.6.1) publishing ``key``'s public half."""
    public = key.public_key()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return b"v=DKIM1; k=ed25519; p=" + base64.b64encode(raw)
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


def dns(records: dict[str, bytes]):
    """A dnsfunc for dkim.verify answering TXT queries from a dict."""

    def lookup(name: bytes, timeout: float = 5) -> bytes | None:
        return records.get(name.decode("ascii").rstrip("."))

    return lookup


def load(settings: dict[str, Any], **kwargs: Any) -> HookRunner:
    config = PluginsConfig(enabled=("dkim_sign",), settings={"dkim_sign": settings})
    return load_plugins(config, task.Clock(), "relay.toml", **kwargs)


def sign(runner: HookRunner, message: bytes = MESSAGE):
    """Run the data hook on ``message`` and return (decision, the message as delivered)."""
    header_section = message.split(b"\r\n\r\n", 1)[0].decode()
    headers = tuple(
        (name, value.strip())
        for name, _, value in (line.partition(":") for line in header_section.split("\r\n"))
    )
    ctx = DataContext(
        sender="alice@example.org",
        recipients=("bob@example.net",),
        headers=headers,
        size=len(message),
        message_reader=lambda: message,
    )
    results: list[Any] = []
    runner.run("data", ctx).addBoth(results.append)
    decision = results[0]
    delivered = "".join(decision.header_lines()).encode("ascii") + message
    return decision, delivered, ctx


@pytest.mark.parametrize(
    "fmt", [serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL]
)
def test_an_rsa_signature_verifies_against_the_published_key(tmp_path, rsa_key, fmt):
    """The added DKIM-Signature verifies with dkimpy for PKCS#8 and PKCS#1 key files."""
    key_file = write_pem(tmp_path / "key.pem", rsa_key, fmt)
    runner = load({"domain": "example.org", "selector": "s1", "private_key": key_file})
    decision, delivered, ctx = sign(runner)
    assert decision.verdict is Verdict.PROCEED
    assert [name for name, _ in decision.add_headers] == ["DKIM-Signature"]
    assert b"d=example.org;" in delivered and b"s=s1;" in delivered
    assert dkim.verify(delivered, dnsfunc=dns({"s1._domainkey.example.org": txt_record(rsa_key)}))
    assert ctx.results.format() == "dkim_sign:signed d=example.org s=s1"


def test_a_changed_body_no_longer_verifies(tmp_path, rsa_key):
    """The signature covers the body: changing it after signing breaks verification."""
    key_file = write_pem(tmp_path / "key.pem", rsa_key, serialization.PrivateFormat.PKCS8)
    runner = load({"domain": "example.org", "selector": "s1", "private_key": key_file})
    _, delivered, _ = sign(runner)
    tampered = delivered.replace(b"Numbers attached.", b"Numbers changed.")
    assert not dkim.verify(
        tampered, dnsfunc=dns({"s1._domainkey.example.org": txt_record(rsa_key)})
    )


def test_the_domains_table_picks_the_key_of_the_from_domain(tmp_path, rsa_key):
    """With several domains, the From: domain's selector and key are used (subdomains too)."""
    other = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    settings = {
        "domains": {
            "example.org": {
                "selector": "org",
                "private_key": write_pem(
                    tmp_path / "org.pem", rsa_key, serialization.PrivateFormat.PKCS8
                ),
            },
            "example.com": {
                "selector": "com",
                "private_key": write_pem(
                    tmp_path / "com.pem", other, serialization.PrivateFormat.PKCS8
                ),
            },
        },
        "headers": ["From", "Subject"],
    }
    runner = load(settings)
    message = MESSAGE.replace(b"alice@example.org", b"alice@mail.example.com")
    _, delivered, _ = sign(runner, message)
    assert b"d=example.com;" in delivered and b"s=com;" in delivered
    assert b"h=from : subject;" in delivered
    assert dkim.verify(
        delivered, dnsfunc=dns({"com._domainkey.example.com": txt_record(other)}), minkey=1024
    )


def test_mail_from_a_domain_without_a_key_is_not_signed(tmp_path, rsa_key):
    """A From: domain with no configured key proceeds unsigned and says why."""
    key_file = write_pem(tmp_path / "key.pem", rsa_key, serialization.PrivateFormat.PKCS8)
    runner = load({"domain": "example.org", "selector": "s1", "private_key": key_file})
    decision, _, ctx = sign(runner, MESSAGE.replace(b"alice@example.org", b"alice@example.info"))
    assert decision.add_headers == ()
    assert ctx.results.format() == "dkim_sign:not signed: no key for example.info"


def test_signing_uses_the_relay_thread_pool_when_offered(tmp_path, rsa_key):
    """When the relay offers run_in_thread, signing goes through it."""
    calls: list[str] = []

    def run_in_thread(function, *args):
        calls.append(function.__name__)
        return defer.succeed(function(*args))

    key_file = write_pem(tmp_path / "key.pem", rsa_key, serialization.PrivateFormat.PKCS8)
    runner = load(
        {"domain": "example.org", "selector": "s1", "private_key": key_file},
        run_in_thread=run_in_thread,
    )
    decision, _, _ = sign(runner)
    assert calls == ["sign"] and decision.add_headers


@requires_nacl
def test_an_ed25519_signature_verifies(tmp_path):
    """ed25519-sha256 (RFC 8463) signatures verify against a k=ed25519 record."""
    key = ed25519.Ed25519PrivateKey.generate()
    key_file = write_pem(tmp_path / "ed.pem", key, serialization.PrivateFormat.PKCS8)
    runner = load(
        {
            "domain": "example.org",
            "selector": "ed",
            "private_key": key_file,
            "algorithm": "ed25519-sha256",
        }
    )
    _, delivered, _ = sign(runner)
    assert b"a=ed25519-sha256;" in delivered
    assert dkim.verify(delivered, dnsfunc=dns({"ed._domainkey.example.org": txt_record(key)}))


@pytest.mark.skipif(importlib.util.find_spec("nacl") is not None, reason="PyNaCl is installed")
def test_ed25519_without_pynacl_is_a_clear_config_error(tmp_path):
    """Without PyNaCl an ed25519 key is refused at start-up with the fix in the message."""
    key = ed25519.Ed25519PrivateKey.generate()
    key_file = write_pem(tmp_path / "ed.pem", key, serialization.PrivateFormat.PKCS8)
    with pytest.raises(ConfigError, match="pynacl") as e:
        load(
            {
                "domain": "example.org",
                "selector": "ed",
                "private_key": key_file,
                "algorithm": "ed25519-sha256",
            }
        )
    assert e.value.key == "plugins.dkim_sign.private_key"


@pytest.mark.parametrize(
    "settings, key",
    [
        ({"domain": "example.org", "selector": "s1"}, "private_key"),
        (
            {"domain": "example.org", "selector": "s1", "private_key": "/nonexistent/key.pem"},
            "private_key",
        ),
        (
            {
                "domain": "example.org",
                "selector": "s1",
                "private_key": "KEY",
                "algorithm": "rsa-sha1",
            },
            "algorithm",
        ),
        (
            {
                "domain": "example.org",
                "selector": "s1",
                "private_key": "KEY",
                "headers": ["Subject"],
            },
            "headers",
        ),
        (
            {"domain": "example.org", "selector": "s1", "private_key": "KEY", "canon": "simple"},
            "canon",
        ),
        ({"domains": {"example.org": {"selector": "s1"}}}, "domains.example.org.private_key"),
        (
            {"domains": {"example.org": {"selector": "s1", "private_key": "KEY", "x": 1}}},
            "domains.example.org.x",
        ),
        ({"domain": "exämple.org", "selector": "s1", "private_key": "KEY"}, "domain"),
        ({}, "domain"),
    ],
)
def test_bad_settings_are_config_errors_naming_the_key(tmp_path, rsa_key, settings, key):
    """Unknown keys, missing or unreadable keys and bad values name plugins.dkim_sign.<key>."""
    key_file = write_pem(tmp_path / "key.pem", rsa_key, serialization.PrivateFormat.PKCS8)

    def fill(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        return key_file if value == "KEY" else value

    with pytest.raises(ConfigError) as e:
        load(fill(settings))
    assert e.value.key == f"plugins.dkim_sign.{key}"


def test_a_file_that_is_not_a_key_is_refused(tmp_path):
    """A private_key file without a PEM key is refused at start-up."""
    (tmp_path / "key.pem").write_text("not a key\n")
    with pytest.raises(ConfigError, match="not an RSA private key"):
        load({"domain": "example.org", "selector": "s1", "private_key": str(tmp_path / "key.pem")})
