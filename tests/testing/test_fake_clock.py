"""fineflow.testing.FakeClock: one fake clock for the storages, the limiter and the breakers."""

from __future__ import annotations

import pytest

import fineflow as ff
from fineflow.testing import FakeClock

pytestmark = pytest.mark.anyio


def test_seconds_and_nanoseconds_move_together() -> None:
    clock = FakeClock(start=1000.0)
    assert clock() == clock.now == 1000.0
    assert clock.time_ns() == 1000 * 10**9
    clock.advance(0.25)
    assert clock() == 1000.25
    assert clock.time_ns() == 1000 * 10**9 + 250_000_000
    clock.now = 2000.5
    assert clock.time_ns() == 2000 * 10**9 + 500_000_000
    assert repr(clock) == "FakeClock(now=2000.5)"


def test_nanoseconds_advance_exactly_over_many_small_steps() -> None:
    clock = FakeClock()
    start = clock.time_ns()
    for _ in range(1000):
        clock.advance(0.001)
    assert clock.time_ns() - start == 10**9


def test_time_does_not_go_backwards() -> None:
    clock = FakeClock()
    with pytest.raises(ValueError, match="only moves forward"):
        clock.advance(-1)


async def test_drives_memory_storage_and_breaker() -> None:
    clock = FakeClock()
    limiter = ff.RateLimiter(ff.MemoryStorage(clock=clock.time_ns), clock=clock)
    quota = ff.Quota.parse("2/minute")
    assert [(await limiter.hit("k", quota)).allowed for _ in range(3)] == [True, True, False]
    clock.advance(30)
    assert (await limiter.hit("k", quota)).allowed
    assert not (await limiter.hit("k", quota)).allowed

    breaker = ff.CircuitBreaker("up", failure_threshold=1, reset_timeout=10.0, clock=clock)

    async def fail() -> None:
        raise RuntimeError("down")

    with pytest.raises(RuntimeError):
        await breaker.call(fail)
    with pytest.raises(ff.CircuitOpenError) as rejected:
        await breaker.call(fail)
    assert rejected.value.retry_after == pytest.approx(10.0)
    clock.advance(10)

    async def ok() -> str:
        return "ok"

    assert await breaker.call(ok) == "ok"  # the reset timeout passed on the fake clock


def test_advance_ns_moves_exactly() -> None:
    clock = FakeClock(start=0.0)
    clock.advance_ns(333_333_334)
    assert clock.time_ns() == 333_333_334
    with pytest.raises(ValueError, match="only moves forward"):
        clock.advance_ns(-1)
