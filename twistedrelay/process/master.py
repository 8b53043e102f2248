"""The master process: binds the sockets, supervises the workers, returns their claims.

Owns the process tree of the relay (DESIGN.md "Processes"). The master never accepts a mail
connection and never delivers: it binds every listener before privileges are dropped
(sockets.py), creates the queue, returns entries claimed by workers that no longer run,
spawns ``[workers] count`` workers handing each the listening sockets (``spawnProcess``
childFDs; the worker adopts them), restarts a worker that dies, and forwards SIGHUP as a
config reload. The services workers run are the payload's business (worker.py).

Invariants:

- A queue entry in ``active/w{slot}/`` belongs to the worker running in that slot. When that
  worker is gone (it died, or the master starts with none running), the master moves the
  entries back to ``incoming/`` before a new worker takes the slot, so nothing claimed is
  lost and no two live workers own one entry.
- Every worker is the master's child; the master reaps it (Twisted's SIGCHLD handling), and
  a worker whose master dies exits by itself (its stdin pipe closes; Linux also sends it
  SIGTERM through PR_SET_PDEATHSIG).
- Restarts back off: 1 s after a death, doubling to 30 s while the worker keeps dying within
  30 s of its start, so a crash loop is logged and slowed, never spun.
- Stopping is bounded: SIGTERM to every worker, at most ``[workers] shutdown_timeout``
  seconds (plus a short grace) for them to drain, then SIGKILL for stragglers.
"""

from __future__ import annotations

import grp
import os
import pwd
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import Any, Protocol

from twisted.application.service import IService, MultiService, Service
from twisted.internet import defer, error
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import LogEvent, Logger, LogLevel
from twisted.python.failure import Failure
from typing_extensions import override

from twistedrelay.config import Config, ConfigError, load_config
from twistedrelay.eventlog import RELAYED_TEXT, relayed_batches_observed, relayed_json_event
from twistedrelay.metrics import mark_worker_dead, prepare_multiprocess_dir, worker_environment
from twistedrelay.process.control import ControlCommand, encode_command
from twistedrelay.process.sockets import BoundSocket, ListeningSockets
from twistedrelay.process.worker import DEFAULT_PAYLOAD, build_worker_argv, format_fds
from twistedrelay.queue.store import QueueStore

log = Logger()

FIRST_RESTART_DELAY_SECONDS = 1.0
MAX_RESTART_DELAY_SECONDS = 30.0
#: A worker that ran this long before dying was healthy: its next restart is quick again.
STABLE_UPTIME_SECONDS = 30.0
#: After the drain bound, how long SIGKILLed workers get to be reaped.
KILL_GRACE_SECONDS = 2.0
#: Worker output lines are cut here, so a worker cannot make the master buffer without limit.
MAX_LOG_LINE_BYTES = 16 * 1024
#: The first inherited listening socket is fd 3, after stdin, stdout and stderr.
FIRST_LISTENER_FD = 3

#: Built by the composition root: serves /metrics on the bound socket from the directory the
#: workers write their multi-process metric files to.
MetricsServiceFactory = Callable[[BoundSocket, str], IService]


def owner_name(slot: int) -> str:
    """The queue owner name of a worker slot (its claims live in active/<owner>/)."""
    return f"w{slot}"


def restart_delay(previous_seconds: float | None, uptime_seconds: float) -> float:
    """How long to wait before restarting a worker that died after ``uptime_seconds``.

    :param previous_seconds: the delay used before this worker's start (None: first death).
    """
    if previous_seconds is None or uptime_seconds >= STABLE_UPTIME_SECONDS:
        return FIRST_RESTART_DELAY_SECONDS
    return min(previous_seconds * 2, MAX_RESTART_DELAY_SECONDS)


def worker_identity(config: Config) -> tuple[int | None, int | None]:
    """The uid and gid to spawn workers with, from ``[workers] user/group`` (None: as master).

    :raises ConfigError: the user or group does not exist.
    """
    uid = gid = None
    if config.workers.user:
        try:
            entry = pwd.getpwnam(config.workers.user)
        except KeyError:
            raise ConfigError(config.source, "workers.user", "no such user") from None
        uid, gid = entry.pw_uid, entry.pw_gid
    if config.workers.group:
        try:
            gid = grp.getgrnam(config.workers.group).gr_gid
        except KeyError:
            raise ConfigError(config.source, "workers.group", "no such group") from None
    return uid, gid


