"""SinkServer: the bench sink started in-process, for tests that need a receiving SMTP server.

Owns the test-facing API over :mod:`twistedrelay.bench.sink_server`: start on 127.0.0.1
port 0 under the running reactor, script the replies per stage, read back what arrived
(messages, recipients, connections, most connections at once), wait for messages with a
deadline, and stop cleanly. The sink is standalone (it shares no code with the relay's
SMTP server), so a delivery test checks the relay's client against an independent server.

Scripting, from the simplest to the most general:

- ``SinkServer(faults=Faults(tempfail_first=2))``: the ``bench sink`` fault options;
- recipients named ``reject…``, ``tempfail…`` or ``drop…`` (address rules, on by default);
- ``sink.script = tempfail_times(2)``, ``hang_up_at(Stage.DATA)``, ``delay_at(...)``,
  ``reply_at(...)``, combined with :func:`first_of`;
- any callable ``(StageContext) -> Action | None``.

Example::

    sink = SinkServer(reactor, script=tempfail_times(1))
    port = sink.start()
    ...  # deliver to 127.0.0.1:port
    messages = await sink.wait_for_messages(1)
    assert sink.stats.connections_max_concurrent <= 20
    await sink.stop()
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IDelayedCall, IListeningPort

from twistedrelay.bench.behaviour import (
    REJECT_MESSAGE,
    TEMPFAIL_MESSAGE,
    Action,
    Faults,
    Script,
    SinkBehaviour,
    Stage,
    StageContext,
)
from twistedrelay.bench.sink_server import (
    DEFAULT_MAX_SIZE,
    ReceivedMessage,
    SinkConfig,
    SinkFactory,
    SinkStats,
    SinkTLS,
    load_tls_options,
)
from twistedrelay.smtp.replies import Reply

__all__ = [
    "Action",
    "Faults",
    "ReceivedMessage",
    "SinkServer",
    "Stage",
    "StageContext",
    "delay_at",
    "first_of",
    "hang_up_at",
    "load_tls_options",
    "reject_all",
    "reply_at",
    "tempfail_times",
]


class SinkServer:
    """A bench sink listening in this process, recording every accepted message.

    :param reactor: the running reactor (provides ``listenTCP`` and ``callLater``).
    :param script: decides stages first; see :class:`~twistedrelay.bench.behaviour.Script`.
    :param faults: the ``bench sink`` fault options (address rules on by default).
    :param max_connections: refuse connections beyond this many at once with 421 (0: none).
    :param tls_options: server TLS options (see :func:`load_tls_options`): offers STARTTLS.
    :param sequence_header: count duplicates/missing by this header (``stats.sequence``).
    """

    def __init__(
        self,
        reactor: Any,  # IReactorTCP and IReactorTime at once
        *,
        script: Script | None = None,
        faults: Faults | None = None,
        hostname: str = "sink.example.test",
        max_connections: int = 0,
        max_size: int = DEFAULT_MAX_SIZE,
        tls_options: SinkTLS | None = None,
        sequence_header: str | None = None,
        chunking: bool = True,
    ) -> None:
        self.reactor = reactor
        self.behaviour = SinkBehaviour(faults=faults or Faults(), script=script)
        config = SinkConfig(
            hostname=hostname,
            max_size=max_size,
            max_connections=max_connections,
            behaviour=self.behaviour,
            record=True,
            sequence_header=sequence_header,
            tls_options=tls_options,
            chunking=chunking,
        )
        self.factory = SinkFactory(reactor, config)
        self.factory.message_listeners.append(self._message_arrived)
        self._port: IListeningPort | None = None
        self._waiters: list[tuple[int, defer.Deferred[list[ReceivedMessage]], IDelayedCall]] = []

    # -- life cycle ----------------------------------------------------------------------

    def start(self, interface: str = "127.0.0.1", port: int = 0) -> int:
        """Listen now (synchronously) and return the port, chosen by the kernel by default."""
        self._port = self.reactor.listenTCP(port, self.factory, interface=interface)
        return self.port

    async def stop(self) -> None:
        """Stop listening, abort open connections and wait until they are all gone."""
        if self._port is not None:
            await defer.maybeDeferred(self._port.stopListening)
            self._port = None
        await self.factory.close_connections()
        for _, waiter, timer in self._waiters:
            if timer.active():
                timer.cancel()
            if not waiter.called:
                waiter.errback(RuntimeError("sink stopped"))
        self._waiters = []

    @property
    def port(self) -> int:
        """The port the sink listens on."""
        if self._port is None:
            raise RuntimeError("the sink is not listening")
        address = self._port.getHost()
        assert isinstance(address, (IPv4Address, IPv6Address))  # a TCP port's
        return address.port

    # -- scripting -------------------------------------------------------------------------

    @property
    def script(self) -> Script | None:
        """The script consulted first at every stage; may be replaced between deliveries."""
        return self.behaviour.script

    @script.setter
    def script(self, script: Script | None) -> None:
        self.behaviour.script = script

    @property
    def faults(self) -> Faults:
        """The fault options; mutable (e.g. ``sink.faults.tempfail_first = 1``)."""
        return self.behaviour.faults

    # -- what arrived --------------------------------------------------------------------

    @property
    def messages(self) -> list[ReceivedMessage]:
        """Every accepted message, in order of acceptance."""
        return self.factory.messages

    @property
    def recipients(self) -> list[bytes]:
        """Every recipient of every accepted message, in order (one entry per delivery)."""
        return [r for message in self.factory.messages for r in message.recipients]

    @property
    def stats(self) -> SinkStats:
        """The counters: connections (total, max concurrent, refused), messages, refusals."""
        return self.factory.stats

    def wait_for_messages(
        self, count: int, timeout_seconds: float = 10.0
    ) -> defer.Deferred[list[ReceivedMessage]]:
        """Fire with the messages once at least ``count`` were accepted.

        :raises defer.TimeoutError: (through the Deferred) after ``timeout_seconds``.
        """
        if len(self.factory.messages) >= count:
            return defer.succeed(list(self.factory.messages))
        waiter: defer.Deferred[list[ReceivedMessage]] = defer.Deferred()

        def expire() -> None:
            self._waiters = [w for w in self._waiters if w[1] is not waiter]
            waiter.errback(
                defer.TimeoutError(
                    f"sink: {len(self.factory.messages)} of {count} messages "
                    f"after {timeout_seconds} s"
                )
            )

        timer = self.reactor.callLater(timeout_seconds, expire)
        self._waiters.append((count, waiter, timer))
        return waiter

    def _message_arrived(self, message: ReceivedMessage | None) -> None:
        have = len(self.factory.messages)
        ready = [w for w in self._waiters if w[0] <= have]
        if not ready:
            return
        self._waiters = [w for w in self._waiters if w[0] > have]
        for _, waiter, timer in ready:
            timer.cancel()
            waiter.callback(list(self.factory.messages))


# -- script builders ----------------------------------------------------------------------


def reply_at(stage: Stage, reply: Reply, times: int | None = None) -> Script:
    """A script that answers ``reply`` at ``stage``, the first ``times`` times (None: always)."""
    return _counted(stage, Action(reply), times)


def hang_up_at(stage: Stage, times: int | None = None) -> Script:
    """A script that hangs up at ``stage`` (mid-DATA at :attr:`Stage.DATA`)."""
    return _counted(stage, Action(hang_up=True), times)


def delay_at(stage: Stage, seconds: float, times: int | None = None) -> Script:
    """A script that accepts at ``stage`` but only after ``seconds`` (a slow server)."""
    return _counted(stage, Action(delay_seconds=seconds), times)


def tempfail_times(times: int) -> Script:
    """A script that answers 451 4.3.0 at the end of DATA ``times`` times, then accepts."""
    return reply_at(Stage.MESSAGE, TEMPFAIL_MESSAGE, times)


def reject_all() -> Script:
    """A script that answers 554 5.7.1 at the end of DATA to every message."""
    return reply_at(Stage.MESSAGE, REJECT_MESSAGE)


def first_of(*scripts: Script) -> Script:
    """A script that asks each script in turn and takes the first action given."""

    def decide(ctx: StageContext) -> Action | None:
        for script in scripts:
            action = script(ctx)
            if action is not None:
                return action
        return None

    return decide


def _counted(stage: Stage, action: Action, times: int | None) -> Script:
    remaining = [times]

    def decide(ctx: StageContext) -> Action | None:
        if ctx.stage is not stage:
            return None
        if remaining[0] is None:
            return action
        if remaining[0] <= 0:
            return None
        remaining[0] -= 1
        return action

    return decide
