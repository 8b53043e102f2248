"""The master's listening sockets: options, errors that name the address, grouping."""

from __future__ import annotations

import socket

import pytest

from twistedrelay.config import Endpoint, parse_config
from twistedrelay.process.sockets import ListenError, ListeningSockets, bind_listener


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_bound_socket_listens_non_blocking_with_reuseaddr_on_a_free_port() -> None:
    """Port 0 gets a kernel-chosen port that accepts connections; options are set."""
    bound = bind_listener("smtp", Endpoint("127.0.0.1", 0))
    with bound.sock:
        assert bound.port != 0
        assert bound.sock.getblocking() is False
        assert bound.sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        assert bound.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        with socket.create_connection(("127.0.0.1", bound.port), timeout=2):
            pass


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback")
def test_ipv6_socket_is_v6_only() -> None:
    """An IPv6 listener does not also take IPv4 (so [::] and 0.0.0.0 can both be listed)."""
    bound = bind_listener("smtp", Endpoint("::1", 0))
    with bound.sock:
        assert bound.sock.family == socket.AF_INET6
        assert bound.sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1


def test_address_in_use_is_an_error_naming_listener_and_address() -> None:
    """Binding a taken port fails with the listener name and the address in the message."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(
            ListenError, match=rf"cannot listen for submission on 127\.0\.0\.1:{port}"
        ):
            bind_listener("submission", Endpoint("127.0.0.1", port))


def test_unresolvable_host_is_an_error_naming_it() -> None:
    """A host name that does not resolve is reported as such, with the address."""
    with pytest.raises(ListenError, match=r"cannot listen for smtp on no-such-host\.invalid:25"):
        bind_listener("smtp", Endpoint("no-such-host.invalid", 25))


def test_listening_sockets_groups_smtp_listeners_and_keeps_metrics_apart() -> None:
    """by_name() has the SMTP listeners in config order; the metrics socket is separate."""
    config = parse_config(
        {
            "smtp": {"listen": ["127.0.0.1:0", "127.0.0.1:0"]},
            "metrics": {"listen": "127.0.0.1:0"},
        },
        "test.toml",
    )
    listeners = ListeningSockets(config)
    listeners.privilegedStartService()
    try:
        groups = listeners.by_name()
        assert list(groups) == ["smtp"]
        assert len(groups["smtp"]) == 2
        metrics = listeners.metrics_socket()
        assert metrics is not None and metrics.port not in {b.port for b in groups["smtp"]}
    finally:
        listeners.close_all()
    assert listeners.bound == []


def test_a_failed_bind_closes_the_sockets_already_bound() -> None:
    """Start-up fails as a whole: no half-bound listener set stays open."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = parse_config(
            {"smtp": {"listen": ["127.0.0.1:0", f"127.0.0.1:{port}"]}, "metrics": {"listen": ""}},
            "test.toml",
        )
        listeners = ListeningSockets(config)
        with pytest.raises(ListenError):
            listeners.bind_all()
    assert listeners.bound == []


def test_metrics_socket_is_not_bound_when_no_one_serves_it() -> None:
    """Without a metrics service the master leaves [metrics] listen alone."""
    config = parse_config(
        {"smtp": {"listen": ["127.0.0.1:0"]}, "metrics": {"listen": "127.0.0.1:0"}}, "t"
    )
    listeners = ListeningSockets(config, include_metrics=False)
    listeners.bind_all()
    try:
        assert listeners.metrics_socket() is None
    finally:
        listeners.close_all()


def test_each_worker_slot_gets_its_own_socket_on_the_same_port() -> None:
    """With copies, every slot has a distinct socket per address, all on one port."""
    config = parse_config(
        {"smtp": {"listen": ["127.0.0.1:0", "127.0.0.1:0"]}, "metrics": {"listen": ""}}, "t"
    )
    listeners = ListeningSockets(config, copies=2)
    listeners.bind_all()
    try:
        slot0, slot1 = listeners.by_name(0)["smtp"], listeners.by_name(1)["smtp"]
        assert len(slot0) == len(slot1) == 2
        assert {b.sock.fileno() for b in slot0}.isdisjoint(b.sock.fileno() for b in slot1)
        assert [b.port for b in slot0] == [b.port for b in slot1]
        assert slot0[0].port != slot0[1].port
        assert [b.sock.fileno() for b in listeners.by_name(2)["smtp"]] == [
            b.sock.fileno() for b in slot0
        ]
    finally:
        listeners.close_all()


def test_copies_spread_connections_over_every_slot() -> None:
    """The kernel hands new connections to both slots' sockets, not all to one."""
    config = parse_config({"smtp": {"listen": ["127.0.0.1:0"]}, "metrics": {"listen": ""}}, "t")
    listeners = ListeningSockets(config, copies=2)
    listeners.bind_all()
    clients = []
    try:
        port = listeners.by_name(0)["smtp"][0].port
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(40)]
        accepted = []
        for slot in (0, 1):
            sock = listeners.by_name(slot)["smtp"][0].sock
            count = 0
            while True:
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    break
                conn.close()
                count += 1
            accepted.append(count)
        assert sum(accepted) == 40
        assert min(accepted) > 0, accepted
    finally:
        for client in clients:
            client.close()
        listeners.close_all()


def test_copies_refuse_an_address_another_relay_listens_on() -> None:
    """SO_REUSEPORT must not let a second relay join a running one's port silently."""
    config = parse_config({"smtp": {"listen": ["127.0.0.1:0"]}, "metrics": {"listen": ""}}, "t")
    first = ListeningSockets(config, copies=2)
    first.bind_all()
    try:
        port = first.by_name(0)["smtp"][0].port
        again = parse_config(
            {"smtp": {"listen": [f"127.0.0.1:{port}"]}, "metrics": {"listen": ""}}, "t"
        )
        second = ListeningSockets(again, copies=2)
        with pytest.raises(ListenError, match="in use"):
            second.bind_all()
        assert second.bound == []
    finally:
        first.close_all()
