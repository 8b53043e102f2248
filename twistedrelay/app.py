"""The composition root: twistd's Options and makeService, and the worker payload.

Only this module knows every part. ``makeService`` builds the master (process/master.py),
which binds the sockets and spawns the workers; each worker calls
:func:`build_worker_service`, which wires the queue, the inbound SMTP server, hooks, policy,
metrics, the mail log and the delivery engine together. Everything else receives its
collaborators as arguments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.internet import threads
from twisted.python import usage
from typing_extensions import override

from twistedrelay.auth import Authenticator, UsersFile, UsersFileError
from twistedrelay.config import Config, ConfigError, load_config
from twistedrelay.delivery.service import DeliveryService, build_delivery_service
from twistedrelay.eventlog import MailLog, configure_twistd_logger
from twistedrelay.hooks import HookRunner, load_plugins, plugin_state_directory, validate_plugins
from twistedrelay.metrics import RelayMetrics
from twistedrelay.metrics_http import metrics_service_factory
from twistedrelay.policy import RelayPolicy
from twistedrelay.process.master import MasterService
from twistedrelay.process.worker import DEFAULT_PAYLOAD, InheritedSocket
from twistedrelay.queue.store import QueueStore
from twistedrelay.smtp.inbound import InboundService
from twistedrelay.smtp.server import InboundParts
from twistedrelay.tls import ClientTLS, ServerTLS


class Options(usage.Options):
    """``twistd twistedrelay`` options."""

    optParameters = [
        ["config", "c", None, "relay.toml to use (default: the embedded default)"],
    ]

    @override
    def postOptions(self) -> None:
        # Check the config before twistd binds anything or daemonizes: errors name the key.
        try:
            self["relay_config"] = load_config(self["config"])
            validate_config(self["relay_config"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        if self.parent is not None:
            configure_twistd_logger(self.parent, self["relay_config"].log.format)


def makeService(options: Options) -> IService:
    """Build the master service tree (twistd calls this)."""
    from twisted.internet import reactor

    config: Config = options["relay_config"]
    return MasterService(
        config,
        options["config"],
        reactor,
        payload=DEFAULT_PAYLOAD,
        metrics_service=metrics_service_factory(reactor, config.queue.directory),
        validate=validate_config,
    )


class WorkerService(MultiService):
    """A worker's service tree, reloadable on SIGHUP without dropping connections.

    Sessions read their collaborators from the shared InboundParts at each command, so a new
    config (limits, relay policy, plugins) applies to every session from its next command,
    and a reloaded certificate to every new TLS handshake. Routes and delivery limits go to
    the delivery service.
    """

    def __init__(self, parts: InboundParts, delivery: DeliveryService) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        self.parts = parts
        self.delivery = delivery

    def reload_config(self, config: Config) -> None:
        """Apply a new, already validated config.

        Changed ``[plugins]`` are set up anew and take over from the next hook call; the
        old plugins are closed once calls already running have had their hook_timeout.

        :raises ConfigError: the new plugins or certificate cannot be loaded (the old ones
            stay).
        """
        reactor = self.parts.reactor
        hooks = None
        if config.plugins != self.parts.config.plugins:
            hooks = load_worker_plugins(config, reactor)
        if self.parts.server_tls is not None:
            try:
                self.parts.server_tls.reload()
            except ConfigError:
                if hooks is not None:
                    hooks.close()
                raise
        if hooks is not None:
            old = self.parts.hooks
            self.parts.hooks = self.delivery.hooks = hooks
            reactor.callLater(self.parts.config.plugins.hook_timeout + 1, old.close)
        self.parts.config = config
        self.parts.policy = build_relay_policy(config)
        self.delivery.reload_config(config)


def load_worker_plugins(config: Config, reactor: Any) -> HookRunner:
    """The enabled hook plugins of a worker, set up (hooks.py).

    :raises ConfigError: an unknown plugin or a bad setting.
    """
    return load_plugins(
        config.plugins,
        reactor,
        config.source,
        state_directory=plugin_state_directory(config),
        run_in_thread=partial(threads.deferToThreadPool, reactor, reactor.getThreadPool()),
    )


def build_relay_policy(config: Config) -> RelayPolicy:
    """The relay permission and the postmaster mailbox of ``config`` (policy.py)."""
    return RelayPolicy(config.relay.mynetworks, config.relay.domains, config.postmaster)


def validate_config(config: Config) -> None:
    """What loading the TOML cannot check: the plugins' settings and the files named.

    Used by ``check-config`` and by twistd before anything binds, so that a bad plugin
    setting or a missing certificate, key, users file or CA file stops start-up with one
    line naming the key, instead of workers that cannot start.

    :raises ConfigError: naming the file and the key.
    """
    validate_plugins(config.plugins, config.source)
    _load_server_tls(config)
    _load_users_file(config)
    ClientTLS(config.delivery.ca_file, config.source)


def build_session_security(
    config: Config, reactor: Any
) -> tuple[ServerTLS | None, Authenticator | None]:
    """The inbound TLS (``[tls]``) and the AUTH checker (``auth.users_file``) the config asks for.

    :raises ConfigError: a certificate, key or users file that cannot be used. A broken
        file stops the worker with a clear error instead of failing a session.
    """
    users = _load_users_file(config)
    authenticator = None
    if users is not None:
        authenticator = Authenticator(users, reactor, reactor.getThreadPool())
    return _load_server_tls(config), authenticator


def _load_server_tls(config: Config) -> ServerTLS | None:
    if config.tls.certificate and config.tls.private_key:
        return ServerTLS(config.tls.certificate, config.tls.private_key, config.source)
    return None


def _load_users_file(config: Config) -> UsersFile | None:
    if not config.auth.users_file:
        return None
    users = UsersFile(config.auth.users_file)
    try:
        users.reload()
    except UsersFileError as e:
        raise ConfigError(config.source, "auth.users_file", str(e)) from None
    return users


def build_worker_service(
    config: Config, slot: int, reactor: Any, sockets: Mapping[str, Sequence[InheritedSocket]]
) -> IService:
    """The worker payload: inbound SMTP on the inherited sockets plus the delivery engine."""
    # First what can fail on a bad file, before the queue starts its threads.
    server_tls, authenticator = build_session_security(config, reactor)
    store = QueueStore(str(config.queue.directory), reactor)
    metrics = RelayMetrics.for_worker()
    maillog = MailLog()
    hooks = load_worker_plugins(config, reactor)
    delivery = build_delivery_service(
        config, slot, reactor, store=store, metrics=metrics, maillog=maillog, hooks=hooks
    )
    parts = InboundParts(
        config=config,
        reactor=reactor,
        store=store,
        policy=build_relay_policy(config),
        hooks=hooks,
        maillog=maillog,
        metrics=metrics,
        on_queued=delivery.notify_queued,
        new_claims=delivery,
        server_tls=server_tls,
        authenticator=authenticator,
    )
    service = WorkerService(parts, delivery)
    # Inbound stops first (stop accepting, drain sessions), then delivery requeues its work.
    delivery.setServiceParent(service)  # type: ignore[no-untyped-call]  # unannotated Twisted
    drain = min(10.0, config.workers.shutdown_timeout / 2)
    inbound = InboundService(parts, sockets=sockets, drain_seconds=drain)
    inbound.setServiceParent(service)  # type: ignore[no-untyped-call]  # unannotated Twisted
    return service
