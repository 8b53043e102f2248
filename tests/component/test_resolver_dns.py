"""Resolver against a real DNS server on loopback (testing.dns_server), on the real reactor."""

from __future__ import annotations

import json
import os
import random
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytest_twisted

from twistedrelay.resolver import (
    DNSTemporaryError,
    MailHost,
    NoMailHost,
    NoSuchDomain,
    NullMX,
    Resolver,
)
from twistedrelay.routing import Destination, parse_next_hop
from twistedrelay.testing.dns_server import DNSTestServer

REPO_ROOT = Path(__file__).resolve().parents[2]

ZONE = {
    "example.test": {
        "MX": [[20, "mx2.example.test"], [10, "mx1.example.test"], [30, "mx3.example.test"]],
        "ttl": 60,
    },
    "mx1.example.test": {"A": ["127.0.0.11"], "ttl": 60},
    "mx2.example.test": {"A": ["127.0.0.12"], "AAAA": ["::1"], "ttl": 60},
    "mx3.example.test": {"CNAME": "real-mx3.example.test"},
    "real-mx3.example.test": {"A": ["127.0.0.13"]},
    "equal.test": {"MX": [[10, f"e{i}.equal.test"] for i in range(5)]},
    **{f"e{i}.equal.test": {"A": [f"127.0.1.{i}"]} for i in range(5)},
    "implicit.test": {"A": ["127.0.0.20"], "TXT": ["v=spf1 -all"]},
    "nullmx.test": {"MX": [[0, "."]]},
    "broken.test": "SERVFAIL",
    "silent.test": "DROP",
    "half.test": {"MX": [[10, "gone.half.test"], [20, "ok.half.test"]]},
    "ok.half.test": {"A": ["127.0.0.30"]},
    "noaddr.test": {"MX": [[10, "gone.noaddr.test"]]},
    "flaky.test": {"MX": [[10, "sick.flaky.test"]]},
    "sick.flaky.test": "SERVFAIL",
    "smarthost.test": {"A": ["127.0.0.40"]},
    "big.test": {"A": ["127.0.0.50", "127.0.0.51"], "truncate": True},
}


class Clock:
    """An injected clock for the cache."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def dns_server():
    from twisted.internet import reactor

    server = DNSTestServer(json.loads(json.dumps(ZONE)), negative_ttl=30)
    server.start(reactor)
    yield server
    server.stop()


def make_resolver(server: DNSTestServer, **kwargs) -> Resolver:
    from twisted.internet import reactor

    kwargs.setdefault("timeout_seconds", 2.0)
    return Resolver(reactor, [("127.0.0.1", server.port)], **kwargs)


@pytest_twisted.ensureDeferred
async def test_mx_hosts_come_in_preference_order(dns_server):
    """MX records → hosts ordered by preference, each name expanded to A then AAAA."""
    hosts = await make_resolver(dns_server).resolve_destination(Destination("example.test"), 2525)
    assert hosts == [
        MailHost("mx1.example.test", "127.0.0.11", 2525, 10),
        MailHost("mx2.example.test", "127.0.0.12", 2525, 20),
        MailHost("mx2.example.test", "::1", 2525, 20),
        MailHost("mx3.example.test", "127.0.0.13", 2525, 30),
    ]


@pytest_twisted.ensureDeferred
async def test_equal_preference_hosts_are_shuffled(dns_server):
    """Equal-preference MX hosts come back in different orders for different random sources."""
    orders = set()
    for seed in range(8):
        resolver = make_resolver(dns_server, rng=random.Random(seed))
        hosts = await resolver.resolve_destination(Destination("equal.test"), 25)
        assert sorted(h.address for h in hosts) == [f"127.0.1.{i}" for i in range(5)]
        orders.add(tuple(h.name for h in hosts))
    assert len(orders) > 1


@pytest_twisted.ensureDeferred
async def test_no_mx_falls_back_to_the_domain_address(dns_server):
    """RFC 5321 §5.1: without MX records the domain's own A record is the mail host."""
    hosts = await make_resolver(dns_server).resolve_destination(Destination("implicit.test"), 25)
    assert hosts == [MailHost("implicit.test", "127.0.0.20", 25, 0)]


