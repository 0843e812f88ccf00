"""Breakers sharing their state through a real store: every "instance" is its own storage
object (its own connections and listener) on one store.

Open deadlines live on the store's clock, so these tests use short real reset timeouts and
wait for them; background work is awaited by bounded polling. No duration is asserted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest

from fineflow import (
    BreakerRegistry,
    CircuitBreaker,
    CircuitState,
    ConfigurationError,
    MemoryStorage,
    Permit,
    PostgresStorage,
    RedisStorage,
)
from fineflow._breaker.shared import (
    BreakerStore,
    SharedState,
)
from shared_breaker_helpers import (
    STORES,
    DelegatingStore,
    Sharing,
    eventually,
    in_state,
    opened,
    store_instances,
)

pytestmark = pytest.mark.anyio

CLOSED, OPEN, HALF = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN
RESET = 0.15  # seconds: real time on the store's clock


@pytest.fixture(params=STORES)
def instances(request: pytest.FixtureRequest) -> Iterator[Callable[[], Any]]:
    """A factory of storages that are instances of one service on one store (in memory:
    breakers sharing one ``MemoryStorage``)."""
    yield from store_instances(request, request.param)


def breaker(storage: Any, name: str = "upstream", **options: Any) -> CircuitBreaker:
    config: dict[str, Any] = {
        "failure_threshold": 2,
        "reset_timeout": RESET,
        "half_open_max_calls": 2,
    }
    return CircuitBreaker(name, **(config | options), shared=storage)


def trip(b: CircuitBreaker) -> None:
    while b.state is CLOSED:
        permit = b.try_acquire()
        assert permit is not None
        permit.failure()


async def test_an_open_reaches_every_instance_with_the_same_deadline(
    instances: Callable[[], Any],
) -> None:
    async with opened(instances, 3) as storages:
        a, b, c = (breaker(s, reset_timeout=30.0) for s in storages)
        assert all([await x.sync() for x in (a, b, c)])
        trip(a)
        await in_state(b, OPEN)
        await in_state(c, OPEN)
        deadline = a.retry_after()
        assert deadline is not None and deadline > 25.0
        for other in (b, c):
            seen = other.retry_after()
            assert seen is not None and abs(seen - deadline) < 1.0  # the same deadline
        assert b.try_acquire() is None
        assert b.metrics().times_opened == 1


async def test_the_half_open_budget_is_global_and_trials_close_everywhere(
    instances: Callable[[], Any],
) -> None:
    async with opened(instances, 3) as storages:
        group = [breaker(s) for s in storages]
        for x in group:
            await x.sync()
        trip(group[0])
        for x in group:
            await in_state(x, OPEN)
        await eventually(lambda: all(x.retry_after() == 0.0 for x in group), "the deadline")
        permits: list[Permit] = []

        def ask_everywhere() -> bool:
            for x in group:
                permit = x.try_acquire()
                if permit is not None:
                    permits.append(permit)
            return len(permits) >= 2

        await eventually(ask_everywhere, "two trial permits")
        for _ in range(20):  # keep asking: the store grants no third one
            ask_everywhere()
            await eventually(lambda: True, "")
        assert len(permits) == 2
        for permit in permits:
            permit.success()
        for x in group:
            await in_state(x, CLOSED, "closed everywhere by the global trial successes")


async def test_a_failed_trial_reopens_everywhere_with_backoff(
    instances: Callable[[], Any],
) -> None:
    async with opened(instances, 2) as storages:
        a, b = (breaker(s, backoff_multiplier=100.0) for s in storages)
        await a.sync()
        await b.sync()
        trip(a)
        await in_state(b, OPEN)
        await eventually(lambda: b.retry_after() == 0.0, "the deadline")
        permit: Permit | None = None

        def take() -> bool:
            nonlocal permit
            permit = b.try_acquire()
            return permit is not None

        await eventually(take, "a trial permit")
        assert permit is not None
        permit.failure()
        await in_state(a, OPEN, "reopened everywhere")
        await eventually(lambda: (a.retry_after() or 0.0) > RESET * 10, "the backed-off deadline")


async def test_a_new_instance_starts_in_the_shared_state(instances: Callable[[], Any]) -> None:
    async with opened(instances, 1) as (first,):
        a = breaker(first, reset_timeout=30.0)
        await a.sync()
        trip(a)
        store = first.breaker_store()
        for _ in range(500):  # until the open is published (the trip only starts it)
            if (await store.read("upstream")).state is OPEN:
                break
            await anyio.sleep(0.002)
        async with opened(instances, 2) as (second, third):
            synced = breaker(second, reset_timeout=30.0)
            assert await synced.sync()
            assert synced.state is OPEN
            lazy = breaker(third, reset_timeout=30.0)  # reads it by itself once listening
            await in_state(lazy, OPEN)


async def test_reset_closes_everywhere_and_the_registry_shares(
    instances: Callable[[], Any],
) -> None:
    async with opened(instances, 2) as storages:
        r1, r2 = (
            BreakerRegistry(shared=s, failure_threshold=1, reset_timeout=30.0) for s in storages
        )
        a, b = r1.get_or_create("api"), r2.get_or_create("api")
        other = r2.get_or_create("other")
        assert await r1.sync() and await r2.sync()
        trip(a)
        await in_state(b, OPEN)
        assert other.state is CLOSED  # one row per name
        b.reset()
        await in_state(a, CLOSED, "a reset anywhere closes everywhere")
        await r1.aclose()
        trip(b)
        await in_state(b, OPEN)
        assert a.state is CLOSED  # a stopped sharing


def test_shared_must_be_a_storage_that_shares() -> None:
    with pytest.raises(ConfigurationError, match="shared must be a storage"):
        CircuitBreaker("x", shared="postgresql://")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="shared must be a storage"):
        BreakerRegistry(shared=object())  # type: ignore[arg-type]


@pytest.mark.parametrize("store", ["postgres", "redis"])
async def test_a_store_not_open_is_logged_once_and_calls_go_on(
    store: str, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    storage: PostgresStorage | RedisStorage = (  # never opened
        PostgresStorage(request.getfixturevalue("pg_dsn"))
        if store == "postgres"
        else RedisStorage("redis://127.0.0.1:1/0")
    )
    b = breaker(storage)
    caplog.set_level(logging.WARNING, "fineflow.breaker")
    assert not await b.sync()
    assert not await b.sync()
    unavailable = [r for r in caplog.records if "shared state unavailable" in r.getMessage()]
    assert len(unavailable) == 1
    trip(b)  # decided locally
    assert b.state is OPEN
    await b.aclose()


class OvertakenReads(DelegatingStore):
    """A store whose reads answer with the row as it was when asked, once ``gate`` opens:
    a read's reply overtaken by a notification of a newer row (two connections)."""

    def __init__(self, inner: BreakerStore) -> None:
        super().__init__(inner)
        self.gate = anyio.Event()

    async def read(self, name: str) -> SharedState:
        state = await self.inner.read(name)
        await self.gate.wait()
        return state


async def test_a_read_overtaken_by_a_newer_notification_is_dropped() -> None:
    async with MemoryStorage() as storage:
        slow = OvertakenReads(storage.breaker_store())
        a = breaker(storage, reset_timeout=30.0, failure_threshold=1)
        b = breaker(Sharing(slow), reset_timeout=30.0)
        async with anyio.create_task_group() as tg:
            tg.start_soon(b.sync)  # its read sees the closed row, its reply waits
            await anyio.sleep(0.01)
            trip(a)
            await in_state(b, OPEN, "the notification of the open")
            slow.gate.set()
        for _ in range(50):
            await anyio.sleep(0.002)
            assert b.state is OPEN, "the older read's reply must not close it"
