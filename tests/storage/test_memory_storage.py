"""MemoryStorage behaviour the conformance suite does not reach: the bound on entries and
its CLOCK eviction, storable names, and subclasses hooking the synchronous decision."""

from __future__ import annotations

import logging
import tracemalloc
from collections.abc import Sequence

import pytest

from fineflow import Decision, Hit, MemoryStorage, Quota, RateLimiter, StorageClosedError
from fineflow._ratelimit.algorithms import NS
from fineflow._storage.base import storage_key

pytestmark = pytest.mark.anyio

T0 = 1_700_000_000 * NS
Q = Quota(10, 60.0)


def memory(max_keys: int = 100) -> tuple[MemoryStorage, list[int]]:
    now = [T0]
    return MemoryStorage(max_keys=max_keys, clock=lambda: now[0]), now


def decide_one(
    storage: MemoryStorage, algorithm: str, key: str, quota: Quota, *, endpoint: str = ""
) -> Decision:
    """One quota's decision, synchronously."""
    (decision,) = storage.decide_local(algorithm, [Hit(key, quota, 1, endpoint)])
    return decision


async def test_entries_are_bounded_and_unused_live_ones_are_evicted_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    storage, _ = memory(max_keys=3)
    for key in "abcde":
        decide_one(storage, "gcra", key, Q)
    assert len(storage) == 3
    assert storage.evictions == 2
    assert [r.message for r in caplog.records if r.levelno == logging.WARNING][:1] == [
        "MemoryStorage is full (max_keys=3): evicting live state of keys not used recently; "
        "raise max_keys to keep it"
    ]
    assert await storage.status("a") == [] and await storage.status("b") == []
    assert [s.key for s in await storage.status("e")] == ["e"]


async def test_recently_used_entries_get_a_second_chance() -> None:
    storage, _ = memory(max_keys=3)
    for key in "abc":
        decide_one(storage, "gcra", key, Q)
    decide_one(storage, "gcra", "a", Q)  # "a" is used again: "b" goes first
    decide_one(storage, "gcra", "d", Q)
    assert {s.key for k in "abcd" for s in await storage.status(k)} == {"a", "c", "d"}
    assert (await storage.status("a"))[0].allowed_total == 2


async def test_expired_entries_are_evicted_first_and_not_counted() -> None:
    storage, now = memory(max_keys=2)
    decide_one(storage, "gcra", "old", Quota(1, 1.0))
    decide_one(storage, "gcra", "live", Quota(1, 3600.0))
    decide_one(storage, "gcra", "live", Quota(1, 3600.0))  # used: would survive anyway
    now[0] += 2 * NS
    decide_one(storage, "gcra", "new", Q)
    assert storage.evictions == 0
    assert len(storage) == 2
    assert [s.key for s in await storage.status("live")] == ["live"]


async def test_reset_and_cleanup_keep_the_bound_exact() -> None:
    storage, now = memory(max_keys=4)
    for i in range(50):
        decide_one(storage, "gcra", f"k{i}", Quota(1, 1.0), endpoint=f"e{i % 3}")
        if i % 2:
            assert await storage.reset(f"k{i}") == 1
        assert len(storage) <= 4
    now[0] += 5 * NS
    live = len(storage)
    assert await storage.cleanup() == live
    assert len(storage) == 0
    # The request counts outlive the state (and its keys): 50 requests, one per key.
    rows = [(r.endpoint, r.keys, r.allowed, r.denied) for r in await storage.stats()]
    assert rows == [("e0", 0, 17, 0), ("e1", 0, 17, 0), ("e2", 0, 16, 0)]


async def test_removed_entries_are_dropped_for_good() -> None:
    """Keys that come and go (reset, never evicted) leave nothing behind: the memory used
    stays flat however many there were."""
    storage, _ = memory(max_keys=100_000)

    async def churn(start: int, stop: int) -> None:
        for i in range(start, stop):
            decide_one(storage, "gcra", f"k{i}", Q)
            assert await storage.reset(f"k{i}") == 1

    tracemalloc.start()
    try:
        await churn(0, 2_000)
        before = tracemalloc.get_traced_memory()[0]
        await churn(2_000, 20_000)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(storage) == 0
    assert grown < 200_000  # (keeping the 18,000 removed entries would take megabytes)


async def test_long_and_odd_names_share_state_with_their_storage_key() -> None:
    storage, _ = memory()
    long = "x" * 500
    q = Quota(3, 60.0)
    remaining = [
        decide_one(storage, "gcra", key, q, endpoint=ep).remaining
        for key, ep in [(long, long), (storage_key(long), storage_key(long)), (long, long)]
    ]
    assert remaining == [2, 1, 0]
    assert [s.key for s in await storage.status(long)] == [storage_key(long)]
    for odd in ("caf\u00e9", "nul\x00byte", "\ud800"):
        assert [decide_one(storage, "gcra", odd, q, endpoint=odd).remaining for _ in "ab"] == [
            2,
            1,
        ]


async def test_closed_storage_refuses_the_fast_path() -> None:
    storage, _ = memory()
    await storage.close()
    with pytest.raises(StorageClosedError):
        decide_one(storage, "gcra", "a", Q)
    with pytest.raises(StorageClosedError):
        decide_one(storage, "fixed_window", "a", Q)


class Hooked(MemoryStorage):
    """A subclass hooking the synchronous decision, as a storage that audits decisions."""

    def __init__(self) -> None:
        super().__init__(clock=lambda: T0)
        self.calls = 0

    def decide_local(
        self, algorithm: str, hits: Sequence[Hit], *, now: int | None = None
    ) -> list[Decision]:
        self.calls += 1
        return super().decide_local(algorithm, hits, now=now)


async def test_the_limiter_goes_through_a_subclass_hook() -> None:
    storage = Hooked()
    limiter = RateLimiter(storage)
    assert (await limiter.hit("a", Q)).allowed
    decisions = limiter.decide_nowait([Hit("a", Q)])
    assert decisions is not None and decisions.allowed
    assert (await limiter.decide([Hit("a", Q)])).allowed  # (decide() through it too)
    assert storage.calls == 3


@pytest.mark.parametrize("algorithm", ["gcra", "fixed_window", "sliding_window"])
async def test_the_synchronous_decision_agrees_with_decide(algorithm: str) -> None:
    a, _ = memory()
    b, _ = memory()
    limiter = RateLimiter(a, algorithm=algorithm)
    for cost in [1, 0, 3, 5, 20, 2, 0, 1]:
        hit = Hit("k", Quota(5, 10.0, burst=4), cost, "ep", "pro")
        got = limiter.decide_nowait([hit])
        assert got is not None
        assert list(got) == await b.decide(algorithm, [hit])
    assert await a.stats() == await b.stats()
