"""Mail host resolution: a destination → the mail hosts to try, in order.

Owns DNS for delivery ([dns] in the config). Two halves:

- The *policy* (pure, tested without a network): :func:`order_mx` sorts MX records by
  preference and shuffles equal preferences with an injected ``random.Random``;
  :func:`is_null_mx` detects RFC 7505 null MX; :func:`build_mail_hosts` expands MX names
  to addresses, dropping duplicates. No MX records means the domain itself is the implicit
  MX (RFC 5321 §5.1).
- The *lookups* (:class:`Resolver`): dnspython builds and parses the DNS messages; Twisted
  carries them over UDP (one fresh source port per query, connected to the nameserver),
  with a per-try timeout, the next nameserver on timeout or SERVFAIL, and a retry over TCP
  when an answer is truncated. Nothing blocks the reactor. Answers are cached for their
  TTL, negative answers (NXDOMAIN, no data) for at most ``negative_ttl_seconds``;
  temporary failures are not cached.

API::

    resolver = Resolver(reactor, nameservers=[("127.0.0.1", 5353)], timeout_seconds=10)
    hosts = await resolver.resolve_destination(destination, smtp_port=25)  # list[MailHost]

Errors are typed, and ``delivery.outcome.classify_dns_failure`` maps them: :class:`NullMX`
(bounce 5.1.10), :class:`NoSuchDomain` (NXDOMAIN: bounce 5.1.2), :class:`NoMailHost`
(no address for any mail host: bounce 5.4.4), :class:`DNSTemporaryError` (SERVFAIL,
timeout: defer 4.4.3). A routed next hop that cannot be found is an operator's problem, not
the sender's: it raises :class:`DNSTemporaryError` so that mail waits instead of bouncing.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.resolver
from twisted.internet import defer, endpoints, error, protocol
from twisted.internet.interfaces import IReactorTCP, IReactorTime, IReactorUDP
from twisted.python.failure import Failure

from twistedrelay.routing import Destination, is_ip_address

DEFAULT_TIMEOUT_SECONDS = 10.0
DEFAULT_NEGATIVE_TTL_SECONDS = 60.0
#: Answers kept at most; a relay sending to many domains forgets expired ones first.
MAX_CACHE_ENTRIES = 50_000

T = TypeVar("T")


# -- errors ----------------------------------------------------------------------------------


class ResolverError(Exception):
    """A destination could not be resolved to mail hosts.

    ``kind`` is what delivery.outcome.classify_dns_failure keys on; ``name`` is the DNS
    name concerned and ``detail`` says what the nameserver answered.
    """

    kind: ClassVar[str] = ""

    def __init__(self, name: str, detail: str = "") -> None:
        super().__init__(f"{name}: {detail}" if detail else name)
        self.name = name
        self.detail = detail


class NullMX(ResolverError):  # noqa: N818 (the names of the delivery contract)
    """The domain publishes a null MX (RFC 7505): it accepts no mail."""

    kind = "null_mx"


class NoSuchDomain(ResolverError):  # noqa: N818 (the names of the delivery contract)
    """The domain does not exist (NXDOMAIN)."""

    kind = "no_such_domain"


class NoMailHost(ResolverError):  # noqa: N818 (the names of the delivery contract)
    """None of the mail hosts has an address record."""

    kind = "no_mail_host"


class DNSTemporaryError(ResolverError):
    """SERVFAIL, REFUSED, a timeout or a malformed answer: try again later."""

    kind = "temporary"


# -- policy (pure) ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MailHost:
    """One address to connect to: ``name`` is the MX (or next hop) host name."""

    name: str
    address: str
    port: int
    preference: int

    def __str__(self) -> str:
        return f"{self.name}[{self.address}]:{self.port}"


MXRecord = tuple[int, str]
"""(preference, exchange): the exchange lower-cased without its final dot; "." is the root."""


def is_null_mx(records: Sequence[MXRecord]) -> bool:
    """RFC 7505 §3: a single MX record with preference 0 and the root as exchange."""
    return len(records) == 1 and records[0] == (0, ".")


def order_mx(records: Sequence[MXRecord], rng: random.Random) -> list[MXRecord]:
    """Sort by preference, shuffle equal preferences, drop duplicate names and root entries.

    RFC 5321 §5.1: hosts of equal preference are tried in random order, spreading load.
    A name listed twice keeps its most preferred entry.
    """
    by_preference: dict[int, list[str]] = {}
    seen: set[str] = set()
    for preference, exchange in sorted(records):
        if exchange == "." or exchange in seen:
            continue
        seen.add(exchange)
        by_preference.setdefault(preference, []).append(exchange)
    ordered: list[MXRecord] = []
    for preference in sorted(by_preference):
        names = by_preference[preference]
        rng.shuffle(names)
        ordered.extend((preference, name) for name in names)
    return ordered


def build_mail_hosts(
    exchanges: Sequence[MXRecord], addresses: Mapping[str, Sequence[str]], port: int
) -> list[MailHost]:
    """Expand ordered MX names to mail hosts, keeping order and dropping repeated addresses.

    :param addresses: the addresses found for each name (names without any are skipped).
    """
    hosts: list[MailHost] = []
    seen: set[str] = set()
    for preference, name in exchanges:
        for address in addresses.get(name, ()):
            if address not in seen:
                seen.add(address)
                hosts.append(MailHost(name, address, port, preference))
    return hosts


def system_nameservers() -> list[tuple[str, int]]:
    """The nameservers of /etc/resolv.conf (read once, at start-up), or 127.0.0.1:53."""
    try:
        system = dns.resolver.Resolver(configure=True)
    except dns.resolver.NoResolverConfiguration:
        return [("127.0.0.1", 53)]
    servers = [(ns, system.port) for ns in system.nameservers if isinstance(ns, str)]
    return servers or [("127.0.0.1", 53)]


# -- lookups (Twisted) -----------------------------------------------------------------------


class _AttemptError(Exception):
    """One query to one nameserver got no usable answer."""


class _UDPExchange(protocol.DatagramProtocol):
    """Send one query over a connected UDP socket and wait for its response."""

    def __init__(self, query: dns.message.Message, server: tuple[str, int]) -> None:
        self.query = query
        self.server = server
        self.response: defer.Deferred[dns.message.QueryMessage] = defer.Deferred()

    def startProtocol(self) -> None:  # noqa: N802 (Twisted override)
        """Connect (the kernel then drops datagrams from anyone else) and send the query."""
        assert self.transport is not None
        self.transport.connect(*self.server)
        self.transport.write(self.query.to_wire(), None)  # None: the connected address

    def datagramReceived(self, datagram: bytes, addr: tuple[str, int]) -> None:  # noqa: N802
        """Take the first datagram that answers our query; ignore anything else."""
        try:
            response = dns.message.from_wire(datagram)
        except dns.exception.DNSException:
            return
        # is_response checks the opcode, so an answer to our QUERY always parses as a
        # QueryMessage; the isinstance test only tells the type checker so.
        if (
            isinstance(response, dns.message.QueryMessage)
            and self.query.is_response(response)
            and not self.response.called
        ):
            self.response.callback(response)

    def connectionRefused(self) -> None:  # noqa: N802
        """ICMP port unreachable: nobody serves DNS there."""
        if not self.response.called:
            self.response.errback(_AttemptError(f"{self.server[0]}:{self.server[1]} refused"))


class _TCPExchange(protocol.Protocol):
    """Send one query over TCP (RFC 7766 two-byte length prefix) and read the response."""

    def __init__(self, query: dns.message.Message) -> None:
        self.query = query
        self.buffer = b""
        self.response: defer.Deferred[dns.message.QueryMessage] = defer.Deferred()

    def connectionMade(self) -> None:
        """Send the length-prefixed query."""
        wire = self.query.to_wire()
        assert self.transport is not None
        self.transport.write(struct.pack("!H", len(wire)) + wire)

    def dataReceived(self, data: bytes) -> None:
        """Collect the length-prefixed response."""
        self.buffer += data
        if len(self.buffer) < 2:
            return
        (length,) = struct.unpack("!H", self.buffer[:2])
        if len(self.buffer) < 2 + length:
            return
        assert self.transport is not None
        self.transport.loseConnection()
        try:
            response = dns.message.from_wire(self.buffer[2 : 2 + length])
        except dns.exception.DNSException as e:
            self.response.errback(_AttemptError(f"malformed TCP response: {e}"))
            return
        if isinstance(response, dns.message.QueryMessage) and self.query.is_response(response):
            self.response.callback(response)
        else:
            self.response.errback(_AttemptError("TCP response does not match the query"))

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        """A connection closed before the whole response came is a failed attempt."""
        if not self.response.called:
            self.response.errback(_AttemptError("TCP connection closed before the response"))


@dataclass(frozen=True, slots=True)
class _Cached:
    expires_at: float
    records: tuple[Any, ...] | None
    """The answer's rdata (dnspython objects, hence Any); None for NXDOMAIN."""


