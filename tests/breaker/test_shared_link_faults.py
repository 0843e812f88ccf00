"""The link between a breaker and its shared store under faults: work added while a step is
in flight, and what a store outage leaves pending. MemoryStorage's breaker store holds the
state; a wrapper in front of it delays or fails steps (the link only sees the
``BreakerStore`` protocol)."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import pytest

from fineflow import CircuitBreaker, CircuitOpenError, CircuitState, MemoryStorage
from fineflow._breaker.shared import Action
from fineflow.testing import FakeClock
from shared_breaker_helpers import Sharing, Switchable, eventually, in_state

pytestmark = pytest.mark.anyio


async def boom() -> None:
    raise RuntimeError("upstream failed")


async def ok() -> int:
    return 1


def unavailable(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "shared state unavailable" in r.getMessage()]


async def test_a_reset_while_a_verdict_is_in_flight_loses_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    async with MemoryStorage(clock=clock.time_ns) as storage:
        store = Switchable(storage.breaker_store())
        breaker = CircuitBreaker(
            "svc",
            shared=Sharing(store),
            failure_threshold=1,
            reset_timeout=10,
            half_open_max_calls=2,
            success_threshold=2,
            clock=clock,
        )
        assert await breaker.sync()
        with pytest.raises(RuntimeError):
            await breaker.call(boom)
        await eventually(lambda: Action.OPEN in store.sent, "the open published")
        clock.advance(11)
        with pytest.raises(CircuitOpenError):
            await breaker.call(ok)  # turned away: the link asks the store for a permit
        await in_state(breaker, CircuitState.HALF_OPEN)
        await eventually(lambda: Action.ACQUIRE in store.sent, "a permit asked for")
        store.hold[Action.SUCCESS] = release = anyio.Event()
        with caplog.at_level(logging.WARNING, logger="fineflow.breaker"):
            assert await breaker.call(ok) == 1  # a trial: its SUCCESS step waits
            await anyio.sleep(0.05)
            breaker.reset()  # clears the pending work while that step is in flight
            release.set()
            await eventually(lambda: Action.CLOSE in store.sent, "the reset published")
        assert unavailable(caplog) == []  # the store never looked unavailable
        assert breaker.state is CircuitState.CLOSED
        assert (await storage.breaker_store().read("svc")).state is CircuitState.CLOSED
        await breaker.aclose()


async def test_an_open_made_while_the_store_was_down_is_dropped_once_recovered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A trips while the store is down, then recovers by itself (a local trial succeeds):
    when the store is back, its stale open must not open B."""
    clock = FakeClock()
    async with MemoryStorage(clock=clock.time_ns) as storage:
        store = Switchable(storage.breaker_store())
        options: dict[str, Any] = {
            "failure_threshold": 1,
            "reset_timeout": 10,
            "half_open_max_calls": 1,
            "clock": clock,
        }
        a = CircuitBreaker("svc", shared=Sharing(store), **options)
        b = CircuitBreaker("svc", shared=storage, **options)
        assert await a.sync() and await b.sync()
        store.down = True
        with caplog.at_level(logging.WARNING, logger="fineflow.breaker"):
            with pytest.raises(RuntimeError):
                await a.call(boom)
            assert a.metrics().state is CircuitState.OPEN
            await eventually(lambda: bool(unavailable(caplog)), "the store seen down")
        clock.advance(11)
        assert await a.call(ok) == 1  # a local trial (the store is away): closes A
        assert a.state is CircuitState.CLOSED
        store.down = False
        assert await a.sync()  # A rejoins
        await anyio.sleep(0.2)  # time for anything still pending to go out
        assert Action.OPEN not in store.sent
        assert (a.state, b.state) == (CircuitState.CLOSED, CircuitState.CLOSED)
        assert (await storage.breaker_store().read("svc")).state is CircuitState.CLOSED
        await a.aclose()
        await b.aclose()