def give_tree(directory: str, uid: int | None, gid: int | None) -> int:
    """Make ``uid``/``gid`` (None: unchanged) own ``directory`` and everything below it.

    :returns: how many entries changed owner (only those that differed are touched).
    """
    changed = 0
    for root, _, files in os.walk(directory):
        for path in (root, *(os.path.join(root, name) for name in files)):
            changed += _give(path, uid, gid)
    return changed


def _give(path: str, uid: int | None, gid: int | None) -> int:
    try:
        stat = os.lstat(path)
    except FileNotFoundError:
        return 0  # removed meanwhile
    if (uid is None or stat.st_uid == uid) and (gid is None or stat.st_gid == gid):
        return 0
    os.lchown(path, -1 if uid is None else uid, -1 if gid is None else gid)
    return 1


class ClaimReturner(Protocol):
    """The part of the queue the master uses (QueueStore provides it)."""

    def reclaim(self, owner: str) -> int:
        """Move active/<owner>/ entries back to incoming/; return how many."""

    def reclaim_all(self) -> int:
        """Move every active entry back to incoming/; return how many."""

    def remove_stale_tmp(self, older_than_seconds: float) -> int:
        """Remove abandoned files in tmp/; return how many."""

    def remove_spares(self, owner: str | None = None) -> int:
        """Remove the spare files of ``owner`` (None: of all) from tmp/; return how many."""


class WorkerProcessProtocol(ProcessProtocol):
    """The master's end of one worker: relays its output to the log, reports its end.

    :param slot: the worker slot (also in every relayed log line).
    :param on_ended: called with this protocol and the reason once the process is reaped.
    """

    def __init__(
        self,
        slot: int,
        started_at: float,
        on_ended: Callable[[WorkerProcessProtocol, Failure], None],
    ) -> None:
        self.slot = slot
        self.started_at = started_at
        self.pid: int | None = None
        self.ended = False
        self._on_ended = on_ended
        self._partial: dict[int, bytes] = {1: b"", 2: b""}
        self._waiters: list[defer.Deferred[None]] = []

    @override
    def connectionMade(self) -> None:
        assert self.transport is not None  # makeConnection set it
        self.pid = self.transport.pid

    @override
    def childDataReceived(self, childFD: int, data: bytes) -> None:  # noqa: N803
        self._relay_output(childFD, data)

    @override
    def processEnded(self, reason: Failure) -> None:
        self._finish_output()
        self.ended = True
        self._on_ended(self, reason)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def send(self, command: ControlCommand) -> None:
        """Write a control word to the worker's stdin (ignored once it has ended)."""
        if not self.ended and self.transport is not None:
            self.transport.write(encode_command(command))

    def signal(self, name: str) -> None:
        """Send a signal ("TERM", "KILL"); a worker that already exited is not an error."""
        if not self.ended and self.transport is not None:
            try:
                self.transport.signalProcess(name)
            except error.ProcessExitedAlready:
                pass

    def when_ended(self) -> defer.Deferred[None]:
        """A Deferred that fires once the worker is reaped; cancelling it only stops waiting."""
        if self.ended:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred(self._waiters.remove)
        self._waiters.append(waiter)
        return waiter

    def _relay_output(self, fd: int, data: bytes) -> None:
        lines = (self._partial.get(fd, b"") + data).split(b"\n")
        rest = lines.pop()
        if len(rest) > MAX_LOG_LINE_BYTES:
            lines.append(rest)
            rest = b""
        self._partial[fd] = rest
        self._log_lines(fd, lines)

    def _finish_output(self) -> None:
        for fd, rest in self._partial.items():
            if rest:
                self._log_lines(fd, [rest])
        self._partial = {}

    def _log_lines(self, fd: int, raws: list[bytes]) -> None:
        """Re-log a read's worth of lines: one event each, published as one batch if possible.

        Per line through twistd's observer (format, write, flush) the master spent about 10 %
        of the relay's CPU; the master's own observer (eventlog) writes a batch at once.
        """
        if not raws:
            return
        events = [self._line_event(fd, raw) for raw in raws]
        if relayed_batches_observed():
            log.emit(
                LogLevel.info,
                "{relayed_count} worker lines",
                relayed_count=len(events),
                relayed_events=events,
            )
            return
        for event in events:
            log.observer(event)

    def _line_event(self, fd: int, raw: bytes) -> LogEvent:
        line = raw[:MAX_LOG_LINE_BYTES].rstrip(b"\r").decode("utf-8", "replace")
        if fd == 1 and line.startswith("{"):
            event = relayed_json_event(line, worker=self.slot)
            if event is not None:
                return event
        text = f"worker {self.slot}: {line}"
        return {
            "log_format": "worker {slot}: {line}",
            # stderr carries what escaped the log (a traceback at import time, a C library).
            "log_level": LogLevel.warn if fd == 2 else LogLevel.info,
            "log_namespace": log.namespace,
            "log_source": None,
            "log_logger": log,
            "log_time": time.time(),
            "slot": self.slot,
            "line": line,
            RELAYED_TEXT: text,
        }


