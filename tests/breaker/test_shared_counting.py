"""Failures counted across instances (``CircuitBreaker(shared=..., shared_failures=True)``).

The rules of the shared row (``count_row``) are checked as pure functions; the breakers
are checked on every real store: "instances" are storages of their own on one store, each
below its own threshold, whose failures together open the breaker everywhere. Background
work is awaited by bounded polling; no duration is asserted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from fineflow import (
    BreakerRegistry,
    CircuitBreaker,
    CircuitState,
    ConfigurationError,
    MemoryStorage,
)
from fineflow._breaker.link import COUNT_INTERVAL
from fineflow._breaker.shared import (
    Action,
    BreakerStore,
    SharedPolicy,
    SharedRow,
    SharedState,
    Tally,
    Task,
    Watcher,
    count_row,
    step_row,
)
from shared_breaker_helpers import (
    STORES,
    DelegatingStore,
    Sharing,
    Switchable,
    eventually,
    in_state,
    opened,
    store_instances,
)

CLOSED, OPEN = CircuitState.CLOSED, CircuitState.OPEN


def policy(**options: Any) -> SharedPolicy:
    base: dict[str, Any] = {
        "reset_timeout": 30.0,
        "backoff_multiplier": 2.0,
        "max_reset_timeout": 600.0,
        "half_open_max_calls": 1,
        "successes_to_close": 1,
        "half_open_max_wait": 120.0,
    }
    return SharedPolicy(**(base | options))


def fail(n: int) -> Tally:
    return Tally(failures=n, trailing=n)


# -- the rules of the shared row (pure) ------------------------------------------------------


def test_the_streak_adds_failures_and_a_success_restarts_it() -> None:
    p = policy(failure_threshold=5)
    row = count_row(SharedRow(), fail(2), 0.0, p, generation=0)
    row = count_row(row, fail(2), 0.0, p, generation=0)
    assert (row.state, row.streak) == (CLOSED, 4)
    # A tally with a success: the failures after it start the streak again.
    row = count_row(row, Tally(successes=3, failures=2, trailing=1), 0.0, p, generation=0)
    assert (row.state, row.streak) == (CLOSED, 1)
    row = count_row(row, fail(3), 0.0, p, generation=0)
    assert (row.state, row.streak) == (CLOSED, 4)
    opened_row = count_row(row, fail(1), 10.0, p, generation=0)
    assert opened_row.state is OPEN
    assert opened_row.generation == 1 and opened_row.open_until == 40.0 and opened_row.step == 1


def test_a_stale_or_not_closed_row_ignores_a_tally() -> None:
    p = policy(failure_threshold=2)
    row = count_row(SharedRow(), fail(1), 0.0, p, generation=0)
    assert count_row(row, fail(5), 0.0, p, generation=7) == row  # another generation
    opened_row, _ = step_row(row, Action.OPEN, 0.0, p)
    assert count_row(opened_row, fail(5), 0.0, p, generation=opened_row.generation) == opened_row


def test_counting_starts_afresh_in_each_closed_generation() -> None:
    p = policy(failure_threshold=3)
    row = count_row(SharedRow(), fail(2), 0.0, p, generation=0)
    row, _ = step_row(row, Action.OPEN, 0.0, p)
    row, _ = step_row(row, Action.CLOSE, 0.0, p)
    assert row.seen_at(0.0).failures == 0  # the old streak is not this generation's
    row = count_row(row, fail(2), 0.0, p, generation=row.generation)
    assert (row.state, row.streak) == (CLOSED, 2)


def test_the_failure_rate_over_a_count_window_needs_minimum_calls() -> None:
    p = policy(failure_rate=0.5, minimum_calls=10, window_calls=100)
    row = count_row(SharedRow(), Tally(4, 4, 0, 4), 0.0, p, generation=0)
    assert row.state is CLOSED  # 8 calls < minimum_calls, although half failed
    row = count_row(row, Tally(2, 1, 0, 1), 0.0, p, generation=0)
    assert row.state is CLOSED  # 5 of 11 failed
    assert count_row(row, Tally(0, 1, 0, 1), 0.0, p, generation=0).state is OPEN  # 6 of 12


def test_a_full_count_window_becomes_the_previous_one_and_fades() -> None:
    p = policy(failure_rate=0.5, minimum_calls=1, window_calls=10)
    row = count_row(SharedRow(), Tally(6, 4, 0, 4), 0.0, p, generation=0)  # full: 4 of 10
    assert (row.previous_calls, row.previous_failures, row.calls) == (10, 4, 0)
    # 5 new successes: the previous window still weighs half; 2 / (5 + 5) < 0.5.
    row = count_row(row, Tally(5, 0, 0, 0), 0.0, p, generation=0)
    assert row.state is CLOSED
    # 4 more failures in the current window: (2 * 0.1 + 4) / (10 * 0.1 + 9) = 0.42 < 0.5
    row = count_row(row, Tally(0, 4, 0, 4), 0.0, p, generation=0)
    assert row.state is CLOSED and row.previous_calls == 10
    # The next call fills the window; then 1 call of 1 failed in the new one opens it.
    row = count_row(row, Tally(1, 0, 0, 0), 0.0, p, generation=0)
    assert (row.previous_calls, row.previous_failures, row.calls) == (10, 4, 0)
    row = count_row(row, fail(1), 0.0, p, generation=0)
    assert row.state is CLOSED  # (4 * 0.9 + 1) / (10 * 0.9 + 1) = 0.46
    assert count_row(row, fail(1), 0.0, p, generation=0).state is OPEN  # 5.2 / 10


def test_a_time_window_rolls_on_the_store_clock() -> None:
    p = policy(failure_rate=0.5, minimum_calls=4, window_seconds=10.0)
    row = count_row(SharedRow(), Tally(1, 3, 0, 3), 100.0, p, generation=0)
    assert row.state is OPEN  # 3 of 4 within the window
    row = count_row(SharedRow(), Tally(2, 1, 0, 1), 100.0, p, generation=0)
    # 15 s later: the first window (100..110) is the previous one, weighing half.
    later = count_row(row, Tally(2, 0, 0, 0), 115.0, p, generation=0)
    assert (later.window_start, later.previous_calls, later.calls) == (110.0, 3, 2)
    # 25 s after the first: the previous window is not adjacent any more, it is gone.
    much_later = count_row(row, fail(2), 125.0, p, generation=0)
    assert (much_later.previous_calls, much_later.calls) == (0, 2)
    assert much_later.state is CLOSED  # 2 calls < minimum_calls
    assert count_row(much_later, fail(2), 125.0, p, generation=0).state is OPEN


def test_the_slow_call_rate_is_shared_too() -> None:
    p = policy(slow_rate=0.75, minimum_calls=4, window_calls=100)
    row = count_row(SharedRow(), Tally(2, 0, 2, 0), 0.0, p, generation=0)
    assert row.state is CLOSED
    assert count_row(row, Tally(2, 0, 1, 0), 0.0, p, generation=0).state is OPEN  # 3 of 4


# -- configuration ---------------------------------------------------------------------------


def test_shared_failures_needs_a_shared_storage() -> None:
    with pytest.raises(ConfigurationError, match="pass shared=storage"):
        CircuitBreaker("x", shared_failures=True)
    with pytest.raises(ConfigurationError, match="pass shared=storage"):
        BreakerRegistry(shared_failures=True)


# -- breakers on real stores ---------------------------------------------------------------


@pytest.fixture(params=STORES)
def instances(request: pytest.FixtureRequest) -> Iterator[Callable[[], Any]]:
    yield from store_instances(request, request.param)


def settle(b: CircuitBreaker, *, failures: int = 0, successes: int = 0) -> None:
    for _ in range(successes):
        permit = b.try_acquire()
        assert permit is not None
        permit.success()
    for _ in range(failures):
        permit = b.try_acquire()
        assert permit is not None
        permit.failure()


async def shared_streak(storage: Any, name: str, p: SharedPolicy) -> int:
    """The row's shared streak, read through an empty count step (which changes nothing)."""
    store: BreakerStore = storage.breaker_store()
    generation = (await store.read(name)).generation
    return (await store.count(name, Tally(), p, generation=generation)).failures