@pytest.mark.parametrize(
    ("domain", "error"),
    [
        ("nullmx.test", NullMX),
        ("nowhere.test", NoSuchDomain),
        ("broken.test", DNSTemporaryError),
        ("noaddr.test", NoMailHost),
        ("flaky.test", DNSTemporaryError),
    ],
)
@pytest_twisted.ensureDeferred
async def test_resolution_failures_raise_typed_errors(dns_server, domain, error):
    """Null MX, NXDOMAIN, SERVFAIL, no address, SERVFAIL for the MX host: each its own error."""
    with pytest.raises(error) as raised:
        await make_resolver(dns_server).resolve_destination(Destination(domain), 25)
    assert raised.value.name == domain


@pytest_twisted.ensureDeferred
async def test_unanswered_query_times_out_as_temporary(dns_server):
    """A nameserver that never answers gives DNSTemporaryError within the timeout budget."""
    resolver = make_resolver(dns_server, timeout_seconds=0.4)
    started = time.monotonic()
    with pytest.raises(DNSTemporaryError, match="timeout"):
        await resolver.resolve_destination(Destination("silent.test"), 25)
    assert time.monotonic() - started < 2.0
    assert dns_server.queries_for("silent.test", "MX") == 2


@pytest_twisted.ensureDeferred
async def test_mx_host_without_address_is_skipped(dns_server):
    """An MX name that does not exist is skipped; the next MX host is used."""
    hosts = await make_resolver(dns_server).resolve_destination(Destination("half.test"), 25)
    assert hosts == [MailHost("ok.half.test", "127.0.0.30", 25, 20)]


@pytest_twisted.ensureDeferred
async def test_answers_are_cached_for_their_ttl(dns_server):
    """A second lookup within the TTL asks nothing; after the TTL the server is asked again."""
    clock = Clock()
    resolver = make_resolver(dns_server, clock=clock)
    first = await resolver.resolve_destination(Destination("example.test"), 25)
    asked = len(dns_server.queries)
    clock.now += 29  # within every TTL, the 30 s of the empty AAAA answers included
    assert await resolver.resolve_destination(Destination("example.test"), 25) == first
    assert len(dns_server.queries) == asked
    clock.now += 32  # past the MX record's 60 s
    await resolver.resolve_destination(Destination("example.test"), 25)
    assert dns_server.queries_for("example.test", "MX") == 2


@pytest_twisted.ensureDeferred
async def test_negative_answers_are_cached_briefly_and_changes_seen_after(dns_server):
    """NXDOMAIN is cached for the SOA minimum at most; a record added later is then found."""
    clock = Clock()
    resolver = make_resolver(dns_server, clock=clock, negative_ttl_seconds=10)
    with pytest.raises(NoSuchDomain):
        await resolver.resolve_destination(Destination("late.test"), 25)
    dns_server.set_records("late.test", {"A": ["127.0.0.60"]})
    clock.now += 9
    with pytest.raises(NoSuchDomain):
        await resolver.resolve_destination(Destination("late.test"), 25)
    assert dns_server.queries_for("late.test", "MX") == 1
    clock.now += 2
    hosts = await resolver.resolve_destination(Destination("late.test"), 25)
    assert hosts == [MailHost("late.test", "127.0.0.60", 25, 0)]


@pytest_twisted.ensureDeferred
async def test_temporary_failures_are_not_cached(dns_server):
    """After a SERVFAIL the next lookup asks again, so a recovered server is seen at once."""
    resolver = make_resolver(dns_server)
    with pytest.raises(DNSTemporaryError):
        await resolver.resolve_destination(Destination("broken.test"), 25)
    dns_server.set_records("broken.test", {"A": ["127.0.0.70"]})
    hosts = await resolver.resolve_destination(Destination("broken.test"), 25)
    assert [h.address for h in hosts] == ["127.0.0.70"]


@pytest_twisted.ensureDeferred
async def test_truncated_answer_is_retried_over_tcp(dns_server):
    """RFC 7766: a UDP answer with TC set is asked again over TCP, whose answer is used."""
    hop = parse_next_hop("[big.test]:2600")
    hosts = await make_resolver(dns_server).resolve_destination(Destination(str(hop), hop), 25)
    assert sorted((h.address, h.port) for h in hosts) == [
        ("127.0.0.50", 2600),
        ("127.0.0.51", 2600),
    ]
    assert ("big.test", "A", "tcp") in dns_server.queries


