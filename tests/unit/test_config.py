"""Config contract: every key of DESIGN.md parses, and every error names the file and key."""

import ipaddress
from pathlib import Path

import pytest

from twistedrelay.config import ConfigError, Endpoint, load_config, parse_config
from twistedrelay.routing import NextHop

CONTRACT_TOML = """
hostname = "relay.example.test"

[smtp]
listen = ["127.0.0.1:2525"]
max_message_size = 36700160
max_recipients = 1000

[relay]
mynetworks = ["127.0.0.0/8", "::1/128"]
domains = []

[queue]
directory = "var/queue"

[workers]
count = 0

[delivery]
routes = { "example.net" = "127.0.0.1:2600", "*" = "smarthost.example:587" }
smtp_port = 25
minimal_backoff = 300
maximal_backoff = 4000
maximal_queue_lifetime = 432000

[dns]
nameservers = []

[metrics]
listen = "127.0.0.1:9464"
"""


def test_design_contract_example_parses(tmp_path: Path) -> None:
    """The example of DESIGN.md's config contract loads with the values it states."""
    path = tmp_path / "relay.toml"
    path.write_text(CONTRACT_TOML)
    config = load_config(path)
    assert config.hostname == "relay.example.test"
    assert config.smtp.listen == (Endpoint("127.0.0.1", 2525),)
    assert config.smtp.max_message_size == 36700160
    assert config.relay.mynetworks == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert config.delivery.routes == {
        "example.net": NextHop("127.0.0.1", 2600, mx_lookup=False),
        "*": NextHop("smarthost.example", 587, mx_lookup=True),
    }
    assert config.delivery.maximal_queue_lifetime == 432000
    assert config.metrics.listen == Endpoint("127.0.0.1", 9464)
    assert config.worker_count >= 1
    assert config.source == str(path)


def test_embedded_default() -> None:
    """No --config: loopback 2525, queue in ./var/queue, metrics on 9464, delivery by MX."""
    config = load_config(None)
    assert config.smtp.listen == (Endpoint("127.0.0.1", 2525),)
    assert str(config.queue.directory) == "var/queue"
    assert config.metrics.listen == Endpoint("127.0.0.1", 9464)
    assert config.delivery.routes == {}


def test_postmaster_mailbox_defaults_to_the_relays_hostname() -> None:
    """<postmaster> goes to relay.postmaster, or to postmaster@hostname when it is unset."""
    assert parse_config({"hostname": "relay.test"}, "r.toml").postmaster == "postmaster@relay.test"
    configured = parse_config(
        {"hostname": "relay.test", "relay": {"postmaster": "ops@example.org"}}, "r.toml"
    )
    assert configured.postmaster == "ops@example.org"


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("bogus = 1", "bogus"),
        ("[smtp]\nlisten = ['127.0.0.1']", "smtp.listen"),
        ("[smtp]\nmax_recipients = '10'", "smtp.max_recipients"),
        ("[smtp]\nmax_recipients = true", "smtp.max_recipients"),
        ("[smtp]\nunknown = 1", "smtp.unknown"),
        ("[relay]\nmynetworks = ['10.0.0.0/33']", "relay.mynetworks"),
        ("[relay]\ndomains = ['not a domain']", "relay.domains"),
        ("[relay]\npostmaster = 'postmaster'", "relay.postmaster"),
        ("[smtp]\nmax_text_line_length = 998", "smtp.max_text_line_length"),
        ("[plugins]\nhook_timeout = 0", "plugins.hook_timeout"),
        ("[delivery]\nroutes = { 'x.test' = '[host' }", "delivery.routes"),
        ("[delivery]\nminimal_backoff = 5000", "delivery.minimal_backoff"),
        ("[delivery]\ntls = 'sometimes'", "delivery.tls"),
        ("[delivery]\nchunking = 'no'", "delivery.chunking"),
        ("[dns]\nnameservers = ['ns.example:53']", "dns.nameservers"),
        ("[metrics]\nlisten = 9464", "metrics.listen"),
        ("[workers]\ncount = -1", "workers.count"),
        ("smtp = 1", "smtp"),
    ],
)
def test_bad_values_name_file_and_key(tmp_path: Path, toml: str, key: str) -> None:
    """A wrong kind of value or an unknown key stops start-up with file and key named."""
    path = tmp_path / "relay.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert raised.value.key == key
    assert str(raised.value).startswith(f"{path}: {key}: ")
    assert "\n" not in str(raised.value)


def test_unreadable_and_invalid_toml_name_the_file(tmp_path: Path) -> None:
    """A missing file or broken TOML is a config error naming the file."""
    with pytest.raises(ConfigError, match="missing.toml: cannot read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[smtp\n")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_config(bad)


def test_plugin_tables_pass_through() -> None:
    """[plugins.NAME] tables reach the plugins as dicts, in the enabled order."""
    config = parse_config(
        {"plugins": {"enabled": ["rate_limit"], "rate_limit": {"per_client": {"messages": 1}}}},
        "relay.toml",
    )
    assert config.plugins.enabled == ("rate_limit",)
    assert config.plugins.settings["rate_limit"] == {"per_client": {"messages": 1}}
