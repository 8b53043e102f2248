"""An inbound SMTP server in the test's own process, on a free loopback port.

For component tests and plugin authors: the real InboundService, QueueStore, policy and
hooks, on the running reactor, with metrics in a private registry and the mail log captured
in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

from twisted.logger import ILogObserver, LogEvent, Logger

from twistedrelay.app import build_relay_policy, build_session_security
from twistedrelay.auth import LoginThrottle
from twistedrelay.config import Config, Endpoint, parse_config
from twistedrelay.eventlog import MailLog
from twistedrelay.hooks import HookRunner, load_plugins
from twistedrelay.metrics import RelayMetrics
from twistedrelay.queue.store import QueueStore
from twistedrelay.smtp.inbound import InboundService
from twistedrelay.smtp.server import InboundParts


class InboundHarness:
    """Starts InboundService on 127.0.0.1 with a kernel-chosen port and a queue in ``directory``.

    As in a worker, ``[tls]`` settings give the sessions a ServerTLS (STARTTLS, implicit TLS)
    and ``auth.users_file`` an Authenticator (app.build_session_security); the listeners'
    own addresses in ``[smtp]`` are ignored: each mode in ``listeners`` gets one
    kernel-chosen port on 127.0.0.1.

    :param settings: TOML-shaped dict for ``parse_config`` (the queue directory is set here).
    :param listeners: listener modes to open ("smtp", "submission", "submissions").
    :param throttle: the login throttle (default: the production settings).
    """

    def __init__(
        self,
        reactor: Any,  # the running reactor: TCP, time and its thread pool at once
        directory: Path,
        settings: dict[str, Any] | None = None,  # Any: TOML values of several types
        hooks: HookRunner | None = None,
        on_queued: Callable[[str], None] | None = None,
        listeners: Sequence[str] = ("smtp",),
        throttle: LoginThrottle | None = None,
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
        # A plain callable serves as an observer: Logger only calls it with each event.
        capture = cast(ILogObserver, self.log_events.append)
        self.queued: list[str] = []
        self.metrics = RelayMetrics()

        def queued(queue_id: str) -> None:
            self.queued.append(queue_id)
            if on_queued is not None:
                on_queued(queue_id)

        server_tls, authenticator = build_session_security(config, reactor)
        self.parts = InboundParts(
            config=config,
            reactor=reactor,
            store=self.store,
            policy=build_relay_policy(config),
            hooks=hooks if hooks is not None else load_plugins(config.plugins, reactor),
            maillog=MailLog(Logger(namespace="twistedrelay.mail", observer=capture)),
            metrics=self.metrics,
            on_queued=queued,
            server_tls=server_tls,
            authenticator=authenticator,
            throttle=throttle if throttle is not None else LoginThrottle(),
        )
        self.listeners = tuple(listeners)
        self.ports: dict[str, int] = {}
        endpoints = {mode: [Endpoint("127.0.0.1", 0)] for mode in self.listeners}
        self.service = InboundService(self.parts, endpoints=endpoints, drain_seconds=1.0)

    def start(self) -> int:
        """Start listening; returns the port of the first listener (all are in ``ports``)."""
        self.service.startService()
        addresses = self.service.listening_addresses()
        self.ports = {mode: int(a.port) for mode, a in zip(self.listeners, addresses, strict=True)}
        return self.ports[self.listeners[0]]

    async def stop(self) -> None:
        """Stop listening and close sessions, then release the queue's threads."""
        await self.service.stopService()
        self.store.close()

    def mail_log(self) -> list[str]:
        """The mail-log lines written so far."""
        return [e["mail_line"] for e in self.log_events if "mail_line" in e]
