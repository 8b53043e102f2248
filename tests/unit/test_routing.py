"""Routing: next-hop syntax and the route table's lookup order."""

import pytest

from twistedrelay.routing import Destination, NextHop, RouteTable, parse_next_hop


@pytest.mark.parametrize(
    ("text", "hop"),
    [
        ("mx.example", NextHop("mx.example", None, True)),
        ("mx.example:587", NextHop("mx.example", 587, True)),
        ("[mx.example]", NextHop("mx.example", None, False)),
        ("[mx.example]:2525", NextHop("mx.example", 2525, False)),
        ("127.0.0.1:2600", NextHop("127.0.0.1", 2600, False)),
        ("[::1]:2600", NextHop("::1", 2600, False)),
    ],
)
def test_parse_next_hop(text: str, hop: NextHop) -> None:
    """Postfix syntax: brackets mean no MX lookup; IP literals are used as they are."""
    assert parse_next_hop(text) == hop


@pytest.mark.parametrize("text", ["", "[x", "host:0", "host:99999", "::1:25", "bad host:25"])
def test_bad_next_hops_are_refused(text: str) -> None:
    """Malformed next hops raise ValueError for the config loader to report."""
    with pytest.raises(ValueError):
        parse_next_hop(text)


def test_route_lookup_order() -> None:
    """Exact domain, then the nearest .parent, then *, then the domain itself."""
    table = RouteTable(
        {
            "example.net": parse_next_hop("127.0.0.1:2600"),
            ".example.com": parse_next_hop("[relay.example.com]"),
            "*": parse_next_hop("smarthost.example:587"),
        }
    )
    assert table.destination_for("Example.NET").name == "127.0.0.1:2600"
    assert table.destination_for("a.b.example.com").name == "[relay.example.com]"
    assert table.destination_for("other.test").name == "smarthost.example:587"
    assert RouteTable({}).destination_for("other.test") == Destination("other.test")
