"""The delivery scheduler: which delivery jobs start now.

Pure decisions, no I/O and no clock of its own: every method that depends on time takes
``now`` (epoch seconds from the reactor). The delivery service (delivery/service.py) owns the
I/O: it claims queue entries, turns each into one job per destination, hands jobs to this
scheduler, starts the jobs ``select()`` returns on the destination's connection pool, and
reports each finished job back with ``finished()``.

A job is one queue entry's recipients for one destination (a message to three domains is
three jobs that share one stored body). Strategies, in the words of Postfix's
SCHEDULER_README:

* **Per-destination queues.** Each destination has its own FIFO of jobs in two lanes, new
  mail (just received) and deferred mail (retries), so one slow destination never holds up
  another.
* **Round robin between destinations.** ``select()`` visits the destinations with waiting
  jobs in turn and starts at most one job per destination per turn, until no destination can
  start more. A destination with thousands of messages gets no more turns than one with one.
* **Fairness between new and deferred mail.** Within a destination the two lanes alternate,
  so a burst of retries cannot starve fresh mail, nor the reverse.
* **Concurrency window with slow start.** A destination starts with ``initial_concurrency``
  parallel jobs (connections) and grows by one per successful job up to
  ``concurrency_limit`` (the relay-wide limit divided among the worker processes). A failed
  connection resets the window to its initial size.
* **Dead destinations (destination status cache).** When a job fails at the connection
  level (every mail host refused, timed out or failed DNS temporarily), the destination is
  marked dead for an exponential backoff (``dead_backoff_initial`` doubling per consecutive
  failure up to ``dead_backoff_max``). The jobs still waiting for it are returned to the
  caller to be deferred, and jobs added while it is dead are refused (the caller defers
  them too): no hammering of a host that is down.

Pseudocode of ``select(now)``, which the tests follow::

    started = []
    repeat:
        progress = false
        for destination in round-robin order of destinations with waiting jobs:
            if destination is dead at now: defer its waiting jobs; continue
            if destination.in_flight >= destination.window: continue
            job = take from the lane whose turn it is (else the other lane)
            destination.in_flight += 1; started.append(job); progress = true
    until not progress
    rotate the round-robin start by one, so the next call begins with the next destination
    return started
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

Lane = Literal["new", "deferred"]
Payload = TypeVar("Payload")


@dataclass(frozen=True, slots=True)
class Job(Generic[Payload]):
    """One queue entry's recipients for one destination.

    ``payload`` is whatever the delivery service needs to run the job (the claimed entry and
    the recipients); the scheduler never looks inside it.
    """

    queue_id: str
    destination: str
    lane: Lane
    payload: Payload


@dataclass(slots=True)
class DestinationState(Generic[Payload]):
    """What the scheduler knows about one destination."""

    name: str
    window: int
    new: deque[Job[Payload]] = field(default_factory=deque)
    deferred: deque[Job[Payload]] = field(default_factory=deque)
    in_flight: int = 0
    failures: int = 0
    dead_until: float = 0.0
    next_lane: Lane = "new"

    @property
    def waiting(self) -> int:
        """Jobs queued but not started."""
        return len(self.new) + len(self.deferred)

    def take(self) -> Job[Payload]:
        """The next job, alternating lanes when both have work."""
        first, second = (
            (self.new, self.deferred) if self.next_lane == "new" else (self.deferred, self.new)
        )
        lane = first if first else second
        self.next_lane = "deferred" if lane is self.new else "new"
        return lane.popleft()

    def drain(self) -> list[Job[Payload]]:
        """Remove and return every waiting job."""
        jobs = [*self.new, *self.deferred]
        self.new.clear()
        self.deferred.clear()
        return jobs


class Scheduler(Generic[Payload]):
    """Decides which jobs start, per the strategies in the module docstring.

    :param concurrency_limit: the most jobs in flight for one destination in this process.
    :param initial_concurrency: the window a destination starts with (slow start).
    :param dead_backoff_initial: seconds a destination stays dead after its first failure.
    :param dead_backoff_max: the longest a destination stays dead.
    """

    def __init__(
        self,
        concurrency_limit: int,
        initial_concurrency: int = 5,
        dead_backoff_initial: float = 60.0,
        dead_backoff_max: float = 600.0,
    ) -> None:
        self.concurrency_limit = max(1, concurrency_limit)
        self.initial_concurrency = max(1, min(initial_concurrency, self.concurrency_limit))
        self.dead_backoff_initial = dead_backoff_initial
        self.dead_backoff_max = dead_backoff_max
        self._destinations: dict[str, DestinationState[Payload]] = {}
        # Destinations with waiting jobs, in round-robin order (dict keeps insertion order).
        self._ready: dict[str, None] = {}
        self._deferred_out: list[Job[Payload]] = []

    def _state(self, name: str) -> DestinationState[Payload]:
        state = self._destinations.get(name)
        if state is None:
            state = DestinationState(name, window=self.initial_concurrency)
            self._destinations[name] = state
        return state

    def set_concurrency_limit(self, limit: int) -> None:
        """Apply a new per-destination limit (config reload); wider windows shrink at once.

        Jobs already started above a lowered limit finish; no new one starts until the
        destination is back under it.
        """
        self.concurrency_limit = max(1, limit)
        self.initial_concurrency = min(self.initial_concurrency, self.concurrency_limit)
        for state in self._destinations.values():
            state.window = min(state.window, self.concurrency_limit)

    def is_dead(self, destination: str, now: float) -> bool:
        """True while the destination backs off after connection failures."""
        state = self._destinations.get(destination)
        return state is not None and state.dead_until > now

    def add(self, job: Job[Payload], now: float) -> bool:
        """Queue a job; False (and not queued) when its destination is dead right now."""
        state = self._state(job.destination)
        if state.dead_until > now:
            return False
        (state.new if job.lane == "new" else state.deferred).append(job)
        self._ready[job.destination] = None
        return True

    def select(self, now: float) -> list[Job[Payload]]:
        """Start what may start now; see the module docstring for the algorithm.

        Jobs of destinations that turned out dead are collected for ``take_refused()``.
        """
        started: list[Job[Payload]] = []
        progress = True
        while progress and self._ready:
            progress = False
            for name in list(self._ready):
                state = self._destinations[name]
                if state.dead_until > now:
                    self._deferred_out.extend(state.drain())
                if not state.waiting:
                    del self._ready[name]
                    continue
                if state.in_flight >= state.window:
                    continue
                started.append(state.take())
                state.in_flight += 1
                progress = True
                if not state.waiting:
                    del self._ready[name]
        self._rotate()
        return started

    def _rotate(self) -> None:
        if len(self._ready) > 1:
            first = next(iter(self._ready))
            del self._ready[first]
            self._ready[first] = None

    def finished(self, job: Job[Payload], connection_ok: bool, now: float) -> None:
        """Record the end of a started job.

        :param connection_ok: False when no mail host of the destination could be reached
            (or DNS failed temporarily); the destination then turns dead and its waiting jobs
            become available from ``take_refused()``.
        """
        state = self._state(job.destination)
        state.in_flight = max(0, state.in_flight - 1)
        if connection_ok:
            state.failures = 0
            state.window = min(self.concurrency_limit, state.window + 1)
            return
        state.failures += 1
        state.window = self.initial_concurrency
        backoff = self.dead_backoff_initial * 2 ** (state.failures - 1)
        state.dead_until = now + min(self.dead_backoff_max, backoff)
        self._deferred_out.extend(state.drain())
        self._ready.pop(job.destination, None)

    def take_refused(self) -> list[Job[Payload]]:
        """Jobs dropped because their destination is dead; the caller defers them."""
        jobs, self._deferred_out = self._deferred_out, []
        return jobs

    def in_flight(self, destination: str) -> int:
        """Jobs of ``destination`` started and not yet finished."""
        state = self._destinations.get(destination)
        return state.in_flight if state else 0

    def window(self, destination: str) -> int:
        """The destination's current concurrency window."""
        return self._state(destination).window

    @property
    def waiting(self) -> int:
        """Jobs queued in all destinations, not yet started."""
        return sum(self._destinations[name].waiting for name in self._ready)

    def forget_idle(self) -> None:
        """Drop the state of destinations with nothing queued, in flight or remembered.

        Called now and then so that a relay that has sent to a million domains does not keep
        a million entries; dead destinations are kept until their backoff ends.
        """
        for name in [
            n
            for n, s in self._destinations.items()
            if not s.waiting and not s.in_flight and not s.failures
        ]:
            del self._destinations[name]
