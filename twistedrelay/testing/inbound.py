"""An inbound SMTP server in the test's own process, on a free loopback port.

For component tests and plugin authors: the real InboundService, QueueStore, policy and
hooks, on the running reactor, with metrics in a private registry and the mail log captured
in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from twisted.logger import LogEvent, Logger

from twistedrelay.config import Config, Endpoint, parse_config
from twistedrelay.eventlog import MailLog
from twistedrelay.hooks import HookRunner, load_plugins
from twistedrelay.metrics import RelayMetrics
from twistedrelay.policy import RelayPolicy
from twistedrelay.queue.store import QueueStore
from twistedrelay.smtp.inbound import InboundService
from twistedrelay.smtp.server import InboundParts


class InboundHarness:
    """Starts InboundService on 127.0.0.1 with a kernel-chosen port and a queue in ``directory``.

    :param settings: TOML-shaped dict for ``parse_config`` (the queue directory is set here).
    """

    def __init__(
        self,
        reactor: Any,
        directory: Path,
        settings: dict[str, Any] | None = None,
        hooks: HookRunner | None = None,
        on_queued: Callable[[str], None] | None = None,
    ) -> None:
        settings = dict(settings or {})
        settings.setdefault("hostname", "relay.example.test")
        config = parse_config(settings, "<test>")
        queue_dir = directory / "queue"
        config = replace(config, queue=replace(config.queue, directory=queue_dir))
        QueueStore.create(str(queue_dir))
        self.config: Config = config
        self.reactor = reactor
        self.store = QueueStore(str(queue_dir), reactor)
        self.log_events: list[LogEvent] = []
        self.queued: list[str] = []
        self.metrics = RelayMetrics()

        def queued(queue_id: str) -> None:
            self.queued.append(queue_id)
            if on_queued is not None:
                on_queued(queue_id)

        self.parts = InboundParts(
            config=config,
            reactor=reactor,
            store=self.store,
            policy=RelayPolicy(config.relay.mynetworks, config.relay.domains),
            hooks=hooks if hooks is not None else load_plugins(config.plugins, reactor),
            maillog=MailLog(Logger(namespace="twistedrelay.mail", observer=self.log_events.append)),
            metrics=self.metrics,
            on_queued=queued,
        )
        endpoints = {"smtp": [Endpoint("127.0.0.1", 0)]}
        self.service = InboundService(self.parts, endpoints=endpoints, drain_seconds=1.0)

    def start(self) -> int:
        """Start listening; returns the port."""
        self.service.startService()
        return int(self.service.listening_addresses()[0].port)

    async def stop(self) -> None:
        """Stop listening and close sessions, then release the queue's threads."""
        await self.service.stopService()
        self.store.close()

    def mail_log(self) -> list[str]:
        """The mail-log lines written so far."""
        return [e["mail_line"] for e in self.log_events if "mail_line" in e]