@pytest_twisted.ensureDeferred
async def test_bracketed_next_hop_uses_address_records_without_mx(dns_server):
    """[host]:port: the host's A records and the route's port; no MX query."""
    hop = parse_next_hop("[smarthost.test]:587")
    hosts = await make_resolver(dns_server).resolve_destination(Destination(str(hop), hop), 25)
    assert hosts == [MailHost("smarthost.test", "127.0.0.40", 587, 0)]
    assert dns_server.queries_for("smarthost.test", "MX") == 0


@pytest_twisted.ensureDeferred
async def test_ip_literal_next_hop_needs_no_dns(dns_server):
    """An IP next hop is used as it is, with delivery.smtp_port when the route has no port."""
    hop = parse_next_hop("127.0.0.99")
    hosts = await make_resolver(dns_server).resolve_destination(Destination(str(hop), hop), 2525)
    assert hosts == [MailHost("127.0.0.99", "127.0.0.99", 2525, 0)]
    assert dns_server.queries == []


@pytest_twisted.ensureDeferred
async def test_next_hop_with_mx_lookup_uses_the_hops_mx(dns_server):
    """host:port route: MX of the host, on the route's port."""
    hop = parse_next_hop("example.test:2600")
    hosts = await make_resolver(dns_server).resolve_destination(Destination(str(hop), hop), 25)
    assert hosts[0] == MailHost("mx1.example.test", "127.0.0.11", 2600, 10)


@pytest_twisted.ensureDeferred
async def test_next_hop_that_does_not_exist_defers_instead_of_bouncing(dns_server):
    """A misconfigured route is the operator's problem: mail waits (temporary), it never bounces."""
    hop = parse_next_hop("[nosuchhost.test]")
    with pytest.raises(DNSTemporaryError):
        await make_resolver(dns_server).resolve_destination(Destination(str(hop), hop), 25)


@pytest_twisted.ensureDeferred
async def test_second_nameserver_is_asked_when_the_first_is_silent(dns_server):
    """A nameserver that never answers is skipped for the next one."""
    from twisted.internet import reactor

    dead = DNSTestServer({"implicit.test": "DROP"})
    dead.start(reactor)
    try:
        resolver = Resolver(
            reactor, [("127.0.0.1", dead.port), ("127.0.0.1", dns_server.port)], timeout_seconds=1.0
        )
        hosts = await resolver.resolve_destination(Destination("implicit.test"), 25)
    finally:
        await dead.stop()
    assert hosts == [MailHost("implicit.test", "127.0.0.20", 25, 0)]


@pytest_twisted.ensureDeferred
async def test_dns_server_runs_as_a_subprocess_from_a_zone_file(tmp_path):
    """python -m twistedrelay.testing.dns_server --zone FILE prints its port and serves."""
    from twisted.internet import reactor

    zone = tmp_path / "zone.json"
    zone.write_text(
        json.dumps({"sub.test": {"MX": [[5, "mx.sub.test"]]}, "mx.sub.test": {"A": ["127.0.0.80"]}})
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "twistedrelay.testing.dns_server", "--zone", str(zone)],
        stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
    )
    try:
        ready, _, _ = select.select([process.stdout], [], [], 20)
        assert ready, "the DNS server did not print its port"
        port = int(process.stdout.readline())
        resolver = Resolver(reactor, [("127.0.0.1", port)], timeout_seconds=2.0)
        hosts = await resolver.resolve_destination(Destination("sub.test"), 25)
        assert hosts == [MailHost("mx.sub.test", "127.0.0.80", 25, 5)]
    finally:
        process.kill()
        process.wait(timeout=10)


def test_cache_stays_bounded_dropping_expired_answers_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past MAX_CACHE_ENTRIES, expired answers go first, then the oldest half."""
    from twisted.internet import reactor

    from twistedrelay import resolver as module

    monkeypatch.setattr(module, "MAX_CACHE_ENTRIES", 4)
    now = [0.0]
    r = module.Resolver(reactor, nameservers=[("127.0.0.1", 53)], clock=lambda: now[0])
    # Live answers first: dropping "the oldest half" would keep the expired ones instead.
    r._cache = {("live", i): module._Cached(100.0, ()) for i in range(3)}
    r._cache.update({("old", i): module._Cached(5.0, ()) for i in range(3)})
    now[0] = 10.0
    r._shrink_cache(now[0])
    assert sorted(r._cache) == [("live", 0), ("live", 1), ("live", 2)]
    r._cache.update({("live", i): module._Cached(100.0, ()) for i in range(3, 6)})
    r._shrink_cache(now[0])
    assert sorted(r._cache) == [("live", 3), ("live", 4), ("live", 5)]
