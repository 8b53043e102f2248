"""Configuration: relay.toml → frozen dataclasses.

Owns the config contract of DESIGN.md: every key, its type and its default. Every error
names the file and the dotted key, and is raised before anything binds a socket. Tables map
one-to-one onto the packages that use them ([smtp] → smtp/, [relay] → policy.py, …). Plugin
tables (``[plugins.NAME]``) are passed through as dicts; each plugin validates its own keys.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from twistedrelay.routing import NextHop, is_ip_address, is_valid_route_key, parse_next_hop
from twistedrelay.smtp.addresses import check_mailbox

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
DEFAULT_CONFIG_NAME = "<embedded default>"


class ConfigError(Exception):
    """A config file that cannot be used; str() is one line naming the file and the key."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        super().__init__(f"{source}: {key}: {problem}" if key else f"{source}: {problem}")
        self.source = source
        self.key = key
        self.problem = problem


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A TCP address to listen on or connect to."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_endpoint(text: str) -> Endpoint:
    """Parse ``host:port`` or ``[v6]:port``.

    :raises ValueError: with a message suitable for a config error.
    """
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":") if rest.startswith(":") else ""
    else:
        host, _, port_text = text.rpartition(":")
    if not host or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise ValueError(f"expected 'host:port', got {text!r}")
    return Endpoint(host, int(port_text))


# -- field converters: (value, key) -> converted value, raising ValueError -------------

# Any, here and in the converters below: a raw value parsed from TOML, of whatever type the
# file held; checking it is each converter's job.
Converter = Callable[[Any], Any]


