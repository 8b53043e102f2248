"""Unit tests of the outbound TLS policy: which level applies, and what a level means."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twistedrelay.config import TLS_LEVELS, ConfigError
from twistedrelay.testing.certs import make_test_certificates
from twistedrelay.tls import ClientTLS, ClientTLSOptions, tls_level_for

POLICY = {
    "example.com": "verify",
    ".example.com": "encrypt",
    "legacy.example.org": "none",
    ".org": "may",
}


@pytest.mark.parametrize(
    ("destination", "level"),
    [
        ("example.com", "verify"),
        ("EXAMPLE.COM.", "verify"),
        ("mx.example.com", "encrypt"),
        ("a.b.example.com", "encrypt"),
        ("legacy.example.org", "none"),
        ("other.example.org", "may"),
        ("example.net", "encrypt-default"),
        ("notexample.com", "encrypt-default"),
    ],
)
def test_most_specific_policy_key_wins(destination: str, level: str):
    """Exact names beat .parent keys, nearer parents beat farther ones, else the default."""
    assert tls_level_for(destination, "encrypt-default", POLICY) == level


@given(st.from_regex(r"[a-z0-9]{1,10}(\.[a-z0-9]{1,10}){0,3}", fullmatch=True))
def test_empty_policy_always_gives_the_default(destination: str):
    """Without overrides every destination gets delivery.tls."""
    assert tls_level_for(destination, "may", {}) == "may"


@pytest.mark.parametrize(
    ("level", "offers", "requires", "verifies"),
    [
        ("none", False, False, False),
        ("may", True, False, False),
        ("encrypt", True, True, False),
        ("verify", True, True, True),
    ],
)
def test_levels_mean_what_the_docs_say(level, offers, requires, verifies, tmp_path: Path):
    """Each level offers, requires and verifies TLS as documented."""
    certs = make_test_certificates(tmp_path)
    options = ClientTLS(certs.ca_certificate).options_for("mx.example.test", level)
    assert (options.offers_tls, options.requires_tls, options.verifies) == (
        offers,
        requires,
        verifies,
    )
    assert (options.creator is None) == (level == "none")


def test_all_config_levels_are_handled(tmp_path: Path):
    """Every level config.py accepts builds options; an unknown one is a ValueError."""
    client = ClientTLS(make_test_certificates(tmp_path).ca_certificate)
    assert {client.options_for("h.example", level).level for level in TLS_LEVELS} == set(TLS_LEVELS)
    with pytest.raises(ValueError, match="unknown TLS level"):
        client.options_for("h.example", "maybe")


def test_delivery_log_wording():
    """The log says whether TLS was used and whether it was verified."""
    assert ClientTLSOptions("verify", None).describe(tls_used=True) == "TLS used and verified"
    assert ClientTLSOptions("may", None).describe(tls_used=True) == "TLS used, not verified"
    assert ClientTLSOptions("may", None).describe(tls_used=False) == "no TLS"


def test_bad_ca_file_names_key_and_file(tmp_path: Path):
    """A missing or empty ca_file is a config error naming delivery.ca_file and the path."""
    with pytest.raises(ConfigError, match=r"^relay.toml: delivery.ca_file: cannot read .*nope"):
        ClientTLS(tmp_path / "nope", "relay.toml")
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    with pytest.raises(ConfigError, match=r"delivery.ca_file: .*empty.pem: no PEM certificate"):
        ClientTLS(empty, "relay.toml")