class Resolver:
    """Resolves destinations to mail hosts without blocking the reactor.

    :param reactor: provides UDP, TCP and time (callLater).
    :param nameservers: (address, port) pairs; empty means /etc/resolv.conf's.
    :param timeout_seconds: the whole budget of one lookup, shared by its tries (each
        nameserver is tried twice).
    :param clock: returns "now" in seconds for the cache; defaults to ``reactor.seconds``.
    :param rng: orders MX records of equal preference.
    :param negative_ttl_seconds: the longest an NXDOMAIN or empty answer is cached.
    """

    def __init__(
        self,
        reactor: Any,
        nameservers: Sequence[tuple[str, int]] = (),
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        clock: Callable[[], float] | None = None,
        rng: random.Random | None = None,
        negative_ttl_seconds: float = DEFAULT_NEGATIVE_TTL_SECONDS,
    ) -> None:
        # Any: the reactor is used through IReactorUDP, IReactorTCP and IReactorTime.
        assert IReactorUDP.providedBy(reactor) and IReactorTCP.providedBy(reactor)
        assert IReactorTime.providedBy(reactor)
        self._reactor = reactor
        self._nameservers = [(host, port) for host, port in nameservers] or system_nameservers()
        self._timeout = timeout_seconds
        self._clock = clock or reactor.seconds
        self._rng = rng or random.Random()
        self._negative_ttl = negative_ttl_seconds
        self._cache: dict[tuple[str, int], _Cached] = {}
        self.queries_sent = 0
        """DNS queries that went to a nameserver (cache misses), for tests and metrics."""

    # -- public ----------------------------------------------------------------------------

    def resolve_destination(
        self, destination: Destination, smtp_port: int
    ) -> defer.Deferred[list[MailHost]]:
        """The mail hosts for a destination, most preferred first.

        No next hop: MX of the domain (implicit MX if none). A next hop with ``mx_lookup``:
        MX of the hop's host. Without: the hop's IP literal, or its A/AAAA records.
        The port is the hop's, else ``smtp_port``.

        :returns: a Deferred firing with a non-empty list, or failing with a
            :class:`ResolverError`.
        """
        return self._run(self._resolve_destination(destination, smtp_port))

    def resolve_mx(self, domain: str, port: int) -> defer.Deferred[list[MailHost]]:
        """The mail hosts of ``domain`` by its MX records (RFC 5321 §5.1)."""
        return self._run(self._resolve_mx(domain, port))

    def clear_cache(self) -> None:
        """Forget every cached answer."""
        self._cache.clear()

    # -- resolution ------------------------------------------------------------------------

    @staticmethod
    def _run(coroutine: Coroutine[Any, Any, T]) -> defer.Deferred[T]:
        return defer.ensureDeferred(coroutine)

    async def _resolve_destination(
        self, destination: Destination, smtp_port: int
    ) -> list[MailHost]:
        hop = destination.next_hop
        if hop is None:
            return await self._resolve_mx(destination.name, smtp_port)
        port = hop.port or smtp_port
        if is_ip_address(hop.host):
            return [MailHost(hop.host, hop.host, port, 0)]
        try:
            if hop.mx_lookup:
                return await self._resolve_mx(hop.host, port)
            addresses = await self._addresses(hop.host)
        except (NoSuchDomain, NoMailHost, NullMX) as e:
            raise DNSTemporaryError(hop.host, f"next hop {hop}: {e}") from e
        return build_mail_hosts([(0, hop.host)], {hop.host: addresses}, port)

    async def _resolve_mx(self, domain: str, port: int) -> list[MailHost]:
        domain = domain.lower().rstrip(".")
        records = await self._query(domain, dns.rdatatype.MX)
        if records is None:
            raise NoSuchDomain(domain, "NXDOMAIN for MX")
        mx = [(rd.preference, _exchange(rd.exchange)) for rd in records]
        if is_null_mx(mx):
            raise NullMX(domain)
        # RFC 5321 §5.1: no MX records → the domain itself is the mail host (implicit MX).
        exchanges = order_mx(mx, self._rng) if mx else [(0, domain)]
        if not exchanges:
            raise NoMailHost(domain, "only null MX records among others")
        lookups = [defer.ensureDeferred(self._settled_addresses(name)) for _, name in exchanges]
        outcomes = await defer.gatherResults(lookups)
        addresses: dict[str, list[str]] = {}
        temporary: list[str] = []
        for (_, name), outcome in zip(exchanges, outcomes, strict=True):
            if isinstance(outcome, DNSTemporaryError):
                temporary.append(str(outcome))
            elif isinstance(outcome, list):
                addresses[name] = outcome
        hosts = build_mail_hosts(exchanges, addresses, port)
        if hosts:
            return hosts
        if temporary:
            raise DNSTemporaryError(domain, "; ".join(temporary))
        names = ", ".join(name for _, name in exchanges)
        raise NoMailHost(domain, f"no A/AAAA records for {names}")

    async def _settled_addresses(self, name: str) -> list[str] | ResolverError:
        try:
            return await self._addresses(name)
        except ResolverError as e:
            return e

    async def _addresses(self, name: str) -> list[str]:
        """A then AAAA records of ``name``; a temporary failure of one is tolerated."""
        name = name.lower().rstrip(".")
        found: list[str] = []
        failures: list[DNSTemporaryError] = []
        lookups = [
            defer.ensureDeferred(self._settled_query(name, rdtype))
            for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
        ]
        for outcome in await defer.gatherResults(lookups):
            if isinstance(outcome, DNSTemporaryError):
                failures.append(outcome)
            elif outcome is not None:
                found.extend(rd.address for rd in outcome)
        if found:
            return found
        if failures:
            raise failures[0]
        raise NoMailHost(name, "no A/AAAA records")

    async def _settled_query(
        self, name: str, rdtype: dns.rdatatype.RdataType
    ) -> tuple[Any, ...] | None | DNSTemporaryError:
        try:
            return await self._query(name, rdtype)
        except DNSTemporaryError as e:
            return e

    # -- queries and the cache -------------------------------------------------------------

    async def _query(self, name: str, rdtype: dns.rdatatype.RdataType) -> tuple[Any, ...] | None:
        """The records of one name and type: () for no data, None for NXDOMAIN.

        :raises DNSTemporaryError: no nameserver gave a usable answer.
        """
        key = (name, int(rdtype))
        now = self._clock()
        cached = self._cache.get(key)
        if cached is not None and cached.expires_at > now:
            return cached.records
        response = await self._ask(name, rdtype)
        try:
            chain = response.resolve_chaining()
        except dns.exception.DNSException as e:
            raise DNSTemporaryError(name, f"unusable answer: {e}") from e
        if response.rcode() == dns.rcode.NXDOMAIN:
            records = None
        else:
            records = tuple(chain.answer) if chain.answer is not None else ()
        ttl = float(chain.minimum_ttl)
        if not records:
            ttl = min(ttl, self._negative_ttl)
        if len(self._cache) >= MAX_CACHE_ENTRIES:
            self._shrink_cache(now)
        self._cache[key] = _Cached(self._clock() + ttl, records)
        return records

    def _shrink_cache(self, now: float) -> None:
        """Drop expired answers; if still full, the oldest half (dicts keep insertion order)."""
        self._cache = {k: v for k, v in self._cache.items() if v.expires_at > now}
        if len(self._cache) >= MAX_CACHE_ENTRIES:
            keep = list(self._cache.items())[len(self._cache) // 2 :]
            self._cache = dict(keep)

    async def _ask(self, name: str, rdtype: dns.rdatatype.RdataType) -> dns.message.QueryMessage:
        """Query the nameservers in turn until one answers NOERROR or NXDOMAIN."""
        try:
            query = dns.message.make_query(name, rdtype)
        except dns.exception.DNSException as e:
            raise DNSTemporaryError(name, f"cannot query: {e}") from e
        attempts = self._nameservers * 2
        per_try = self._timeout / len(attempts)
        problems: list[str] = []
        for server in attempts:
            try:
                response = await self._exchange_udp(query, server, per_try)
                if response.flags & dns.flags.TC:
                    # RFC 7766 §5: a truncated UDP answer is retried over TCP.
                    response = await self._exchange_tcp(query, server, per_try)
            except _AttemptError as e:
                problems.append(str(e))
                continue
            rcode = response.rcode()
            if rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                return response
            problems.append(f"{dns.rcode.to_text(rcode)} from {server[0]}:{server[1]}")
        raise DNSTemporaryError(name, f"{dns.rdatatype.to_text(rdtype)}: {problems[-1]}")

    async def _exchange_udp(
        self, query: dns.message.Message, server: tuple[str, int], timeout: float
    ) -> dns.message.QueryMessage:
        self.queries_sent += 1
        exchange = _UDPExchange(query, server)
        interface = "::" if ":" in server[0] else "0.0.0.0"
        # 8192 is Twisted's own default; the interface declares no defaults.
        port = self._reactor.listenUDP(0, exchange, interface=interface, maxPacketSize=8192)
        try:
            return await self._within(exchange.response, timeout, f"{server[0]}:{server[1]}")
        finally:
            port.stopListening()

    async def _exchange_tcp(
        self, query: dns.message.Message, server: tuple[str, int], timeout: float
    ) -> dns.message.QueryMessage:
        host, port = server
        make = endpoints.TCP6ClientEndpoint if ":" in host else endpoints.TCP4ClientEndpoint
        endpoint = make(self._reactor, host, port, timeout=max(1, int(timeout)))
        exchange = _TCPExchange(query)
        try:
            await self._within(
                endpoints.connectProtocol(endpoint, exchange), timeout, f"{host}:{port}/tcp"
            )
        except error.ConnectError as e:
            raise _AttemptError(f"{host}:{port}/tcp: {e}") from e
        try:
            return await self._within(exchange.response, timeout, f"{host}:{port}/tcp")
        finally:
            if exchange.transport is not None:
                exchange.transport.loseConnection()

    async def _within(self, deferred: defer.Deferred[T], timeout: float, server: str) -> T:
        """Await ``deferred`` for at most ``timeout`` seconds (then _AttemptError)."""
        deferred.addTimeout(timeout, self._reactor)
        try:
            return await deferred
        except defer.TimeoutError as e:
            raise _AttemptError(f"timeout from {server}") from e


def _exchange(name: dns.name.Name) -> str:
    return "." if name == dns.name.root else name.to_text(omit_final_dot=True).lower()
