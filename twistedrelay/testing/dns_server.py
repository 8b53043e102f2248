"""A small authoritative DNS server for tests: records from a dict, served on loopback.

Owns nothing the relay runs in production. Tests point ``[dns] nameservers`` (or
``resolver.Resolver(nameservers=...)``) at it. It answers UDP and TCP on the same
kernel-chosen port, with dnspython building the messages.

Records, by name (case-insensitive, no final dot)::

    {
        "example.test": {"MX": [[10, "mx1.example.test"], [20, "mx2.example.test"]], "ttl": 60},
        "mx1.example.test": {"A": ["127.0.0.2"], "AAAA": ["::1"]},
        "nullmx.test": {"MX": [[0, "."]]},            # RFC 7505 null MX
        "alias.test": {"CNAME": "example.test"},
        "txt.test": {"TXT": ["v=spf1 -all"]},
        "broken.test": "SERVFAIL",                     # answers SERVFAIL
        "slow.test": "DROP",                           # never answers (timeouts)
        "big.test": {"A": ["127.0.0.9"], "truncate": True},   # TC over UDP, full over TCP
    }

A name not in the dict is NXDOMAIN; a type a name lacks is an empty NOERROR answer. Both
carry an SOA whose minimum is ``negative_ttl`` (for negative caching). Records can be
changed while the server runs (:meth:`DNSTestServer.set_records`, :meth:`remove`); every
question is appended to :attr:`DNSTestServer.queries`.

As a subprocess for system tests::

    python -m twistedrelay.testing.dns_server --zone zone.json [--interface 127.0.0.1]

prints the port it bound on the first line of stdout, then serves until killed.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IAddress, IListeningPort

DEFAULT_TTL = 300
MAX_CNAME_CHAIN = 8


class DNSTestServer:
    """An authoritative server for the names in ``records`` (see the module docstring).

    :param records: name → {TYPE: values, "ttl": seconds, "truncate": bool} or
        "SERVFAIL" / "DROP".
    :param negative_ttl: the SOA minimum given with NXDOMAIN and empty answers.
    """

    # Any: zone data as loaded from JSON (dicts, lists, strings and numbers).
    def __init__(self, records: Mapping[str, Any] | None = None, negative_ttl: int = 30) -> None:
        self.records: dict[str, Any] = {}
        self.negative_ttl = negative_ttl
        self.queries: list[tuple[str, str, str]] = []
        """(name, type, "udp" or "tcp") for every question received."""
        self.port = 0
        self._listeners: list[IListeningPort] = []
        for name, value in (records or {}).items():
            self.records[_key(name)] = value

    # -- records -------------------------------------------------------------------------

    def set_records(self, name: str, value: Any) -> None:  # Any: zone data, as above
        """Replace everything about ``name`` (a record dict, "SERVFAIL" or "DROP")."""
        self.records[_key(name)] = value

    def remove(self, name: str) -> None:
        """Make ``name`` NXDOMAIN."""
        self.records.pop(_key(name), None)

    def queries_for(self, name: str, rtype: str) -> int:
        """How many times ``name``/``rtype`` was asked."""
        return sum(1 for n, t, _ in self.queries if (n, t) == (_key(name), rtype))

    # -- answering (pure) ----------------------------------------------------------------

    def answer(self, query: dns.message.Message, over_tcp: bool) -> dns.message.Message | None:
        """The response to ``query``, or None to stay silent."""
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response
        question = query.question[0]
        name = _key(question.name.to_text())
        rtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rtype, "tcp" if over_tcp else "udp"))
        node = self.records.get(name)
        if node == "DROP":
            return None
        if node == "SERVFAIL":
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        if isinstance(node, Mapping) and node.get("truncate") and not over_tcp:
            response.flags |= dns.flags.TC
            return response
        for _ in range(MAX_CNAME_CHAIN):
            if not isinstance(node, Mapping):
                break
            if rtype != "CNAME" and "CNAME" in node:
                target = _key(node["CNAME"])
                response.answer.append(self._rrset(name, "CNAME", [target + "."], node))
                name, node = target, self.records.get(target)
                continue
            if node.get(rtype):
                response.answer.append(self._rrset(name, rtype, node[rtype], node))
            else:
                response.authority.append(self._soa(name))
            return response
        if not response.answer:
            response.set_rcode(dns.rcode.NXDOMAIN)
        response.authority.append(self._soa(name))
        return response

    def _rrset(  # Any: zone data, as above
        self, name: str, rtype: str, values: Any, node: Mapping[str, Any]
    ) -> dns.rrset.RRset:
        ttl = int(node.get("ttl", DEFAULT_TTL))
        texts = [_rdata_text(rtype, value) for value in values]
        return dns.rrset.from_text_list(name + ".", ttl, "IN", rtype, texts)

    def _soa(self, name: str) -> dns.rrset.RRset:
        apex = name.rsplit(".", 1)[-1] + "."
        soa = f"ns.{apex} hostmaster.{apex} 1 3600 600 86400 {self.negative_ttl}"
        return dns.rrset.from_text(apex, self.negative_ttl, "IN", "SOA", soa)

    # -- serving (Twisted) ---------------------------------------------------------------

    def start(self, reactor: Any, interface: str = "127.0.0.1") -> int:  # Any: UDP and TCP
        """Listen on UDP and TCP on one kernel-chosen port of ``interface``; return the port."""
        for _ in range(20):
            udp = reactor.listenUDP(0, _UDPServer(self), interface=interface)
            port: int = udp.getHost().port
            try:
                tcp = reactor.listenTCP(port, _TCPServerFactory(self), interface=interface)
            except error.CannotListenError:
                udp.stopListening()
                continue
            self._listeners = [udp, tcp]
            self.port = port
            return port
        raise RuntimeError("no port free for both UDP and TCP")

    def stop(self) -> defer.Deferred[list[None]]:
        """Stop listening."""
        listeners, self._listeners = self._listeners, []
        # maybeDeferred flattens the Deferred stopListening may return; its overloads cannot
        # say so for a "Deferred[None] | None" result.
        return defer.gatherResults(
            [cast("defer.Deferred[None]", defer.maybeDeferred(p.stopListening)) for p in listeners]
        )


class _UDPServer(protocol.DatagramProtocol):
    def __init__(self, server: DNSTestServer) -> None:
        self.server = server

    def datagramReceived(self, datagram: bytes, addr: tuple[str, int]) -> None:  # noqa: N802
        try:
            query = dns.message.from_wire(datagram)
        except dns.exception.DNSException:
            return
        response = self.server.answer(query, over_tcp=False)
        if response is not None and self.transport is not None:
            self.transport.write(response.to_wire(), addr)


class _TCPServer(protocol.Protocol):
    def __init__(self, server: DNSTestServer) -> None:
        self.server = server
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 2:
            (length,) = struct.unpack("!H", self.buffer[:2])
            if len(self.buffer) < 2 + length:
                return
            wire, self.buffer = self.buffer[2 : 2 + length], self.buffer[2 + length :]
            try:
                response = self.server.answer(dns.message.from_wire(wire), over_tcp=True)
            except dns.exception.DNSException:
                response = None
            if response is None:
                assert self.transport is not None
                self.transport.loseConnection()
                return
            out = response.to_wire()
            assert self.transport is not None
            self.transport.write(struct.pack("!H", len(out)) + out)


class _TCPServerFactory(protocol.Factory):
    def __init__(self, server: DNSTestServer) -> None:
        self.server = server

    def buildProtocol(self, addr: IAddress | None) -> _TCPServer:
        return _TCPServer(self.server)


def _key(name: str) -> str:
    return name.lower().rstrip(".") or "."


def _rdata_text(rtype: str, value: Any) -> str:  # Any: one zone-data value
    if rtype == "MX":
        preference, exchange = value
        return (
            f"{int(preference)} {exchange.rstrip('.')}." if exchange != "." else f"{preference} ."
        )
    if rtype == "TXT":
        # RFC 1035 §3.3.14: a TXT record is a sequence of strings of at most 255 bytes each
        # (a 2048-bit DKIM key needs several); verifiers join them.
        text = str(value)
        pieces = [text[i : i + 255] for i in range(0, len(text), 255)] or [""]
        return " ".join(
            '"' + piece.replace("\\", "\\\\").replace('"', '\\"') + '"' for piece in pieces
        )
    return str(value)


def main(argv: list[str] | None = None) -> None:
    """Serve a JSON zone file until killed, printing the bound port first."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zone", type=Path, required=True, help="JSON file: name → records")
    parser.add_argument("--interface", default="127.0.0.1")
    args = parser.parse_args(argv)
    records = json.loads(args.zone.read_text(encoding="utf-8"))
    from twisted.internet import reactor

    server = DNSTestServer(records)
    port = server.start(reactor, args.interface)
    sys.stdout.write(f"{port}\n")
    sys.stdout.flush()
    reactor.run()


if __name__ == "__main__":
    main()
