"""The scheduler's algorithm, step by step as its docstring's pseudocode states it."""

from twistedrelay.scheduler import Job, Scheduler


def job(queue_id: str, destination: str, lane: str = "new") -> Job[None]:
    return Job(queue_id, destination, lane, None)  # type: ignore[arg-type]


def test_round_robin_gives_each_destination_a_turn() -> None:
    """A destination with many jobs gets no more turns per round than one with one job."""
    scheduler: Scheduler[None] = Scheduler(concurrency_limit=1, initial_concurrency=1)
    for i in range(5):
        scheduler.add(job(f"big{i}", "big.example"), now=0)
    scheduler.add(job("small0", "small.example"), now=0)
    started = scheduler.select(now=0)
    assert sorted(j.destination for j in started) == ["big.example", "small.example"]


def test_window_starts_small_and_grows_with_success() -> None:
    """Slow start: initial window, +1 per success, capped at the limit."""
    scheduler: Scheduler[None] = Scheduler(concurrency_limit=4, initial_concurrency=2)
    for i in range(10):
        scheduler.add(job(f"q{i}", "d.example"), now=0)
    first = scheduler.select(now=0)
    assert len(first) == 2
    assert scheduler.select(now=0) == []
    scheduler.finished(first[0], connection_ok=True, now=1)
    assert scheduler.window("d.example") == 3
    assert len(scheduler.select(now=1)) == 2
    for j in first[1:]:
        scheduler.finished(j, connection_ok=True, now=2)
    assert scheduler.window("d.example") == 4


def test_lanes_alternate_between_new_and_deferred() -> None:
    """A burst of retries cannot starve new mail, nor the reverse."""
    scheduler: Scheduler[None] = Scheduler(concurrency_limit=1, initial_concurrency=1)
    for i in range(3):
        scheduler.add(job(f"d{i}", "x.example", "deferred"), now=0)
        scheduler.add(job(f"n{i}", "x.example", "new"), now=0)
    lanes = []
    for t in range(6):
        (started,) = scheduler.select(now=t)
        lanes.append(started.lane)
        scheduler.finished(started, connection_ok=True, now=t)
    assert lanes == ["new", "deferred"] * 3


def test_connection_failure_makes_destination_dead_and_refuses_jobs() -> None:
    """No hammering: waiting jobs come back for deferral and new ones are refused."""
    scheduler: Scheduler[None] = Scheduler(
        concurrency_limit=1, initial_concurrency=1, dead_backoff_initial=60
    )
    for i in range(3):
        scheduler.add(job(f"q{i}", "down.example"), now=0)
    (first,) = scheduler.select(now=0)
    scheduler.finished(first, connection_ok=False, now=10)
    assert [j.queue_id for j in scheduler.take_refused()] == ["q1", "q2"]
    assert scheduler.is_dead("down.example", now=69)
    assert not scheduler.add(job("q3", "down.example"), now=69)
    assert scheduler.add(job("q3", "down.example"), now=71)
    assert [j.queue_id for j in scheduler.select(now=71)] == ["q3"]


def test_dead_backoff_doubles_and_is_capped() -> None:
    """Consecutive connection failures double the dead time up to the maximum."""
    scheduler: Scheduler[None] = Scheduler(
        concurrency_limit=1, dead_backoff_initial=10, dead_backoff_max=25
    )
    now = 0.0
    expected = [10, 20, 25]
    for wait in expected:
        scheduler.add(job("q", "d.example"), now=now)
        (started,) = scheduler.select(now=now)
        scheduler.finished(started, connection_ok=False, now=now)
        assert scheduler.is_dead("d.example", now + wait - 0.5)
        assert not scheduler.is_dead("d.example", now + wait)
        now += wait


def test_one_slow_destination_does_not_block_others() -> None:
    """A destination at its window limit leaves the others free to start."""
    scheduler: Scheduler[None] = Scheduler(concurrency_limit=1, initial_concurrency=1)
    scheduler.add(job("a1", "slow.example"), now=0)
    scheduler.add(job("a2", "slow.example"), now=0)
    assert [j.queue_id for j in scheduler.select(now=0)] == ["a1"]
    scheduler.add(job("b1", "fast.example"), now=0)
    assert [j.queue_id for j in scheduler.select(now=0)] == ["b1"]
    assert scheduler.waiting == 1


def test_forget_idle_keeps_dead_destinations() -> None:
    """Idle destinations are forgotten; ones in backoff are remembered."""
    scheduler: Scheduler[None] = Scheduler(concurrency_limit=2)
    scheduler.add(job("q", "ok.example"), now=0)
    scheduler.add(job("r", "down.example"), now=0)
    for started in scheduler.select(now=0):
        scheduler.finished(started, connection_ok=started.destination == "ok.example", now=0)
    scheduler.forget_idle()
    assert scheduler.is_dead("down.example", now=1)
    assert scheduler.window("ok.example") == scheduler.initial_concurrency


def test_lowered_limit_shrinks_windows_at_once() -> None:
    """A config reload that lowers the limit stops new starts above it immediately."""
    scheduler: Scheduler[None] = Scheduler(concurrency_limit=4, initial_concurrency=4)
    for i in range(6):
        scheduler.add(job(f"q{i}", "d.example"), now=0)
    assert len(scheduler.select(now=0)) == 4
    scheduler.set_concurrency_limit(2)
    assert scheduler.window("d.example") == 2
    assert scheduler.select(now=0) == []
