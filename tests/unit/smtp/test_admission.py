"""Admission: per-worker and per-client connection limits, with the clock passed in."""

from twistedrelay.config import SMTPConfig
from twistedrelay.smtp import replies
from twistedrelay.smtp.admission import Admission


def test_worker_and_per_address_concurrency_limits():
    """The worker-wide cap and the per-address cap each refuse with 421 4.7.0."""
    limits = SMTPConfig(max_connections=3, max_connections_per_ip=2)
    admission = Admission()
    for _ in range(2):
        assert admission.refusal_for("192.0.2.1", 0, limits) is None
        admission.started("192.0.2.1")
    assert admission.refusal_for("192.0.2.1", 0, limits) == replies.TOO_MANY_CONNECTIONS
    assert admission.refusal_for("192.0.2.2", 0, limits) is None
    admission.started("192.0.2.2")
    assert admission.refusal_for("192.0.2.3", 0, limits) == replies.TOO_MANY_CONNECTIONS
    admission.ended("192.0.2.1")
    assert admission.refusal_for("192.0.2.3", 0, limits) is None
    assert admission.sessions_from("192.0.2.1") == 1


def test_connection_rate_per_address_over_a_minute():
    """More than connection_rate_per_ip connects in 60 s from one address are refused."""
    limits = SMTPConfig(connection_rate_per_ip=2)
    admission = Admission()
    assert admission.refusal_for("192.0.2.1", 0, limits) is None
    assert admission.refusal_for("192.0.2.1", 10, limits) is None
    assert admission.refusal_for("192.0.2.1", 20, limits) == replies.TOO_MANY_CONNECTIONS
    assert admission.refusal_for("192.0.2.2", 20, limits) is None
    assert admission.refusal_for("192.0.2.1", 61, limits) is None


def test_ended_never_goes_negative():
    """A stray ended() (a refused connection) does not open room beyond the limits."""
    admission = Admission()
    admission.ended("192.0.2.1")
    assert admission.open_sessions == 0
    assert admission.sessions_from("192.0.2.1") == 0


def test_an_ipv6_client_is_its_64_and_a_mapped_ipv4_its_address():
    """Every address of one /64 counts as one client, so a host cannot take more slots by
    using more of its addresses; ::ffff:192.0.2.1 is 192.0.2.1."""
    limits = SMTPConfig(max_connections=10, max_connections_per_ip=2)
    admission = Admission()
    for address in ("2001:db8:1:2::1", "2001:db8:1:2::ffff"):
        assert admission.refusal_for(address, 0, limits) is None
        admission.started(address)
    assert admission.refusal_for("2001:db8:1:2:abcd::9", 0, limits) == replies.TOO_MANY_CONNECTIONS
    assert admission.refusal_for("2001:db8:1:3::1", 0, limits) is None
    admission.started("::ffff:192.0.2.1")
    assert admission.sessions_from("192.0.2.1") == 1
    admission.ended("2001:db8:1:2::1")
    assert admission.sessions_from("2001:db8:1:2::77") == 1
