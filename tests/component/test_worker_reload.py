"""A worker's SIGHUP reload of [plugins]: new plugins take over, the old ones are closed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import deferLater

from twistedrelay.app import WorkerService, build_worker_service
from twistedrelay.config import Config, ConfigError, parse_config
from twistedrelay.metrics import RelayMetrics
from twistedrelay.queue.store import QueueStore


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def _config(tmp_path: Path, plugins: dict[str, Any]) -> Config:
    return parse_config(
        {
            "hostname": "relay.example.test",
            "queue": {"directory": str(tmp_path / "queue")},
            "plugins": {"hook_timeout": 0.1, **plugins},
        },
        str(tmp_path / "relay.toml"),
    )


@pytest_twisted.ensureDeferred
async def test_changed_plugins_are_set_up_anew_and_the_old_ones_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new [plugins] table reaches inbound and delivery at once; the old runner is closed
    after the calls in flight have had their hook_timeout."""
    # A worker's metrics switch prometheus_client to multiprocess files for the whole
    # process; this test process runs other tests after it, so it gets plain ones.
    monkeypatch.setattr(RelayMetrics, "for_worker", classmethod(lambda cls: cls()))
    first = _config(tmp_path, {"enabled": ["example"]})
    QueueStore.create(str(first.queue.directory))
    service = build_worker_service(first, 0, _reactor(), {})
    assert isinstance(service, WorkerService)
    old = service.parts.hooks
    closed: list[str] = []
    old.close = lambda: closed.append("old")  # type: ignore[method-assign]
    try:
        service.reload_config(
            _config(tmp_path, {"enabled": ["example"], "example": {"add_header": True}})
        )
        new = service.parts.hooks
        assert new is not old and service.delivery.hooks is new
        assert new.plugins[0].instance.add_header is True
        assert closed == []
        await deferLater(_reactor(), 1.3, lambda: None)
        assert closed == ["old"]

        same = service.parts.config
        service.reload_config(same)  # unchanged plugins: nothing is set up again
        assert service.parts.hooks is new

        with pytest.raises(ConfigError):
            service.reload_config(_config(tmp_path, {"enabled": ["no_such_plugin"]}))
        assert service.parts.hooks is new and service.parts.config is same
    finally:
        service.parts.hooks.close()
        service.parts.store.close()