async def generation_reaches(storage: Any, name: str, expected: int) -> None:
    """Poll the row until its generation is ``expected`` (a step is on its way)."""
    store: BreakerStore = storage.breaker_store()
    with anyio.move_on_after(5.0):
        while (await store.read(name)).generation != expected:  # noqa: ASYNC110
            await anyio.sleep(0.01)
        return
    raise AssertionError(f"the generation of {name!r} never reached {expected}")


async def counting(name: str, threshold: int, *storages: Any) -> list[CircuitBreaker]:
    """Breakers called ``name`` counting failures together, one per storage, synced."""
    breakers = [
        CircuitBreaker(name, failure_threshold=threshold, shared=s, shared_failures=True)
        for s in storages
    ]
    for b in breakers:
        assert await b.sync()
    return breakers


async def streak_reaches(storage: Any, name: str, expected: int) -> None:
    """Poll the row until its shared streak is ``expected`` (the tallies are on their way)."""
    with anyio.move_on_after(5.0):
        while await shared_streak(storage, name, policy()) != expected:  # noqa: ASYNC110
            await anyio.sleep(0.01)
        return
    raise AssertionError(f"the shared streak of {name!r} never reached {expected}")


@pytest.mark.anyio
async def test_failures_below_each_threshold_open_every_instance(
    instances: Callable[[], Any],
) -> None:
    options: dict[str, Any] = {"failure_threshold": 3, "reset_timeout": 30.0}
    async with opened(instances, 3) as storages:
        # Without shared_failures each instance counts alone: one failure each changes nothing.
        alone = [CircuitBreaker("alone", **options, shared=s) for s in storages]
        assert all([await b.sync() for b in alone])
        for b in alone:
            settle(b, failures=1)
        await anyio.sleep(5 * COUNT_INTERVAL)
        assert [b.state for b in alone] == [CLOSED] * 3

        together = [
            CircuitBreaker("together", **options, shared=s, shared_failures=True) for s in storages
        ]
        assert all([await b.sync() for b in together])
        for b in together:
            settle(b, failures=1)
        for b in together:
            await in_state(b, OPEN, "three instances' failures opened it everywhere")
        deadline = together[0].retry_after()
        assert deadline is not None and deadline > 25.0