def _int(minimum: int = 0) -> Converter:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, got {value}")
        return value

    return convert


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number of seconds, got {value!r}")
    if value < 0:
        raise ValueError(f"must not be negative, got {value}")
    return float(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _optional_path(value: Any) -> Path | None:
    return Path(_str(value)) if value != "" else None


def _choice(*options: str) -> Converter:
    def convert(value: Any) -> str:
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {value!r}")
        return str(value)

    return convert


def _list_of(item: Converter) -> Converter:
    def convert(value: Any) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {value!r}")
        return tuple(item(v) for v in value)

    return convert


def _endpoint(value: Any) -> Endpoint:
    return parse_endpoint(_str(value))


def _optional_endpoint(value: Any) -> Endpoint | None:
    return None if _str(value) == "" else parse_endpoint(value)


def _network(value: Any) -> IPNetwork:
    try:
        return ipaddress.ip_network(_str(value), strict=False)
    except ValueError as e:
        raise ValueError(f"not an address or CIDR network: {value!r}") from e


def _domain(value: Any) -> str:
    domain = _str(value).lower().rstrip(".")
    if not is_valid_route_key(domain) or domain == "*":
        raise ValueError(f"not a domain name: {value!r}")
    return domain


def _text_line_limit(value: Any) -> int:
    limit: int = _int(0)(value)
    if 0 < limit < 1000:
        raise ValueError(
            f"expected 0 (no limit) or at least 1000 (RFC 5321 §4.5.3.1.6), got {limit}"
        )
    return limit


def _mailbox(value: Any) -> str:
    mailbox = _str(value)
    if mailbox:
        check_mailbox(mailbox)
    return mailbox


def _routes(value: Any) -> Mapping[str, NextHop]:
    if not isinstance(value, dict):
        raise ValueError(f'expected a table of domain = "next hop", got {value!r}')
    routes = {}
    for key, hop in value.items():
        if not is_valid_route_key(key):
            raise ValueError(f"not a domain, '.domain' or '*': {key!r}")
        try:
            routes[key.lower()] = parse_next_hop(_str(hop))
        except ValueError as e:
            raise ValueError(f"route for {key!r}: {e}") from e
    return routes


TLS_LEVELS = ("none", "may", "encrypt", "verify")


def _tls_policy(value: Any) -> Mapping[str, str]:
    if not isinstance(value, dict):
        raise ValueError(f'expected a table of domain = "level", got {value!r}')
    convert = _choice(*TLS_LEVELS)
    return {k.lower(): convert(v) for k, v in value.items()}


def _nameserver(value: Any) -> Endpoint:
    text = _str(value)
    if is_ip_address(text.strip("[]")):
        return Endpoint(text.strip("[]"), 53)
    endpoint = parse_endpoint(text)
    if not is_ip_address(endpoint.host):
        raise ValueError(f"a nameserver must be an IP address, got {text!r}")
    return endpoint


def _setting(convert: Converter, default: Any = None, **kwargs: Any) -> Any:
    """A dataclass field with its TOML converter in the metadata."""
    if callable(default):
        return field(default_factory=default, metadata={"convert": convert}, **kwargs)
    return field(default=default, metadata={"convert": convert}, **kwargs)


# -- the tables ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SMTPConfig:
    """[smtp]: inbound listeners and the limits of an SMTP session."""

    listen: tuple[Endpoint, ...] = _setting(
        _list_of(_endpoint), lambda: (Endpoint("127.0.0.1", 2525),)
    )
    submission: tuple[Endpoint, ...] = _setting(_list_of(_endpoint), tuple)
    submissions: tuple[Endpoint, ...] = _setting(_list_of(_endpoint), tuple)
    max_message_size: int = _setting(_int(1024), 36700160)
    max_recipients: int = _setting(_int(1), 1000)
    max_received_headers: int = _setting(_int(1), 50)
    max_header_size: int = _setting(_int(1024), 1048576)
    max_line_length: int = _setting(_int(512), 2048)
    max_text_line_length: int = _setting(_text_line_limit, 1000)
    max_errors: int = _setting(_int(1), 20)
    chunking: bool = _setting(_bool, True)
    command_timeout: float = _setting(_seconds, 300.0)
    data_timeout: float = _setting(_seconds, 600.0)
    max_connections: int = _setting(_int(1), 2000)
    max_connections_per_ip: int = _setting(_int(1), 100)
    connection_rate_per_ip: int = _setting(_int(0), 0)


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """[relay]: who may relay where (policy.py)."""

    mynetworks: tuple[IPNetwork, ...] = _setting(
        _list_of(_network),
        lambda: (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
    )
    domains: tuple[str, ...] = _setting(_list_of(_domain), tuple)
    postmaster: str = _setting(_mailbox, "")


@dataclass(frozen=True, slots=True)
class QueueConfig:
    """[queue]: where the queue lives."""

    directory: Path = _setting(lambda v: Path(_str(v)), lambda: Path("var/queue"))


@dataclass(frozen=True, slots=True)
class WorkersConfig:
    """[workers]: the worker processes (process/)."""

    count: int = _setting(_int(0), 0)
    user: str = _setting(_str, "")
    group: str = _setting(_str, "")
    shutdown_timeout: float = _setting(_seconds, 25.0)


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    """[delivery]: routes, retries and the outbound connection pools (delivery/)."""

    routes: Mapping[str, NextHop] = _setting(_routes, dict)
    smtp_port: int = _setting(_int(1), 25)
    minimal_backoff: float = _setting(_seconds, 300.0)
    maximal_backoff: float = _setting(_seconds, 4000.0)
    maximal_queue_lifetime: float = _setting(_seconds, 432000.0)
    destination_concurrency: int = _setting(_int(1), 20)
    connection_reuse_limit: int = _setting(_int(1), 100)
    chunking: bool = _setting(_bool, True)
    idle_timeout: float = _setting(_seconds, 2.0)
    connect_timeout: float = _setting(_seconds, 30.0)
    command_timeout: float = _setting(_seconds, 300.0)
    data_timeout: float = _setting(_seconds, 600.0)
    queue_scan_interval: float = _setting(_seconds, 5.0)
    tls: str = _setting(_choice(*TLS_LEVELS), "may")
    tls_policy: Mapping[str, str] = _setting(_tls_policy, dict)
    ca_file: Path | None = _setting(_optional_path, None)


@dataclass(frozen=True, slots=True)
class DNSConfig:
    """[dns]: the resolver (resolver.py)."""

    nameservers: tuple[Endpoint, ...] = _setting(_list_of(_nameserver), tuple)
    timeout: float = _setting(_seconds, 10.0)


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """[metrics]: the Prometheus endpoint served by the master ("" disables it)."""

    listen: Endpoint | None = _setting(_optional_endpoint, lambda: Endpoint("127.0.0.1", 9464))


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """[tls]: the inbound certificate (STARTTLS and implicit TLS)."""

    certificate: Path | None = _setting(_optional_path, None)
    private_key: Path | None = _setting(_optional_path, None)


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """[auth]: authenticated submission."""

    users_file: Path | None = _setting(_optional_path, None)
    allow_plaintext_on_loopback: bool = _setting(_bool, False)
    restrict_sender: bool = _setting(_bool, False)


@dataclass(frozen=True, slots=True)
class LogConfig:
    """[log]: the mail log's format."""

    format: str = _setting(_choice("text", "json"), "text")


@dataclass(frozen=True, slots=True)
class PluginsConfig:
    """[plugins]: enabled hook plugins, in order, and each one's own settings table."""

    enabled: tuple[str, ...] = ()
    settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # Any: TOML values
    hook_timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class Config:
    """The whole relay configuration; ``source`` names the file it came from."""

    hostname: str
    smtp: SMTPConfig = field(default_factory=SMTPConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    dns: DNSConfig = field(default_factory=DNSConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    log: LogConfig = field(default_factory=LogConfig)
    plugins: PluginsConfig = field(default_factory=PluginsConfig)
    source: str = DEFAULT_CONFIG_NAME

    @property
    def worker_count(self) -> int:
        """``workers.count``, with 0 meaning one per CPU core."""
        return self.workers.count or os.cpu_count() or 1

    @property
    def postmaster(self) -> str:
        """The mailbox that mail to the bare ``<postmaster>`` goes to (RFC 5321 §4.5.1)."""
        return self.relay.postmaster or f"postmaster@{self.hostname}"


_TABLES: dict[str, type] = {
    "smtp": SMTPConfig,
    "relay": RelayConfig,
    "queue": QueueConfig,
    "workers": WorkersConfig,
    "delivery": DeliveryConfig,
    "dns": DNSConfig,
    "metrics": MetricsConfig,
    "tls": TLSConfig,
    "auth": AuthConfig,
    "log": LogConfig,
}


# Any: a raw TOML table in, an instance of ``cls`` (one of the *Config dataclasses) out.
def _build_table(cls: type, data: Any, name: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(source, name, f"expected a table, got {data!r}")
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(source, f"{name}.{key}", "unknown key")
        try:
            kwargs[key] = known[key].metadata["convert"](value)
        except ValueError as e:
            raise ConfigError(source, f"{name}.{key}", str(e)) from None
    return cls(**kwargs)


def _build_plugins(data: Any, source: str) -> PluginsConfig:
    if not isinstance(data, dict):
        raise ConfigError(source, "plugins", f"expected a table, got {data!r}")
    data = dict(data)
    try:
        enabled = _list_of(_str)(data.pop("enabled", []))
    except ValueError as e:
        raise ConfigError(source, "plugins.enabled", str(e)) from None
    try:
        hook_timeout = _seconds(data.pop("hook_timeout", 30.0))
        if hook_timeout <= 0:
            raise ValueError(f"must be more than 0 seconds, got {hook_timeout}")
    except ValueError as e:
        raise ConfigError(source, "plugins.hook_timeout", str(e)) from None
    settings = {}
    for name, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(source, f"plugins.{name}", "unknown key (expected a plugin table)")
        settings[name] = table
    return PluginsConfig(enabled=enabled, settings=settings, hook_timeout=hook_timeout)


def parse_config(data: Mapping[str, Any], source: str) -> Config:
    """Build a Config from parsed TOML.

    :param source: the file name to put in error messages.
    :raises ConfigError: for an unknown key, a value of the wrong kind, or an inconsistency.
    """
    kwargs: dict[str, Any] = {"source": source}
    for key, value in data.items():
        if key == "hostname":
            try:
                kwargs["hostname"] = _domain(value)
            except ValueError as e:
                raise ConfigError(source, "hostname", str(e)) from None
        elif key == "plugins":
            kwargs["plugins"] = _build_plugins(value, source)
        elif key in _TABLES:
            kwargs[key] = _build_table(_TABLES[key], value, key, source)
        else:
            raise ConfigError(source, key, "unknown key")
    kwargs.setdefault("hostname", socket.getfqdn().lower() or "localhost")
    config = Config(**kwargs)
    _check_consistency(config)
    return config


def _check_consistency(config: Config) -> None:
    source = config.source
    if config.delivery.minimal_backoff > config.delivery.maximal_backoff:
        raise ConfigError(source, "delivery.minimal_backoff", "is greater than maximal_backoff")
    tls_files = (config.tls.certificate, config.tls.private_key)
    if any(tls_files) and not all(tls_files):
        raise ConfigError(source, "tls", "certificate and private_key go together")
    if config.smtp.submissions and not config.tls.certificate:
        raise ConfigError(source, "smtp.submissions", "implicit TLS needs tls.certificate")
    if config.smtp.submission and not config.auth.users_file:
        raise ConfigError(source, "smtp.submission", "submission needs auth.users_file")


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read and check a config file; None reads the embedded default.

    :raises ConfigError: the file cannot be read, is not TOML, or breaks the contract.
    """
    if path is None:
        text = resources.files("twistedrelay").joinpath("default.toml").read_text("utf-8")
        source = DEFAULT_CONFIG_NAME
    else:
        source = os.fspath(path)
        try:
            text = Path(path).read_text("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(source, "", f"cannot read: {e}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, "", f"not valid TOML: {e}") from None
    return parse_config(data, source)
