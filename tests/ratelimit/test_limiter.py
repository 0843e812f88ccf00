"""RateLimiter over MemoryStorage with a fake clock: the public API as users call it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import anyio
import pytest

from asgi_helpers import FailingStorage
from fineflow import (
    CircuitState,
    ConfigurationError,
    Decision,
    Decisions,
    Hit,
    MemoryStorage,
    Quota,
    RateLimiter,
    StorageClosedError,
)
from fineflow._ratelimit.algorithms import NS
from fineflow._ratelimit.limiter import STORAGE_UNAVAILABLE
from fineflow.testing import FakeClock

pytestmark = pytest.mark.anyio


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def limiter(clock: FakeClock) -> RateLimiter:
    return RateLimiter(MemoryStorage(clock=clock.time_ns))


async def test_hit_counts_down_and_recovers(limiter: RateLimiter, clock: FakeClock) -> None:
    got = [await limiter.hit("alice", "3/second") for _ in range(4)]
    assert [d.allowed for d in got] == [True, True, True, False]
    assert [d.remaining for d in got] == [2, 1, 0, 0]
    assert got[3].retry_after == pytest.approx(1 / 3, abs=1e-6)
    clock.advance_ns(NS // 3 + 1)
    assert (await limiter.hit("alice", "3/second")).allowed
    metrics = limiter.metrics()
    assert (metrics.decisions, metrics.allowed, metrics.denied) == (5, 4, 1)
    assert metrics.storage_healthy


async def test_hit_all_is_all_or_nothing_and_reports_the_longest_wait(
    limiter: RateLimiter,
) -> None:
    first = await limiter.hit_all("bob", ["2/second", "3/minute"])
    assert isinstance(first, Decisions)
    assert first.allowed
    assert first.retry_after == 0.0
    await limiter.hit_all("bob", ["2/second", "3/minute"])
    third = await limiter.hit_all("bob", ["2/second", "3/minute"])
    assert not third.allowed
    assert [d.allowed for d in third] == [False, True]
    assert third.denied == [third[0]]
    assert third[1].remaining == 1  # not charged
    too_big = await limiter.hit_all("bob", ["2/second"], cost=5)
    assert too_big.retry_after is None


async def test_peek_reset_status(limiter: RateLimiter) -> None:
    await limiter.hit("carol", "5/minute", cost=2, endpoint="/chat", tier="pro")
    assert (await limiter.peek("carol", "5/minute", endpoint="/chat")).remaining == 3
    (status,) = await limiter.status("carol")
    assert (status.endpoint, status.tier, status.allowed_total) == ("/chat", "pro", 2)
    assert await limiter.reset("carol") == 1
    assert (await limiter.peek("carol", "5/minute", endpoint="/chat")).remaining == 5


async def test_decide_takes_several_keys_of_one_request(limiter: RateLimiter) -> None:
    q = Quota(1, 60.0)
    hits = [Hit("user", q, 1, "global"), Hit("1.2.3.4", q, 1, "per-ip")]
    assert (await limiter.decide(hits)).allowed
    assert not (await limiter.decide(hits)).allowed


@pytest.mark.parametrize("algorithm", ["gcra", "fixed_window", "sliding_window"])
async def test_every_algorithm_limits(clock: FakeClock, algorithm: str) -> None:
    limiter = RateLimiter(MemoryStorage(clock=clock.time_ns), algorithm=algorithm)
    got = [(await limiter.hit("k", "3/minute")).allowed for _ in range(5)]
    assert got == [True, True, True, False, False]
    metrics = limiter.metrics()
    assert (metrics.decisions, metrics.allowed, metrics.denied) == (5, 3, 2)


async def test_a_storage_subclass_and_a_limiter_subclass_keep_their_overrides(
    clock: FakeClock,
) -> None:
    seen: list[str] = []

    class Audited(MemoryStorage):
        def decide_local(
            self, algorithm: str, hits: Sequence[Hit], *, now: int | None = None
        ) -> list[Decision]:
            seen.append("storage")
            return super().decide_local(algorithm, hits, now=now)

    class Logged(RateLimiter):
        async def hit(
            self, key: str, quota: Quota | str, cost: int = 1, *, endpoint: str = "", tier: str = ""
        ) -> Decision:
            seen.append("limiter")
            return await super().hit(key, quota, cost, endpoint=endpoint, tier=tier)

    limiter = Logged(Audited(clock=clock.time_ns))
    got = [(await limiter.hit("k", "1/minute")).allowed for _ in range(2)]
    assert got == [True, False]
    assert seen == ["limiter", "storage"] * 2
    metrics = limiter.metrics()
    assert (metrics.decisions, metrics.allowed, metrics.denied) == (2, 1, 1)


@pytest.mark.parametrize("cost", [-1, 2.5, True])
async def test_bad_cost_raises(limiter: RateLimiter, cost: object) -> None:
    with pytest.raises(ValueError, match="cost"):
        await limiter.hit("k", "1/second", cost=cost)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"algorithm": "leaky"}, "unknown algorithm"),
        ({"on_storage_error": "maybe"}, "allow"),
        ({"timeout": 0}, "timeout"),
        ({"failure_threshold": 0}, "failure_threshold"),
        ({"recovery_time": -1}, "recovery_time"),
    ],
)
def test_configuration_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        RateLimiter(MemoryStorage(), **kwargs)  # type: ignore[arg-type]


async def test_a_closed_storage_fails_open_or_closed_by_policy() -> None:
    for policy, allowed in (("allow", True), ("deny", False)):
        storage = MemoryStorage()
        limiter = RateLimiter(storage, on_storage_error=policy)  # type: ignore[arg-type]
        await storage.close()
        decision = await limiter.hit("k", "1/second")
        assert decision.allowed is allowed
        assert decision.reason == STORAGE_UNAVAILABLE
        many = await limiter.hit_all("k", ["1/second", "2/second"])
        assert many.storage_failed
        assert many.allowed is allowed
        one = limiter.decide_nowait([Hit("k", Quota(1, 1.0))])
        assert one is not None and one.storage_failed
        metrics = limiter.metrics()
        assert (metrics.decisions, metrics.allowed, metrics.denied) == (3, 0, 0)
        assert (metrics.failed_open, metrics.failed_closed) == ((3, 0) if allowed else (0, 3))
        assert metrics.storage_errors == 3


async def test_storage_breaker_opens_and_probes(clock: FakeClock) -> None:
    class Outage(MemoryStorage):
        """Down until told otherwise."""

        down = True

        def decide_local(
            self, algorithm: str, hits: Sequence[Hit], *, now: int | None = None
        ) -> list[Decision]:
            if self.down:
                raise StorageClosedError("down")
            return super().decide_local(algorithm, hits, now=now)

    now = [0.0]
    storage = Outage(clock=clock.time_ns)
    limiter = RateLimiter(storage, failure_threshold=2, recovery_time=1.0, clock=lambda: now[0])
    hits = [Hit("k", Quota(1, 1.0)), Hit("k", Quota(2, 1.0))]  # the general (async) path
    for _ in range(5):
        assert (await limiter.decide(hits)).storage_failed
    assert limiter.breaker.state is CircuitState.OPEN
    assert limiter.metrics().short_circuited == 3
    assert not limiter.metrics().storage_healthy
    now[0] += 1.5
    storage.down = False  # the store is back
    assert (await limiter.decide(hits)).allowed
    state: CircuitState = limiter.breaker.state  # re-read: mypy narrowed it above
    assert state is CircuitState.CLOSED


async def test_recovery_is_logged_with_the_number_of_fallback_decisions(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Flaky(FailingStorage):
        """Down for three decisions, then a working in-memory store (not in-process to
        the limiter: no decider, so decisions take the general path)."""

        def __init__(self) -> None:
            super().__init__()
            self.memory = MemoryStorage()

        async def decide(
            self,
            algorithm: str,
            hits: Sequence[Hit],
            *,
            now: int | None = None,
            timeout: float | None = None,  # noqa: ASYNC109 - the Storage protocol's
        ) -> list[Decision]:
            if self.decide_calls < 3:
                return await super().decide(algorithm, hits, now=now, timeout=timeout)
            return self.memory.decide_local(algorithm, hits, now=now)

    limiter = RateLimiter(Flaky(), failure_threshold=10)
    with caplog.at_level("WARNING", logger="fineflow.limiter"):
        got = [(await limiter.hit("k", "10/minute")).reason for _ in range(5)]
    assert got == [STORAGE_UNAVAILABLE] * 3 + [None] * 2
    messages = [r.getMessage() for r in caplog.records if r.name == "fineflow.limiter"]
    assert len(messages) == 2
    assert "recovered after 3 requests" in messages[1]
    metrics = limiter.metrics()
    assert (metrics.decisions, metrics.allowed, metrics.failed_open) == (5, 2, 3)


class Slow(FailingStorage):
    """A store that answers after ``delay`` seconds (a slow database), keeping the time
    budget it is given as the Storage protocol asks (it records each budget)."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.memory = MemoryStorage()
        self.budgets: list[float | None] = []

    async def decide(
        self,
        algorithm: str,
        hits: Sequence[Hit],
        *,
        now: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the Storage protocol's
    ) -> list[Decision]:
        self.budgets.append(timeout)
        with anyio.fail_after(timeout):
            await anyio.sleep(self.delay)
        return self.memory.decide_local(algorithm, hits, now=now)


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_the_time_budget_holds_on_asyncio_and_trio(anyio_backend: str) -> None:
    slow = Slow(10.0)
    limiter = RateLimiter(slow, timeout=0.05, failure_threshold=10)
    with anyio.fail_after(5):  # (a hang would fail here, not wait ten seconds)
        decision = await limiter.hit("k", "5/minute")
    assert slow.budgets == [0.05]  # the limiter passes its budget; the storage keeps it
    assert decision.reason == STORAGE_UNAVAILABLE and decision.allowed
    assert limiter.metrics().storage_timeouts == 1
    fast = RateLimiter(Slow(0.0), timeout=5.0)
    assert (await fast.hit("k", "5/minute")).remaining == 4


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_caller_cancelled_inside_the_budget_is_not_a_storage_timeout(
    anyio_backend: str,
) -> None:
    limiter = RateLimiter(Slow(10.0), timeout=5.0, failure_threshold=10)
    with anyio.move_on_after(0.05) as scope:
        await limiter.hit("k", "5/minute")
    assert scope.cancelled_caught
    metrics = limiter.metrics()
    assert (metrics.decisions, metrics.storage_timeouts, metrics.storage_errors) == (0, 0, 0)
    assert metrics.storage_healthy


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_answer_in_time_is_kept_when_a_busy_loop_also_passes_the_deadline(
    anyio_backend: str,
) -> None:
    """The answer arrives at 10 ms, the budget ends at 20 ms, and a CPU-bound handler holds
    the loop until 50 ms: both are due in one iteration. The answer (already charged) wins:
    the limiter sets no deadline of its own over the storage's."""

    class Late(Slow):
        async def decide(
            self,
            algorithm: str,
            hits: Sequence[Hit],
            *,
            now: int | None = None,
            timeout: float | None = None,  # noqa: ASYNC109 - the Storage protocol's
        ) -> list[Decision]:
            loop = asyncio.get_running_loop()
            answer: asyncio.Future[list[Decision]] = loop.create_future()
            decided = self.memory.decide_local(algorithm, hits, now=now)
            loop.call_later(0.01, answer.set_result, decided)
            with anyio.fail_after(timeout):
                return await answer

    limiter = RateLimiter(Late(0.0), timeout=0.02, failure_threshold=10)
    task = asyncio.create_task(limiter.hit("k", "5/minute"))
    await asyncio.sleep(0)  # the hit now waits for its answer
    time.sleep(0.05)  # noqa: ASYNC251 - blocking on purpose: the busy handler
    decision = await task
    assert (decision.reason, decision.remaining) == (None, 4)
    assert limiter.metrics().storage_timeouts == 0