@pytest.mark.anyio
async def test_a_success_reported_by_another_instance_ends_the_streak(
    instances: Callable[[], Any],
) -> None:
    async with opened(instances, 3) as (one, two, three):
        a, b, c = (
            CircuitBreaker("streak", failure_threshold=4, shared=s, shared_failures=True)
            for s in (one, two, three)
        )
        assert all([await x.sync() for x in (a, b, c)])
        settle(a, failures=2)
        await streak_reaches(one, "streak", 2)
        settle(b, successes=1, failures=1)  # b's success ends the streak: it is now 1
        await streak_reaches(one, "streak", 1)
        settle(c, failures=2)  # 1 + 2 < 4 (without b's success: 5, open)
        await streak_reaches(one, "streak", 3)
        assert [x.state for x in (a, b, c)] == [CLOSED] * 3
        settle(c, failures=1)
        for x in (a, b, c):
            await in_state(x, OPEN)


@pytest.mark.anyio
async def test_the_failure_rate_is_summed_across_instances(instances: Callable[[], Any]) -> None:
    options: dict[str, Any] = {
        "failure_threshold": None,
        "failure_rate_threshold": 0.5,
        "minimum_calls": 10,
        "reset_timeout": 30.0,
    }
    async with opened(instances, 2) as storages:
        pair = [CircuitBreaker("rate", **options, shared=s, shared_failures=True) for s in storages]
        assert all([await b.sync() for b in pair])
        for b in pair:
            settle(b, successes=3, failures=3)  # 6 calls each: below minimum_calls alone
        for b in pair:
            await in_state(b, OPEN, "12 calls, 6 failed, across two instances")


@pytest.mark.anyio
async def test_slow_calls_are_summed_across_instances(instances: Callable[[], Any]) -> None:
    now = [0.0]

    def clock() -> float:
        return now[0]

    options: dict[str, Any] = {
        "failure_threshold": None,
        "slow_call_duration": 1.0,
        "slow_call_rate_threshold": 0.75,
        "minimum_calls": 4,
        "clock": clock,
    }
    async with opened(instances, 2) as storages:
        pair = [CircuitBreaker("slow", **options, shared=s, shared_failures=True) for s in storages]
        assert all([await b.sync() for b in pair])
        for b in pair:
            for _ in range(2):
                permit = b.try_acquire()
                assert permit is not None
                now[0] += 2.0  # slower than slow_call_duration
                permit.success()
        assert [b.state for b in pair] == [CLOSED, CLOSED]  # 2 calls each < minimum_calls
        for b in pair:
            await in_state(b, OPEN, "4 slow calls across two instances")


# -- never a round trip per call ------------------------------------------------------------


class CountedSteps(DelegatingStore):
    """A real store that counts the count steps sent to it; with ``fail``, they fail (the
    store is down for them)."""

    def __init__(self, inner: BreakerStore, *, fail: bool = False) -> None:
        super().__init__(inner)
        self.counts = 0
        self.fail = fail

    async def count(self, name: str, tally: Tally, policy: SharedPolicy, **kw: Any) -> SharedState:
        self.counts += 1
        if self.fail:
            raise OSError("store down")
        return await self.inner.count(name, tally, policy, **kw)


