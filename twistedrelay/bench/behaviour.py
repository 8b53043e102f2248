"""What the sink answers at each stage of a session: a script first, then built-in faults.

Owns the sink's decisions, not its I/O: given a :class:`StageContext` it returns an
:class:`Action` (a reply, a delay, a hang-up) or None for the stage's usual positive reply.
A test script is asked first; when it returns None the fault options of ``bench sink``
(ratios, tempfail-first, delays, address rules) decide. Pure: no reactor, no sockets.

Built-in address rules (on unless disabled), keyed on the recipient's local part, so a
sender can choose a behaviour per recipient without configuring the sink:

- ``reject...``   RCPT gets ``550 5.1.1``;
- ``tempfail...`` RCPT gets ``450 4.2.1``;
- ``drop...``     RCPT is accepted, then the sink hangs up mid-DATA.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from twistedrelay.smtp.replies import Reply

REJECT_RECIPIENT = Reply(550, "5.1.1", "Recipient address rejected: User unknown")
TEMPFAIL_RECIPIENT = Reply(450, "4.2.1", "Recipient address rejected: try again later")
REJECT_MESSAGE = Reply(554, "5.7.1", "Message rejected")
TEMPFAIL_MESSAGE = Reply(451, "4.3.0", "Temporary failure, try again later")


class Stage(enum.Enum):
    """The points of a session where the sink decides a reply."""

    CONNECT = "connect"
    """The greeting."""
    HELO = "helo"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    """The DATA command (354). A hang-up here happens mid-DATA."""
    MESSAGE = "message"
    """The end of data: the reply that accepts or refuses the message."""


@dataclass(frozen=True, slots=True)
class Action:
    """The sink's answer at one stage.

    :ivar reply: the reply to send; None sends the stage's usual positive reply.
    :ivar delay_seconds: wait this long before replying (later commands wait too).
    :ivar hang_up: close the connection without replying. At :attr:`Stage.DATA` the sink
        sends 354 and hangs up when the first bytes of the message arrive (mid-DATA).
    :ivar close_after: close the connection after sending the reply (e.g. a 421).
    """

    reply: Reply | None = None
    delay_seconds: float = 0.0
    hang_up: bool = False
    close_after: bool = False


@dataclass(slots=True)
class StageContext:
    """What a script may look at when deciding a stage.

    :ivar connection_number: 1-based, in the order connections were accepted.
    :ivar transaction_number: 1-based count of MAIL commands seen by the whole sink.
    :ivar message_number: 1-based count of ends of data seen by the whole sink (at MESSAGE).
    :ivar argument: the address of MAIL or RCPT (without angle brackets), else b"".
    :ivar recipients: recipients accepted so far in this transaction.
    :ivar content: the message (dot-unstuffed) at MESSAGE when the sink keeps content.
    """

    stage: Stage
    connection_number: int
    transaction_number: int = 0
    message_number: int = 0
    helo: bytes = b""
    sender: bytes | None = None
    argument: bytes = b""
    recipients: list[bytes] = field(default_factory=list)
    content: bytes | None = None


Script = Callable[[StageContext], Action | None]
"""A test's hook: return an Action to take over the stage, or None to let the faults decide."""


def local_part(address: bytes) -> bytes:
    """The lower-cased local part of an address (everything before the last ``@``)."""
    at = address.rfind(b"@")
    return (address if at < 0 else address[:at]).lower()


@dataclass(slots=True)
class Faults:
    """The fault injection of ``bench sink``; every ratio is between 0 and 1.

    Ratios apply per message at the end of DATA, or per recipient at RCPT when
    ``ratio_stage`` is :attr:`Stage.RCPT`. ``tempfail_first`` answers 451 to the first N
    ends of data of the whole sink, then accepts, which is what a retry test needs.
    """

    delay_seconds: float = 0.0
    delay_stages: frozenset[Stage] = frozenset({Stage.MESSAGE})
    tempfail_ratio: float = 0.0
    reject_ratio: float = 0.0
    drop_ratio: float = 0.0
    ratio_stage: Stage = Stage.MESSAGE
    tempfail_first: int = 0
    address_rules: bool = True
    rng: random.Random = field(default_factory=random.Random)

    def is_passive(self) -> bool:
        """True when no fault is configured other than the address rules."""
        return not (
            self.delay_seconds
            or self.tempfail_ratio
            or self.reject_ratio
            or self.drop_ratio
            or self.tempfail_first
        )

    def decide(self, ctx: StageContext) -> Action | None:
        """The fault for this stage, or None to accept."""
        action = self._fault(ctx)
        if self.delay_seconds and ctx.stage in self.delay_stages:
            if action is None:
                return Action(delay_seconds=self.delay_seconds)
            if not action.delay_seconds:
                return Action(action.reply, self.delay_seconds, action.hang_up, action.close_after)
        return action

    def _fault(self, ctx: StageContext) -> Action | None:
        stage = ctx.stage
        if stage is Stage.RCPT:
            if self.address_rules:
                local = local_part(ctx.argument)
                if local.startswith(b"reject"):
                    return Action(REJECT_RECIPIENT)
                if local.startswith(b"tempfail"):
                    return Action(TEMPFAIL_RECIPIENT)
            if self.ratio_stage is Stage.RCPT:
                return self._by_ratio(TEMPFAIL_RECIPIENT, REJECT_RECIPIENT)
        elif stage is Stage.DATA:
            if self.address_rules and any(
                local_part(r).startswith(b"drop") for r in ctx.recipients
            ):
                return Action(hang_up=True)
            if self.drop_ratio and self.rng.random() < self.drop_ratio:
                return Action(hang_up=True)
        elif stage is Stage.MESSAGE:
            if ctx.message_number <= self.tempfail_first:
                return Action(TEMPFAIL_MESSAGE)
            if self.ratio_stage is Stage.MESSAGE:
                return self._by_ratio(TEMPFAIL_MESSAGE, REJECT_MESSAGE)
        return None

    def _by_ratio(self, tempfail: Reply, reject: Reply) -> Action | None:
        if not (self.tempfail_ratio or self.reject_ratio):
            return None
        draw = self.rng.random()
        if draw < self.tempfail_ratio:
            return Action(tempfail)
        if draw < self.tempfail_ratio + self.reject_ratio:
            return Action(reject)
        return None


@dataclass(slots=True)
class SinkBehaviour:
    """A script (tests) over the faults (command line); decides every stage of every session."""

    faults: Faults = field(default_factory=Faults)
    script: Script | None = None

    def is_plain(self) -> bool:
        """True when only the cheap address rules apply, so the hot path may skip decide()."""
        return self.script is None and self.faults.is_passive()

    def decide(self, ctx: StageContext) -> Action | None:
        """The action for this stage; None means the usual positive reply."""
        if self.script is not None:
            action = self.script(ctx)
            if action is not None:
                return action
        return self.faults.decide(ctx)
