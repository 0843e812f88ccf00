"""MemoryStorage internals the conformance suite does not reach: the bound on entries and
its CLOCK eviction, storable names, and subclasses hooking the synchronous fast path."""

from __future__ import annotations

import logging
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


async def test_entries_are_bounded_and_unused_live_ones_are_evicted_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    storage, _ = memory(max_keys=3)
    for key in "abcde":
        storage.decide_one("gcra", key, Q)
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
        storage.decide_one("gcra", key, Q)
    storage.decide_one("gcra", "a", Q)  # "a" is used again: "b" goes first
    storage.decide_one("gcra", "d", Q)
    assert {s.key for k in "abcd" for s in await storage.status(k)} == {"a", "c", "d"}
    assert (await storage.status("a"))[0].allowed_total == 2


async def test_expired_entries_are_evicted_first_and_not_counted() -> None:
    storage, now = memory(max_keys=2)
    storage.decide_one("gcra", "old", Quota(1, 1.0))
    storage.decide_one("gcra", "live", Quota(1, 3600.0))
    storage.decide_one("gcra", "live", Quota(1, 3600.0))  # used: would survive anyway
    now[0] += 2 * NS
    storage.decide_one("gcra", "new", Q)
    assert storage.evictions == 0
    assert len(storage) == 2
    assert [s.key for s in await storage.status("live")] == ["live"]


async def test_reset_and_cleanup_keep_the_bound_exact() -> None:
    storage, now = memory(max_keys=4)
    for i in range(50):
        storage.decide_one("gcra", f"k{i}", Quota(1, 1.0), endpoint=f"e{i % 3}")
        if i % 2:
            assert await storage.reset(f"k{i}") == 1
    assert len(storage) <= 4
    assert len(storage._queue) <= 2 * len(storage) + 64
    now[0] += 5 * NS
    live = len(storage)
    assert await storage.cleanup() == live
    assert len(storage) == 0
    assert storage._index == {}


async def test_long_and_odd_names_share_state_with_their_storage_key() -> None:
    storage, _ = memory()
    long = "x" * 500
    q = Quota(3, 60.0)
    remaining = [
        storage.decide_one("gcra", key, q, endpoint=ep).remaining
        for key, ep in [(long, long), (storage_key(long), storage_key(long)), (long, long)]
    ]
    assert remaining == [2, 1, 0]
    assert [s.key for s in await storage.status(long)] == [storage_key(long)]
    for odd in ("caf\u00e9", "nul\x00byte", "\ud800"):
        assert [storage.decide_one("gcra", odd, q, endpoint=odd).remaining for _ in "ab"] == [
            2,
            1,
        ]


async def test_closed_storage_refuses_the_fast_path() -> None:
    storage, _ = memory()
    await storage.close()
    with pytest.raises(StorageClosedError):
        storage.decide_one("gcra", "a", Q)
    with pytest.raises(StorageClosedError):
        storage.decide_one("fixed_window", "a", Q)


class RefusingSync(MemoryStorage):
    """A subclass hooking decide_sync, as a storage that refuses before it is opened."""

    def __init__(self) -> None:
        super().__init__(clock=lambda: T0)
        self.calls = 0

    def decide_sync(
        self, algorithm: str, hits: Sequence[Hit], *, now: int | None = None
    ) -> list[Decision]:
        self.calls += 1
        return super().decide_sync(algorithm, hits, now=now)


class CountingOne(MemoryStorage):
    def __init__(self) -> None:
        super().__init__(clock=lambda: T0)
        self.calls = 0

    def decide_one(
        self,
        algorithm: str,
        key: str,
        quota: Quota,
        cost: int = 1,
        endpoint: str = "",
        tier: str = "",
        now: int | None = None,
    ) -> Decision:
        self.calls += 1
        return super().decide_one(algorithm, key, quota, cost, endpoint, tier, now)


@pytest.mark.parametrize("cls", [RefusingSync, CountingOne])
async def test_the_limiter_goes_through_a_subclass_hook(cls: type[RefusingSync]) -> None:
    storage = cls()
    limiter = RateLimiter(storage)
    assert (await limiter.hit("a", Q)).allowed
    decisions = limiter.decide_nowait([Hit("a", Q)])
    assert decisions is not None and decisions.allowed
    assert storage.calls == 2


@pytest.mark.parametrize("algorithm", ["gcra", "fixed_window", "sliding_window"])
async def test_decider_agrees_with_decide(algorithm: str) -> None:
    a, _ = memory()
    b, _ = memory()
    decide = a.decider(algorithm)
    for cost in [1, 0, 3, 5, 20, 2, 0, 1]:
        got = decide("k", Quota(5, 10.0, burst=4), cost, "ep", "pro")
        (expected,) = await b.decide(
            algorithm, [Hit("k", Quota(5, 10.0, burst=4), cost, "ep", "pro")]
        )
        assert got == expected
    assert await a.stats() == await b.stats()