@pytest.mark.anyio
async def test_outcomes_go_in_batches_never_one_step_per_call() -> None:
    async with MemoryStorage() as storage:
        steps = CountedSteps(storage.breaker_store())
        b = CircuitBreaker(
            "batched",
            failure_threshold=None,
            failure_rate_threshold=0.9,
            minimum_calls=10_000,
            shared=Sharing(steps),
            shared_failures=True,
        )
        assert await b.sync()
        settle(b, successes=2_000)
        await eventually(lambda: steps.counts == 1, "the successes in one report")
        await anyio.sleep(3 * COUNT_INTERVAL)
        assert steps.counts == 1, "no report without calls"

        started = anyio.current_time()
        for _ in range(20):
            settle(b, successes=45, failures=5)  # 1,000 calls, 100 failures
            await anyio.lowlevel.checkpoint()
        elapsed = anyio.current_time() - started
        await streak_reaches(storage, "batched", 5)  # the last tally arrived
        # One step per COUNT_INTERVAL at most (and a last one after the loop).
        assert 2 <= steps.counts <= 1 + 2 * (elapsed / COUNT_INTERVAL + 2)
        assert b.state is CLOSED


@pytest.mark.anyio
async def test_a_store_that_fails_drops_the_tally_and_calls_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "fineflow.breaker")

    def unavailable() -> int:
        return sum("shared state unavailable" in r.getMessage() for r in caplog.records)

    async with MemoryStorage() as storage:
        failing = CountedSteps(storage.breaker_store(), fail=True)
        b = CircuitBreaker(
            "down", failure_threshold=3, shared=Sharing(failing), shared_failures=True
        )
        assert await b.sync()
        settle(b, failures=2)  # nothing raises; the tally's step fails in the background
        await eventually(lambda: failing.counts == 1, "the count step tried")
        await eventually(lambda: unavailable() == 1, "the store's failure logged")
        assert b.state is CLOSED
        settle(b, failures=1)
        assert b.state is OPEN  # the local threshold still applies
        await anyio.sleep(3 * COUNT_INTERVAL)
        assert (unavailable(), failing.counts) == (1, 1)  # said once; the tally not resent
        await b.aclose()


@pytest.mark.anyio
async def test_a_healthy_instances_calls_count_in_the_shared_rate() -> None:
    """An instance whose calls all succeed reports them too (after QUIET_INTERVAL): two
    instances failing half of their calls do not open the breaker of a service whose third
    instance answered 200 calls."""
    options: dict[str, Any] = {
        "failure_threshold": None,
        "failure_rate_threshold": 0.5,
        "minimum_calls": 10,
        "reset_timeout": 30.0,
        "shared_failures": True,
    }
    async with MemoryStorage() as storage:
        steps = CountedSteps(storage.breaker_store())
        a, b, c = (CircuitBreaker("rate", **options, shared=Sharing(steps)) for _ in range(3))
        assert all([await x.sync() for x in (a, b, c)])
        settle(a, successes=200)
        await eventually(lambda: steps.counts == 1, "the healthy instance's report", within=10)
        settle(b, successes=3, failures=3)
        settle(c, successes=3, failures=3)
        await eventually(lambda: steps.counts == 3, "the failing instances' reports")
        assert [x.state for x in (a, b, c)] == [CLOSED] * 3  # 6 of 212 failed


@pytest.mark.anyio
async def test_a_success_after_a_quiet_spell_ends_the_shared_streak() -> None:
    async with MemoryStorage() as storage:
        a, b = await counting("quiet", 4, storage, storage)
        settle(a, failures=2)
        await streak_reaches(storage, "quiet", 2)
        await anyio.sleep(3 * COUNT_INTERVAL)  # nothing to report for a while
        settle(a, successes=1)
        await streak_reaches(storage, "quiet", 0)
        settle(b, failures=2)
        await streak_reaches(storage, "quiet", 2)
        assert (a.state, b.state) == (CLOSED, CLOSED)


class Deaf(DelegatingStore):
    """A store that never tells its watchers anything (notifications not flowing yet)."""

    def watch(self, name: str, watcher: Watcher) -> None:
        pass


@pytest.mark.anyio
async def test_a_tally_waits_for_the_row_to_be_read() -> None:
    """Before any read or notification, the breaker does not know the row's generation: its
    tally goes after a read, not with a generation the store would drop."""
    async with MemoryStorage() as storage:
        a = CircuitBreaker(
            "unread",
            failure_threshold=3,
            shared=Sharing(Deaf(storage.breaker_store())),
            shared_failures=True,
        )
        settle(a, failures=2)
        await streak_reaches(storage, "unread", 2)


