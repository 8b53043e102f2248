"""Pure pieces of supervision: restart backoff, owner names, the worker's --fds encoding."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twistedrelay.process.master import (
    FIRST_RESTART_DELAY_SECONDS,
    MAX_RESTART_DELAY_SECONDS,
    STABLE_UPTIME_SECONDS,
    owner_name,
    restart_delay,
)
from twistedrelay.process.worker import build_worker_argv, format_fds, parse_fds


def test_first_death_restarts_after_one_second() -> None:
    """A worker that dies for the first time is restarted quickly."""
    assert restart_delay(None, 0.1) == FIRST_RESTART_DELAY_SECONDS == 1.0


def test_quick_deaths_double_the_delay_up_to_thirty_seconds() -> None:
    """A crash loop is slowed: 1, 2, 4, 8, 16, 30, 30 seconds."""
    delays = []
    delay = None
    for _ in range(7):
        delay = restart_delay(delay, 0.5)
        delays.append(delay)
    assert delays == [1, 2, 4, 8, 16, 30, 30]
    assert MAX_RESTART_DELAY_SECONDS == 30


def test_a_worker_that_ran_long_enough_restarts_quickly_again() -> None:
    """After a stable run the backoff starts over."""
    assert restart_delay(30.0, STABLE_UPTIME_SECONDS) == FIRST_RESTART_DELAY_SECONDS


def test_owner_name_is_w_and_slot() -> None:
    """The queue owner of slot 3 is "w3" (its claims live in active/w3/)."""
    assert owner_name(3) == "w3"


@given(
    st.dictionaries(
        st.sampled_from(["smtp", "submission", "submissions"]),
        st.lists(st.integers(min_value=3, max_value=1000), min_size=1, max_size=4).map(tuple),
    )
)
def test_fds_round_trip(fds: dict[str, tuple[int, ...]]) -> None:
    """What the master encodes for --fds, the worker decodes unchanged."""
    assert parse_fds(format_fds(fds)) == fds


@pytest.mark.parametrize("text", ["smtp", "=3", "smtp=x", "smtp=3;smtp=4", "smtp=3,"])
def test_malformed_fds_are_refused(text: str) -> None:
    """A --fds value that is not "name=fd,fd;..." is an error, not a guess."""
    with pytest.raises(ValueError):
        parse_fds(text)


def test_worker_argv_runs_the_worker_module_with_every_option() -> None:
    """The master's command line names the config ("" for the default), slot, payload, fds."""
    argv = build_worker_argv("/py", None, 1, "pkg.mod:fn", "smtp=3")
    assert argv == [
        "/py", "-m", "twistedrelay.process.worker", "--config", "", "--slot", "1",
        "--payload", "pkg.mod:fn", "--fds", "smtp=3",
    ]  # fmt: skip
