"""Fixtures of the system tests: relays and sinks as subprocesses, stopped by PID afterwards.

The machinery lives in harness.py; see its docstring.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.system.harness import RelayProcess, SinkProcess


@pytest.fixture
def start_relay() -> Iterator[Callable[..., RelayProcess]]:
    """Start relays (``start_relay(config, run_directory, workers=2)``); stop them after."""
    relays: list[RelayProcess] = []

    def start(config: Path, run_directory: Path, workers: int = 2) -> RelayProcess:
        relay = RelayProcess(config, run_directory)
        relays.append(relay)
        relay.wait_ready(workers)
        return relay

    try:
        yield start
    finally:
        errors = []
        for relay in relays:
            try:
                relay.cleanup()
            except AssertionError as error:
                errors.append(str(error))
        assert not errors, errors


@pytest.fixture
def start_sink() -> Iterator[Callable[[Path], SinkProcess]]:
    """Start sinks for a test (``start_sink(directory)``); stop them after."""
    sinks: list[SinkProcess] = []

    def start(directory: Path) -> SinkProcess:
        directory.mkdir(parents=True, exist_ok=True)
        sink = SinkProcess(directory)
        sinks.append(sink)
        sink.wait_bound()
        return sink

    try:
        yield start
    finally:
        for sink in sinks:
            sink.cleanup()