@pytest.mark.anyio
async def test_failures_forgotten_by_reset_are_not_reported() -> None:
    async with MemoryStorage() as storage:
        a, b = await counting("forgot", 3, storage, storage)
        settle(a, failures=2)
        a.reset()  # before the tally went out
        await generation_reaches(storage, "forgot", 1)  # the reset, everywhere
        settle(b, failures=1)
        await streak_reaches(storage, "forgot", 1)
        await anyio.sleep(3 * COUNT_INTERVAL)
        assert (a.state, b.state) == (CLOSED, CLOSED)
        assert await shared_streak(storage, "forgot", policy()) == 1


class Refusing(DelegatingStore):
    """A store that cannot start background work while ``refusing`` (say, no event loop
    running yet)."""

    def __init__(self, inner: BreakerStore) -> None:
        super().__init__(inner)
        self.refusing = False
        self.refused = 0

    def spawn(self, work: Callable[[], Coroutine[Any, Any, None]]) -> Task | None:
        if self.refusing:
            self.refused += 1
            work().close()
            return None
        return super().spawn(work)


@pytest.mark.anyio
async def test_a_tally_the_store_could_not_start_is_sent_with_the_next_one() -> None:
    async with MemoryStorage() as storage:
        store = Refusing(storage.breaker_store())
        a = CircuitBreaker(
            "refused", failure_threshold=3, shared=Sharing(store), shared_failures=True
        )
        assert await a.sync()
        await anyio.sleep(3 * COUNT_INTERVAL)  # (the read on listening, done)
        store.refusing = True
        settle(a, failures=1)  # its worker could not start (told of a call, then a failure)
        assert store.refused == 2
        store.refusing = False
        settle(a, failures=1)  # heard again: both failures go now
        await streak_reaches(storage, "refused", 2)


@pytest.mark.anyio
async def test_outcomes_gathered_while_the_store_was_away_are_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Failures seen while the store is down are not sent late, as one batch, when it is
    back (they would land in whatever window is current by then)."""
    caplog.set_level(logging.INFO, "fineflow.breaker")
    async with MemoryStorage() as storage:
        store = Switchable(storage.breaker_store())
        a = CircuitBreaker("away", failure_threshold=4, shared=Sharing(store), shared_failures=True)
        assert await a.sync()
        store.down = True
        settle(a, failures=2)  # below the local threshold, with the next one too
        await eventually(
            lambda: any("unavailable" in r.getMessage() for r in caplog.records),
            "the store's failure noticed",
        )
        store.down = False
        await eventually(
            lambda: any("available again" in r.getMessage() for r in caplog.records),
            "the store back",
            within=10.0,
        )
        settle(a, failures=1)  # counted: the first failure after the store came back
        await streak_reaches(storage, "away", 1)
        await anyio.sleep(3 * COUNT_INTERVAL)
        assert a.state is CLOSED
        assert await shared_streak(storage, "away", policy()) == 1


@pytest.mark.anyio
async def test_outcomes_before_a_reset_elsewhere_are_not_counted_after_it() -> None:
    async with MemoryStorage() as storage:
        a, b = await counting("elsewhere", 3, storage, storage)
        settle(b, failures=2)
        a.reset()  # closes the (closed) row: a new generation, before b's tally went out
        await generation_reaches(storage, "elsewhere", 1)
        settle(b, failures=1)
        await streak_reaches(storage, "elsewhere", 1)
        await anyio.sleep(3 * COUNT_INTERVAL)
        assert (a.state, b.state) == (CLOSED, CLOSED)


@pytest.mark.anyio
async def test_a_failure_right_after_this_instances_reset_counts(
    instances: Callable[[], Any],
) -> None:
    """The reset's own confirmation (its reply or notification, after the failure) is not a
    new period decided elsewhere: the failure counts."""
    async with opened(instances, 2) as (one, two):
        a, b = await counting("own-reset", 2, one, two)
        a.reset()
        settle(a, failures=1)  # before the store confirmed the reset
        await streak_reaches(one, "own-reset", 1)
        settle(b, failures=1)
        await in_state(a, OPEN, "two failures across instances")
        await in_state(b, OPEN)


@pytest.mark.anyio
async def test_a_registry_counts_its_breakers_failures_across_instances() -> None:
    async with MemoryStorage() as storage:
        one = BreakerRegistry(shared=storage, shared_failures=True, failure_threshold=2)
        two = BreakerRegistry(shared=storage, shared_failures=True, failure_threshold=2)
        a, b = one.get_or_create("api"), two.get_or_create("api")
        assert a.shared_failures and b.shared_failures
        assert await a.sync() and await b.sync()
        settle(a, failures=1)
        settle(b, failures=1)
        await in_state(a, OPEN)
        await in_state(b, OPEN)
