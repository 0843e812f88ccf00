"""RedisStorage's stats: per-minute counters by endpoint and tier, on a standalone server and
on a three-master Cluster; they equal what callers saw, outlive the storage, expire after
their retention and are read without a scan of the keys."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis_fixtures import (  # noqa: F401 - the fixtures redis_cluster, redis_server
    redis_cluster_fixture,
    redis_server_fixture,
)

from fineflow import Hit, Quota, RateLimiter, RedisStorage
from fineflow._ratelimit.algorithms import NS
from fineflow.testing.redis import RedisServer, ThrowawayCluster, delete_prefix, unique_prefix

pytestmark = pytest.mark.anyio

MINUTE = 60 * NS


@pytest.fixture(params=["standalone", "cluster"])
def where(
    request: pytest.FixtureRequest, redis_server: RedisServer, redis_cluster: ThrowawayCluster
) -> tuple[str, bool]:
    """The URL of a server or cluster, and whether it is a cluster."""
    if request.param == "cluster":
        return redis_cluster.url, True
    return redis_server.url, False


def client_of(url: str, cluster: bool) -> Redis | RedisCluster:
    if cluster:
        return RedisCluster.from_url(url.replace("redis+cluster://", "redis://"))
    return Redis.from_url(url)


async def forget(url: str, cluster: bool, prefix: str) -> None:
    """Delete the prefix's keys from the shared server (the cluster is a throwaway one)."""
    if not cluster:
        await delete_prefix(url, prefix)


async def burst(limiter: RateLimiter) -> Counter[tuple[str, str, bool]]:
    """Concurrent callers of two endpoints and tiers, some with a global quota of another key
    too (on a cluster, a request in two slots); what each group's callers saw."""
    calls: list[tuple[str, str, Awaitable[object]]] = []
    for i in range(40):
        user = f"user-{i % 5}"
        calls.append(
            ("/chat", "free", limiter.hit(user, "3/minute", endpoint="/chat", tier="free"))
        )
        calls.append(("/chat", "pro", limiter.hit(user, "6/minute", endpoint="/chat", tier="pro")))
    results = await asyncio.gather(*(call for _, _, call in calls))
    seen: Counter[tuple[str, str, bool]] = Counter()
    for (endpoint, tier, _), decision in zip(calls, results, strict=True):
        seen[endpoint, tier, decision.allowed] += 1  # type: ignore[attr-defined]
    return seen


async def test_counts_equal_what_callers_saw_and_outlive_the_storage(
    where: tuple[str, bool],
) -> None:
    url, cluster = where
    prefix = unique_prefix()
    try:
        seen: Counter[tuple[str, str, bool]] = Counter()
        async with RedisStorage(url, prefix=prefix) as one, RedisStorage(url, prefix=prefix) as two:
            for storage in (one, two):
                seen += await burst(RateLimiter(storage, timeout=None))
            # A request on two keys (two slots on a cluster), denied by the global quota:
            # counted once under each endpoint, denied.
            hits = [Hit("user-9", Quota(9, 60.0), 1, "/x"), Hit("all", Quota(1, 60.0), 1, "/g")]
            verdicts = [all(d.allowed for d in await one.decide("gcra", hits)) for _ in range(2)]
            assert verdicts == [True, False]
        expected = {
            (endpoint, tier): (seen[endpoint, tier, True], seen[endpoint, tier, False])
            for endpoint, tier, _ in seen
        }
        assert expected == {("/chat", "free"): (15, 65), ("/chat", "pro"): (30, 50)}
        expected |= {("/x", ""): (1, 1), ("/g", ""): (1, 1)}
        async with RedisStorage(url, prefix=prefix) as reopened:
            rows = await reopened.stats()
            assert {(r.endpoint, r.tier): (r.allowed, r.denied) for r in rows} == expected
            (point,) = await reopened.stats_series(since=3600, by=())
            assert (point.allowed, point.denied) == (47, 117)
            assert abs(point.minute.timestamp() - time.time()) < 180
            assert reopened.stats_flush_snapshot().flushes == 0  # it only read
    finally:
        await forget(url, cluster, prefix)


async def test_minutes_expire_after_the_retention_and_leave_the_index(
    where: tuple[str, bool],
) -> None:
    url, cluster = where
    prefix = unique_prefix()
    client = client_of(url, cluster)
    now = time.time_ns()
    try:
        async with RedisStorage(url, prefix=prefix, stats_retention=300) as storage:
            assert storage.stats_retention == 300.0
            for at in (now - 20 * MINUTE, now - 2 * MINUTE):
                await storage.decide("gcra", [Hit("k", Quota(9, 60.0), 1, "/e")], now=at)
                await storage.stats()  # (each minute's counts written now)
            index: list[bytes] = await client.zrange(f"{prefix}:s:minutes", 0, -1)  # type: ignore[assignment]
            minutes = [int(m) for m in index]
            assert minutes == [(now - 2 * MINUTE) // MINUTE]  # the older one trimmed
            for minute in (now - 20 * MINUTE, now - 2 * MINUTE):
                ttl = await client.pttl(f"{prefix}:s:{minute // MINUTE}")
                assert 0 < ttl <= 300_000
            assert [p.allowed for p in await storage.stats_series()] == [1]
            # Only these keys: the state's hash, the minute hashes and their index.
            names = {n async for n in client.scan_iter(match=f"{prefix}:*")}
            assert {n.decode().split(":")[1] for n in names} == {"k", "s"}
    finally:
        await client.aclose()
        await forget(url, cluster, prefix)


async def test_without_counting_nothing_is_written(redis_server: RedisServer) -> None:
    prefix = unique_prefix()
    try:
        async with RedisStorage(redis_server.url, prefix=prefix, stats_flush_every=None) as storage:
            await storage.decide("gcra", [Hit("k", Quota(1, 60.0), 1, "/e")])
            assert await storage.stats() == []
    finally:
        await delete_prefix(redis_server.url, prefix)
