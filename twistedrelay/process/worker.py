"""A worker process: runs a payload service on listening sockets inherited from the master.

Owns the worker's life: its command line, adopting nothing itself but handing the inherited
sockets to the payload, the control channel on stdin, and a bounded drain on the way out.
It does not know what the payload does (inbound SMTP and delivery are built by
``twistedrelay.app:build_worker_service``); tests run stand-in payloads.

Command line (built by :func:`build_worker_argv`, run as ``python -m
twistedrelay.process.worker``)::

    --config PATH     the config file ("" = the embedded default)
    --slot N          the worker slot; its queue owner name is f"w{N}"
    --payload NAME    "package.module:callable", a WorkerPayload
    --fds SPEC        inherited listening sockets, "smtp=3,4;submission=5"

The payload contract (:class:`WorkerPayload`)::

    payload(config, slot, reactor, sockets) -> IService

``sockets`` maps each configured listener name ("smtp", "submission", "submissions") to a
sequence of :class:`InheritedSocket` (fd + address family); names with no address are
absent. The payload adopts them, typically in its service's ``startService``, with
``inherited.adopt(reactor, factory)`` (that is ``reactor.adoptStreamPort(fd, family,
factory)``; for implicit TLS, wrap the factory in ``TLSMemoryBIOFactory`` first). Its
``stopService`` must first stop listening, then finish or requeue in-flight work; the worker
bounds it by ``[workers] shutdown_timeout``. A service that also has
``reload_config(config)`` (:class:`ReloadableService`) is given each new valid config on
``reload``; otherwise a reload is logged and ignored.

Lifecycle invariants:

- SIGTERM, SIGINT, the ``drain`` control word and end of file on stdin (the master is gone)
  all stop the reactor; a "before shutdown" trigger stops the payload (bounded), and the
  process exits 0. On Linux the parent-death signal is SIGTERM as well, in case the stdin
  pipe was inherited elsewhere.
- SIGHUP and the ``reload`` control word re-read the config; a bad file is refused and
  logged, the old config kept.
- The payload failing to import or build exits 1, so the master's restart backoff applies.
- Log events are written one per line to stdout, without timestamps: the master re-logs each
  line with a "worker N" prefix and its own timestamp. With ``[log] format = "json"`` each
  line is a JSON object, which the master re-emits with its fields and ``worker=N``.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any, Protocol, TextIO, cast, runtime_checkable

from twisted.application.service import IService
from twisted.internet import defer, process
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IReactorSocket
from twisted.logger import ILogObserver, LogEvent, Logger, eventAsText, globalLogBeginner
from twisted.python.failure import Failure
from twisted.python.threadable import isInIOThread
from zope.interface import provider

from twistedrelay.config import Config, ConfigError, load_config
from twistedrelay.eventlog import MAIL_LINE_FORMAT, json_lines_observer
from twistedrelay.process.control import ControlCommand, ControlDecoder
from twistedrelay.transport import adopt_stream_port

DEFAULT_PAYLOAD = "twistedrelay.app:build_worker_service"
CONTROL_FD = 0

# Named explicitly: run with -m, this module's __name__ is "__main__".
log = Logger(namespace="twistedrelay.process.worker")


@dataclass(frozen=True, slots=True)
class InheritedSocket:
    """A listening socket the worker inherited from the master.

    :ivar fd: the file descriptor number in this process.
    :ivar family: its address family (AF_INET or AF_INET6).
    """

    fd: int
    family: socket.AddressFamily

    def adopt(self, reactor: IReactorSocket, factory: IProtocolFactory) -> IListeningPort:
        """Start accepting on this socket with ``factory`` (``reactor.adoptStreamPort``).

        The reactor works on a duplicate of the descriptor; stopping the returned port stops
        this worker accepting, not the others. Accepted connections write at once
        (twistedrelay.transport).
        """
        return adopt_stream_port(reactor, self.fd, self.family, factory)


class WorkerPayload(Protocol):
    """What runs inside a worker: builds the services given the inherited listening sockets."""

    def __call__(
        self,
        config: Config,
        slot: int,
        reactor: Any,
        sockets: Mapping[str, Sequence[InheritedSocket]],
    ) -> IService:
        """Build (not start) the worker's service tree.

        :param slot: the worker slot; the queue owner name for claims is f"w{slot}".
        :param reactor: the running reactor (typed Any: no one Twisted interface covers it).
        :param sockets: listener name → inherited sockets, see the module docstring.
        """


@runtime_checkable
class ReloadableService(Protocol):
    """A payload service that applies a new config without dropping connections."""

    def reload_config(self, config: Config) -> object:
        """Apply ``config`` (may return a Deferred); raising keeps the old config."""


# -- the command line ----------------------------------------------------------------------


def format_fds(fds: Mapping[str, Sequence[int]]) -> str:
    """Encode listener name → child fds as "smtp=3,4;submission=5" (empty names left out)."""
    return ";".join(f"{name}={','.join(map(str, n))}" for name, n in fds.items() if n)


def parse_fds(text: str) -> dict[str, tuple[int, ...]]:
    """Decode what :func:`format_fds` wrote.

    :raises ValueError: the text is not of that form.
    """
    fds: dict[str, tuple[int, ...]] = {}
    for part in filter(None, text.split(";")):
        name, equals, numbers = part.partition("=")
        if not equals or not name or name in fds:
            raise ValueError(f"bad --fds part {part!r}")
        fds[name] = tuple(int(n) for n in numbers.split(","))
    return fds


def build_worker_argv(
    executable: str, config_path: str | None, slot: int, payload: str, fds: str
) -> list[str]:
    """The argv the master spawns a worker with (argv[0] is ``executable``)."""
    return [
        executable,
        "-m",
        "twistedrelay.process.worker",
        "--config",
        config_path or "",
        "--slot",
        str(slot),
        "--payload",
        payload,
        "--fds",
        fds,
    ]


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="twistedrelay.process.worker")
    parser.add_argument("--config", default="", help='config file ("" = embedded default)')
    parser.add_argument("--slot", type=int, required=True)
    parser.add_argument("--payload", default=DEFAULT_PAYLOAD)
    parser.add_argument("--fds", type=parse_fds, default={})
    return parser.parse_args(argv)


# -- pieces of start-up --------------------------------------------------------------------


def load_payload(name: str) -> WorkerPayload:
    """Import "package.module:callable".

    :raises ImportError: the module or the attribute does not exist.
    """
    module_name, _, attribute = name.partition(":")
    module = importlib.import_module(module_name)
    try:
        payload: WorkerPayload = getattr(module, attribute)
    except AttributeError:
        raise ImportError(f"{module_name} has no attribute {attribute!r}") from None
    return payload


def inherit_sockets(fds: Mapping[str, Sequence[int]]) -> dict[str, tuple[InheritedSocket, ...]]:
    """Describe each inherited fd (its family is read from the socket itself), non-blocking."""
    inherited = {}
    for name, numbers in fds.items():
        sockets = []
        for fd in numbers:
            probe = socket.socket(fileno=fd)
            # The reactor accepts in a loop until EAGAIN: a blocking socket would hang it.
            probe.setblocking(False)
            sockets.append(InheritedSocket(fd, probe.family))
            probe.detach()  # keep the fd open: it belongs to the worker, not the probe
        inherited[name] = tuple(sockets)
    return inherited


def set_parent_death_signal(signum: int = signal.SIGTERM) -> bool:
    """Ask Linux to send ``signum`` when the master dies (prctl PR_SET_PDEATHSIG).

    :returns: whether it was set (False on other systems; stdin EOF still covers them).
    """
    if not sys.platform.startswith("linux"):
        return False
    pr_set_pdeathsig = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(pr_set_pdeathsig, signum, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


class ReactorFlushedStream:
    """A text stream whose flush() is put off to the end of the reactor's current turn.

    A worker logs every mail event through the master (stdout is a pipe to it). Flushing
    each line cost a write(2) and a wake-up of the master per line, about 10% of a loaded
    worker's reactor thread; flushed once per reactor turn, the lines of one turn go out in
    one write and one wake-up. Before attach() and after detach(), flush() flushes at once
    (start-up errors, the last lines after the reactor stopped). The text is buffered here,
    not in ``stream``, which may write through (PYTHONUNBUFFERED); more than
    ``MAX_BUFFERED`` characters are written at once.

    :param stream: the stream to write to (the worker's stdout).
    """

    MAX_BUFFERED = 64 * 1024

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._reactor: Any = None
        self._scheduled = False
        # Pool threads log too: the lock keeps a line from landing in a list being written.
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._pending_size = 0

    def write(self, text: str) -> int:
        """Buffer ``text`` until the next flush."""
        with self._lock:
            self._pending.append(text)
            self._pending_size += len(text)
            full = self._pending_size > self.MAX_BUFFERED
        if full:
            self._write_pending()
        return len(text)

    def flush(self) -> None:
        """Flush at the end of this reactor turn (at once when no reactor is attached)."""
        reactor = self._reactor
        if reactor is None:
            self._flush_now()
            return
        if self._scheduled:
            return
        self._scheduled = True
        if isInIOThread():  # type: ignore[no-untyped-call]  # twisted.python.threadable is unannotated
            reactor.callLater(0, self._flush_now)
        else:  # a pool thread logged: hop to the reactor, which owns the flushing
            reactor.callFromThread(self._flush_now)

    def attach(self, reactor: Any) -> None:
        """Put off flushes to ``reactor``'s turns from now on (Any: IReactorTime and threads)."""
        self._reactor = reactor

    def detach(self) -> None:
        """Flush now and from now on flush at once (the reactor has stopped)."""
        self._reactor = None
        self._flush_now()

    def _flush_now(self) -> None:
        self._scheduled = False
        self._write_pending()
        self._stream.flush()

    def _write_pending(self) -> None:
        with self._lock:
            pending, self._pending, self._pending_size = self._pending, [], 0
            if pending:
                self._stream.write("".join(pending))


def line_observer(stream: TextIO | ReactorFlushedStream) -> ILogObserver:
    """A log observer writing each event as "[namespace#level] text" lines, flushed."""

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        if event.get("log_format") == MAIL_LINE_FORMAT and "log_failure" not in event:
            # What eventAsText gives for a mail log line, without parsing the format.
            text = f"[{event['log_namespace']}#{event['log_level'].name}] {event['mail_line']}"
        else:
            text = eventAsText(event, includeTimestamp=False)
        if text:
            stream.write(text if text.endswith("\n") else text + "\n")
            stream.flush()

    return cast(ILogObserver, observe)  # provider() is unannotated, so observe is typed Any


class _ControlReader:
    """Receives the control pipe's bytes from Twisted's pipe reader."""

    def __init__(self, worker: WorkerProcess) -> None:
        self._worker = worker
        self._decoder = ControlDecoder()

    def childDataReceived(self, name: str, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        for command in self._decoder.feed(data):
            self._worker.handle_command(command)
        for word in self._decoder.unknown:
            log.warn("ignoring unknown control word {word!r}", word=word)
        self._decoder.unknown.clear()

    def childConnectionLost(self, name: str, reason: Failure) -> None:  # noqa: N802
        self._worker.master_gone()


class WorkerProcess:
    """One worker's life: start the payload service, react to control, drain on the way out.

    :param reactor: the reactor (Any: it must provide several reactor interfaces).
    :param config_path: the config file to re-read on reload (None = embedded default).
    """

    def __init__(
        self, reactor: Any, config: Config, config_path: str | None, slot: int, service: IService
    ) -> None:
        self._reactor = reactor
        self.config = config
        self._config_path = config_path
        self.slot = slot
        self.service = service
        self._stopping = False

    def start(self) -> None:
        """Start the payload service once the reactor runs, and watch the control pipe."""
        self._reactor.addSystemEventTrigger("before", "shutdown", self.drain)
        process.ProcessReader(self._reactor, _ControlReader(self), "control", CONTROL_FD)
        self.service.privilegedStartService()
        self.service.startService()
        log.info("worker {slot} started", slot=self.slot)

    def handle_command(self, command: ControlCommand) -> None:
        """Act on one control word from the master."""
        if command is ControlCommand.RELOAD:
            self.reload()
        elif command is ControlCommand.DRAIN:
            self.stop("drain requested")

    def master_gone(self) -> None:
        """The control pipe closed: the master died or is stopping; do not outlive it."""
        self.stop("master gone (end of file on stdin)")

    def stop(self, why: str) -> None:
        """Stop the reactor (the shutdown trigger drains the payload), once."""
        if not self._stopping:
            self._stopping = True
            log.info("worker {slot} stopping: {why}", slot=self.slot, why=why)
            self._reactor.stop()

    def reload(self) -> None:
        """Re-read the config file; refuse a bad one, give a good one to the payload."""
        try:
            config = load_config(self._config_path)
        except ConfigError as e:
            log.error("refusing the new config, keeping the old one: {error}", error=str(e))
            return
        if not isinstance(self.service, ReloadableService):
            log.warn("config re-read, but this payload cannot apply it without a restart")
            return
        result = defer.maybeDeferred(self.service.reload_config, config)

        def applied(_: object) -> None:
            self.config = config
            log.info("worker {slot} reloaded {source}", slot=self.slot, source=config.source)

        def refused(failure: Failure) -> None:
            log.failure("payload refused the new config, keeping the old one", failure)

        result.addCallbacks(applied, refused)

    def drain(self) -> defer.Deferred[None]:
        """Stop the payload service, waiting at most ``[workers] shutdown_timeout``."""
        self._stopping = True
        timeout = self.config.workers.shutdown_timeout
        stopped = defer.maybeDeferred(self.service.stopService)
        stopped.addTimeout(timeout, self._reactor)

        def done(result: object) -> None:
            if isinstance(result, Failure):
                if result.check(defer.TimeoutError):
                    log.warn("drain did not finish within {timeout} s, exiting", timeout=timeout)
                else:
                    log.failure("payload failed while stopping", result)
            log.info("worker {slot} stopped", slot=self.slot)

        return stopped.addBoth(done)


def main(argv: Sequence[str] | None = None, reactor: Any = None) -> int:
    """Run one worker until it is told to stop.

    :returns: the exit status: 0 after a drain, 1 if the payload could not start, 2 for an
        unusable command line or config.
    """
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    set_parent_death_signal()
    config_path = args.config or None
    try:
        config: Config | None = load_config(config_path)
    except ConfigError as e:
        config, config_error = None, e
    stdout = ReactorFlushedStream(sys.stdout)
    if config is not None and config.log.format == "json":
        # One JSON object per line; the master re-emits it with its fields (eventlog.py).
        # json_lines_observer is typed for a TextIO; the stream has the write/flush it uses.
        observer = json_lines_observer(stdout)  # type: ignore[arg-type]
    else:
        observer = line_observer(stdout)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    if config is None:
        log.critical("cannot start: {error}", error=str(config_error))
        return 2
    if reactor is None:
        from twisted.internet import reactor
    stdout.attach(reactor)
    try:
        return _run(reactor, config, config_path, args)
    finally:
        stdout.detach()


def _run(reactor: Any, config: Config, config_path: str | None, args: argparse.Namespace) -> int:
    try:
        payload = load_payload(args.payload)
        service = payload(config, args.slot, reactor, inherit_sockets(args.fds))
    except Exception:
        log.failure("cannot build the worker payload {name}", name=args.payload)
        return 1
    worker = WorkerProcess(reactor, config, config_path, args.slot, service)
    signal.signal(signal.SIGHUP, _reload_on_signal(reactor, worker))
    failures: list[Failure] = []
    reactor.callWhenRunning(_start, reactor, worker, failures)
    reactor.run()
    return 1 if failures else 0


def _start(reactor: Any, worker: WorkerProcess, failures: list[Failure]) -> None:
    try:
        worker.start()
    except Exception:
        failures.append(Failure())
        log.failure("the worker payload failed to start", failures[-1])
        reactor.stop()


def _reload_on_signal(
    reactor: Any, worker: WorkerProcess
) -> Callable[[int, FrameType | None], None]:
    def handle(signum: int, frame: FrameType | None) -> None:
        # A signal handler may run between any two bytecodes: hop to the reactor's loop.
        reactor.callFromThread(worker.reload)

    return handle


if __name__ == "__main__":
    status = main()
    if status:
        # A payload that failed half-built may have left threads running (a queue's pool)
        # that would keep the process alive: the master must see it end, to restart it.
        sys.stdout.flush()
        os._exit(status)
    sys.exit(status)