class WorkerSupervisor(Service):
    """Keeps ``count`` workers running, restarting the dead with backoff.

    :param reactor: provides spawnProcess and the clock (Any: several reactor interfaces).
    :param config: the config (``workers.shutdown_timeout`` is re-read after a reload).
    :param config_path: passed to workers so they read the same file (None: the default).
    :param listeners: the bound sockets to hand to every worker.
    :param queue: returns a dead worker's claimed entries.
    :param payload: the worker payload's dotted name.
    :param environment: the workers' environment.
    """

    def __init__(
        self,
        reactor: Any,
        config: Config,
        config_path: str | None,
        listeners: ListeningSockets,
        queue: ClaimReturner,
        payload: str,
        environment: Mapping[str, str],
        metrics_directory: str,
    ) -> None:
        self._reactor = reactor
        self.config = config
        self._config_path = config_path
        self._listeners = listeners
        self._queue = queue
        self._payload = payload
        self._environment = dict(environment)
        self._metrics_directory = metrics_directory
        self._uid, self._gid = worker_identity(config)
        self.workers: dict[int, WorkerProcessProtocol] = {}
        self._delays: dict[int, float | None] = {}
        self._pending: dict[int, IDelayedCall] = {}  # slot -> the call that restarts it
        self._stopping = False

    @override
    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        self._stopping = False
        for slot in range(self.config.worker_count):
            self._delays[slot] = None
            self.spawn(slot)

    @override
    def stopService(self) -> defer.Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        return defer.ensureDeferred(self.stop_workers())

    def spawn(self, slot: int) -> WorkerProcessProtocol:
        """Start the worker of ``slot``, handing it the listening sockets as fds 3, 4 and on."""
        self._pending.pop(slot, None)
        child_fds: dict[int, str | int] = {0: "w", 1: "r", 2: "r"}
        fds_by_name: dict[str, list[int]] = {}
        next_fd = FIRST_LISTENER_FD
        for name, bound_sockets in self._listeners.by_name(slot).items():
            for bound in bound_sockets:
                child_fds[next_fd] = bound.sock.fileno()
                fds_by_name.setdefault(name, []).append(next_fd)
                next_fd += 1
        argv = build_worker_argv(
            sys.executable, self._config_path, slot, self._payload, format_fds(fds_by_name)
        )
        worker = WorkerProcessProtocol(slot, self._reactor.seconds(), self._worker_ended)
        self._reactor.spawnProcess(
            worker,
            sys.executable,
            argv,
            env=self._environment,
            childFDs=child_fds,
            uid=self._uid,
            gid=self._gid,
        )
        self.workers[slot] = worker
        log.info("worker {slot} started as pid {pid}", slot=slot, pid=worker.pid)
        return worker

    def send_all(self, command: ControlCommand) -> None:
        """Write a control word to every running worker."""
        for worker in self.workers.values():
            worker.send(command)

    async def stop_workers(self) -> None:
        """SIGTERM every worker, wait (bounded), SIGKILL stragglers, wait for them to be reaped."""
        self._stopping = True
        for call in self._pending.values():
            call.cancel()
        self._pending.clear()
        timeout = self.config.workers.shutdown_timeout + KILL_GRACE_SECONDS
        for worker in self.workers.values():
            worker.signal("TERM")
        if not await self._wait_for_workers(timeout):
            for worker in self.workers.values():
                log.warn(
                    "worker {slot} (pid {pid}) still running after {timeout} s: SIGKILL",
                    slot=worker.slot,
                    pid=worker.pid,
                    timeout=timeout,
                )
                worker.signal("KILL")
            await self._wait_for_workers(KILL_GRACE_SECONDS)

    async def _wait_for_workers(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` seconds) for every worker to end; return whether all did."""
        outcome: defer.Deferred[bool] = defer.Deferred()

        def settle(all_ended: bool) -> None:
            if not outcome.called:
                outcome.callback(all_ended)

        waiters = [w.when_ended() for w in self.workers.values()]
        defer.DeferredList(waiters, consumeErrors=True).addCallback(lambda _: settle(True))
        timer = self._reactor.callLater(timeout, settle, False)
        all_ended = await outcome
        if timer.active():
            timer.cancel()
        for waiter in waiters:
            if not waiter.called:
                waiter.cancel()
        return all_ended

    def _worker_ended(self, worker: WorkerProcessProtocol, reason: Failure) -> None:
        if self.workers.get(worker.slot) is worker:
            del self.workers[worker.slot]
        uptime = self._reactor.seconds() - worker.started_at
        log.info(
            "worker {slot} (pid {pid}) ended after {uptime:.1f} s: {why}",
            slot=worker.slot,
            pid=worker.pid,
            uptime=uptime,
            why=_describe_end(reason),
        )
        self._return_claims(worker)
        if self._stopping or not self.running:
            return
        delay = restart_delay(self._delays.get(worker.slot), uptime)
        self._delays[worker.slot] = delay
        if delay > FIRST_RESTART_DELAY_SECONDS:
            log.warn(
                "worker {slot} is crash-looping: next restart in {delay:.0f} s",
                slot=worker.slot,
                delay=delay,
            )
        self._pending[worker.slot] = self._reactor.callLater(delay, self.spawn, worker.slot)

    def _return_claims(self, worker: WorkerProcessProtocol) -> None:
        owner = owner_name(worker.slot)
        try:
            returned = self._queue.reclaim(owner)
            self._queue.remove_spares(owner)
        except OSError as e:
            log.error("cannot return the entries of {owner}: {error}", owner=owner, error=e)
        else:
            if returned:
                log.info(
                    "returned {count} entries of {owner} to incoming", count=returned, owner=owner
                )
        if worker.pid is not None:
            try:
                mark_worker_dead(worker.pid, self._metrics_directory)
            except OSError as e:
                log.error("cannot clear the metrics of pid {pid}: {error}", pid=worker.pid, error=e)


def _describe_end(reason: Failure) -> str:
    value = reason.value
    if isinstance(value, error.ProcessTerminated) and value.signal is not None:
        return f"killed by signal {value.signal}"
    if isinstance(value, error.ProcessTerminated | error.ProcessDone):
        return f"exit status {value.exitCode}"
    return str(value)


class MasterService(MultiService):
    """The twistd service of the relay: listening sockets, queue set-up, worker supervision.

    :param config: the loaded config.
    :param config_path: the file it came from, re-read on SIGHUP and by workers (None: the
        embedded default).
    :param reactor: the reactor (Any: spawnProcess, callLater, callFromThread are used).
    :param payload: the dotted name of the worker payload (see worker.py).
    :param metrics_service: builds the /metrics service from the bound ``[metrics] listen``
        socket and the multi-process directory; None serves no metrics and binds no socket.
    :param metrics_directory: where workers write metric files (default: <queue>/metrics).
        It is emptied at start so a previous run's counters are not summed again.
    :param validate: checks a config beyond its TOML (plugin settings, the files it names)
        before a SIGHUP hands it to the workers; raises ConfigError to refuse it.
    :raises ConfigError: ``[workers] user`` or ``group`` does not exist.
    """

    def __init__(
        self,
        config: Config,
        config_path: str | None,
        reactor: Any,
        *,
        payload: str = DEFAULT_PAYLOAD,
        metrics_service: MetricsServiceFactory | None = None,
        metrics_directory: str | None = None,
        validate: Callable[[Config], None] | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        self.config = config
        self.config_path = config_path
        self._reactor = reactor
        self._payload = payload
        self._validate = validate
        self._metrics_service = metrics_service
        # Absolute: workers get it in their environment and might not share our cwd.
        self.metrics_directory = os.path.abspath(
            metrics_directory or os.path.join(config.queue.directory, "metrics")
        )
        worker_identity(config)  # fail in makeService, not after the sockets are bound
        self.listeners = ListeningSockets(
            config, include_metrics=metrics_service is not None, copies=config.worker_count
        )
        self.listeners.setServiceParent(self)  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        self.supervisor: WorkerSupervisor | None = None
        self._previous_handlers: dict[int, Any] = {}  # Any: what signal.signal returns

    @override
    def startService(self) -> None:
        self.listeners.bind_all()  # already bound if privilegedStartService ran
        self.prepare()
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        self._previous_handlers[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._sighup)
        # After startup, because the reactor installs its own SIGTERM handler then.
        self._reactor.callWhenRunning(self._install_sigterm_handler)

    @override
    def stopService(self) -> defer.Deferred[None]:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()
        # MultiService is unannotated: its stopService returns a Deferred[None], typed Any.
        return super().stopService()  # type: ignore[no-untyped-call,no-any-return]

    def _install_sigterm_handler(self) -> None:
        """Stop on SIGTERM like the reactor does, but so that the process then exits 0.

        The reactor's handler records the signal, and twistd re-raises it once stopped, so
        the relay would end "killed by SIGTERM". An orderly stop is a success (issue 4).
        """
        if self.running:
            self._previous_handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._sigterm)

    def prepare(self) -> None:
        """Create the queue and metrics directory, return every claim, add the children.

        No worker runs yet, so every entry in active/ belongs to a dead process, every
        spare file in tmp/ is unused (queue/spares.py), and every other file in tmp/
        untouched for longer than an SMTP session may pause is abandoned.
        """
        directory = str(self.config.queue.directory)
        QueueStore.create(directory)
        queue = QueueStore(directory, self._reactor, threads=1)
        returned = queue.reclaim_all()
        removed = queue.remove_spares() + queue.remove_stale_tmp(
            self.config.smtp.data_timeout + self.config.plugins.hook_timeout
        )
        log.info(
            "queue {directory}: returned {returned} claimed entries to incoming, "
            "removed {removed} stale and spare files from tmp/",
            directory=directory,
            returned=returned,
            removed=removed,
        )
        metrics_directory = prepare_multiprocess_dir(self.metrics_directory)
        uid, gid = worker_identity(self.config)
        if uid is not None or gid is not None:
            # The workers write the queue as [workers] user: give them what the master
            # made as root (the directories above, files of a run as another user).
            changed = give_tree(directory, uid, gid) + give_tree(str(metrics_directory), uid, gid)
            if changed:
                log.info(
                    "queue {directory}: gave {count} files to the workers' user",
                    directory=directory,
                    count=changed,
                )
        environment = {**os.environ, **worker_environment(metrics_directory)}
        self.supervisor = WorkerSupervisor(
            self._reactor,
            self.config,
            self.config_path,
            self.listeners,
            queue,
            self._payload,
            environment,
            str(metrics_directory),
        )
        self.supervisor.setServiceParent(self)  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        metrics_socket = self.listeners.metrics_socket()
        if self._metrics_service is not None and metrics_socket is not None:
            self._metrics_service(metrics_socket, str(metrics_directory)).setServiceParent(self)

    def reload(self) -> bool:
        """Re-read the config file; refuse a bad one, else tell every worker to reload.

        Listeners, the queue directory and the worker count are fixed at start: a change to
        them is logged as needing a restart.

        :returns: whether the new config was accepted.
        """
        try:
            config = load_config(self.config_path)
            if self._validate is not None:
                self._validate(config)
        except ConfigError as e:
            log.error("SIGHUP: refusing the new config, keeping the old one: {error}", error=str(e))
            return False
        for key in _restart_only_changes(self.config, config):
            log.warn("SIGHUP: {key} changed; it takes effect after a restart", key=key)
        self.config = config
        if self.supervisor is not None:
            self.supervisor.config = config
            self.supervisor.send_all(ControlCommand.RELOAD)
        log.info("SIGHUP: config {source} reloaded; workers told to reload", source=config.source)
        return True

    def _sighup(self, signum: int, frame: FrameType | None) -> None:
        # A signal handler may run between any two bytecodes: hop to the reactor's loop.
        self._reactor.callFromThread(self.reload)

    def _sigterm(self, signum: int, frame: FrameType | None) -> None:
        self._reactor.callFromThread(self._stop_reactor)

    def _stop_reactor(self) -> None:
        if self.running:
            log.info("SIGTERM: stopping the workers, then the master")
            self._reactor.stop()


def _restart_only_changes(old: Config, new: Config) -> Sequence[str]:
    checks = {
        "smtp.listen": (old.smtp.listen, new.smtp.listen),
        "smtp.submission": (old.smtp.submission, new.smtp.submission),
        "smtp.submissions": (old.smtp.submissions, new.smtp.submissions),
        "metrics.listen": (old.metrics.listen, new.metrics.listen),
        "queue.directory": (old.queue.directory, new.queue.directory),
        "workers": (
            (old.worker_count, old.workers.user, old.workers.group),
            (new.worker_count, new.workers.user, new.workers.group),
        ),
    }
    return [key for key, (before, after) in checks.items() if before != after]
