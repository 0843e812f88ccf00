"""Two breakers sharing one store, under any interleaving of calls, held trial permits and
time (Hypothesis ``RuleBasedStateMachine``), on a real PostgreSQL, on real Redis (one server
and a Cluster) and in memory:

* the global half-open budget is never exceeded: across both breakers, at most
  ``half_open_max_calls`` trials per round of the shared row (a trial whose outcome is
  ignored gives its permit back, as without ``shared=``);
* once the background work and the notifications are drained, both are in the same state;

with failures counted per instance, and counted across both (``shared_failures=True``).

The open deadline lives on the store's clock, so ``wait`` sleeps past it (real time, short).
"""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from fineflow import CircuitBreaker, CircuitState, MemoryStorage, Permit, PostgresStorage
from shared_breaker_helpers import redis_instances

CLOSED, OPEN, HALF = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN
RESET = 0.05
MAX_CALLS = 2


def effective(breaker: CircuitBreaker) -> CircuitState:
    """The state, with an OPEN breaker past its deadline counted as HALF_OPEN (it moves only
    when its next caller arrives)."""
    state = breaker.state
    return HALF if state is OPEN and breaker.retry_after() == 0.0 else state


class SharedModel(RuleBasedStateMachine):
    """Two instances (storages) of one service; see the module docstring."""

    storages: Callable[[], tuple[Any, Any]]
    shared_failures = False

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.name = secrets.token_hex(6)
        self.stores = self.storages()
        for storage in self.stores:
            self.run(storage.open())
        self.breakers = [
            CircuitBreaker(
                self.name,
                failure_threshold=2,
                reset_timeout=RESET,
                half_open_max_calls=MAX_CALLS,
                success_threshold=MAX_CALLS,
                shared=storage,
                shared_failures=self.shared_failures,
            )
            for storage in self.stores
        ]
        for b in self.breakers:
            assert self.run(b.sync())
        self.held: list[tuple[Permit, int | None]] = []  # and the round it is a trial of
        self.trials: Counter[int] = Counter()  # trials (admitted in HALF_OPEN) by round

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    def teardown(self) -> None:
        for permit, _ in self.held:
            permit.ignore()
        for b in self.breakers:
            self.run(b.aclose())
        for storage in dict.fromkeys(self.stores):
            self.run(storage.close())
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    async def _generation(self) -> int:
        return int((await self.stores[0].breaker_store().read(self.name)).generation)

    async def _admit(self, i: int) -> tuple[Permit | None, int | None]:
        b = self.breakers[i]
        permit = b.try_acquire()
        round_ = None
        if permit is not None and b.state is HALF:
            round_ = await self._generation()
            self.trials[round_] += 1
        await asyncio.sleep(0.001)  # let notifications and replies in
        return permit, round_

    @rule(i=st.integers(0, 1), ok=st.booleans())
    def call(self, i: int, ok: bool) -> None:
        async def call() -> None:
            permit, _ = await self._admit(i)
            if permit is not None:
                permit.success() if ok else permit.failure()
            await asyncio.sleep(0)

        self.run(call())

    @rule(i=st.integers(0, 1))
    def hold(self, i: int) -> None:
        permit, round_ = self.run(self._admit(i))
        if permit is not None:
            self.held.append((permit, round_))

    @precondition(lambda self: bool(self.held))
    @rule(index=st.integers(0, 10), outcome=st.sampled_from(["success", "failure", "ignore"]))
    def settle(self, index: int, outcome: str) -> None:
        permit, round_ = self.held.pop(index % len(self.held))
        if outcome == "ignore" and round_ is not None:
            self.trials[round_] -= 1  # the permit comes back

        async def settle() -> None:  # in the loop, as a response ending would
            getattr(permit, outcome)()
            await asyncio.sleep(0)

        self.run(settle())

    @rule()
    def wait(self) -> None:
        self.run(asyncio.sleep(RESET * 1.2))

    @rule()
    def drain(self) -> None:
        async def agree() -> bool:
            for _ in range(1000):
                if effective(self.breakers[0]) is effective(self.breakers[1]):
                    await asyncio.sleep(0.01)  # and still after what was in flight
                    if effective(self.breakers[0]) is effective(self.breakers[1]):
                        return True
                await asyncio.sleep(0.002)
            return False

        states = [b.state for b in self.breakers]
        assert self.run(agree()), f"the breakers never agreed (from {states})"

    @invariant()
    def the_global_budget_holds(self) -> None:
        assert all(n <= MAX_CALLS for n in self.trials.values()), self.trials


def memory_pair() -> tuple[Any, Any]:
    storage = MemoryStorage()
    return storage, storage


MODEL_SETTINGS = settings(
    max_examples=12,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def test_two_breakers_in_memory() -> None:
    class Memory(SharedModel):
        storages = staticmethod(memory_pair)

    run_state_machine_as_test(Memory, settings=MODEL_SETTINGS)


def test_two_breakers_counting_failures_together_in_memory() -> None:
    class Memory(SharedModel):
        storages = staticmethod(memory_pair)
        shared_failures = True

    run_state_machine_as_test(Memory, settings=MODEL_SETTINGS)


@pytest.mark.postgres
@pytest.mark.parametrize("counted", [False, True], ids=["per-instance", "shared_failures"])
def test_two_breakers_on_postgres(pg_dsn: str, counted: bool) -> None:
    schema = f"ff_model_{secrets.token_hex(4)}"

    async def migrate() -> None:
        async with PostgresStorage(pg_dsn, schema=schema) as storage:
            await storage.migrate()

    asyncio.run(migrate())

    def pair() -> tuple[Any, Any]:
        return (
            PostgresStorage(pg_dsn, schema=schema),
            PostgresStorage(pg_dsn, schema=schema),
        )

    class Postgres(SharedModel):
        storages = staticmethod(pair)
        shared_failures = counted

    run_state_machine_as_test(Postgres, settings=MODEL_SETTINGS)


@pytest.mark.parametrize("cluster", [False, True], ids=["standalone", "cluster"])
def test_two_breakers_on_redis(cluster: bool) -> None:
    with redis_instances(cluster=cluster) as factory:

        class Redis(SharedModel):
            storages = staticmethod(lambda: (factory(), factory()))

        run_state_machine_as_test(Redis, settings=MODEL_SETTINGS)
