"""RateLimiter under storage faults, on a throwaway cluster this module owns (never the
machine's own server): stopped, slow, pool exhausted; then recovery without a restart."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest

from fineflow import PostgresStorage, Quota, RateLimiter
from fineflow._ratelimit.limiter import STORAGE_UNAVAILABLE
from fineflow.testing import FakeClock, ThrowawayCluster, find_postgres_bindir

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def cluster() -> Iterator[ThrowawayCluster]:
    if find_postgres_bindir() is None:
        pytest.fail("fault tests need PostgreSQL server binaries (initdb, pg_ctl) on this machine")
    with ThrowawayCluster.create() as c:
        yield c


@pytest.fixture
async def storage(cluster: ThrowawayCluster, pg_schema: str) -> AsyncIterator[PostgresStorage]:
    async with PostgresStorage(cluster.dsn, schema=pg_schema, max_size=2, connect_timeout=1) as pg:
        await pg.migrate()
        yield pg


@pytest.mark.parametrize("policy", ["allow", "deny"])
async def test_server_stopped_then_back(
    cluster: ThrowawayCluster,
    storage: PostgresStorage,
    policy: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock(start=0.0)
    limiter = RateLimiter(storage, on_storage_error=policy, timeout=0.5, clock=clock)  # type: ignore[arg-type]
    quota = Quota(2, 3600.0)
    assert (await limiter.hit("k", quota)).allowed
    cluster.stop("immediate")
    try:
        with caplog.at_level(logging.WARNING, logger="fineflow.limiter"):
            outcomes = [await limiter.hit("k", quota) for _ in range(10)]
        assert all(d.reason == STORAGE_UNAVAILABLE for d in outcomes)
        assert all(d.allowed == (policy == "allow") for d in outcomes)
        if policy == "deny":
            assert all(d.retry_after is not None and d.retry_after >= 1 for d in outcomes)
        metrics = limiter.metrics()
        assert metrics.storage_errors + metrics.storage_timeouts == 3  # then short-circuited
        assert metrics.short_circuited == 7
        assert not metrics.storage_healthy
        failing = [r for r in caplog.records if r.name == "fineflow.limiter"]
        assert len(failing) == 1  # one line per burst, not per request
    finally:
        cluster.start()
    clock.advance(5.0)  # past the recovery time: the next request probes the store
    with caplog.at_level(logging.WARNING, logger="fineflow.limiter"):
        recovered = None
        for _ in range(20):  # the pool may need a moment to reconnect
            recovered = await limiter.hit("k", quota)
            if recovered.reason is None:
                break
            clock.advance(5.0)
    assert recovered is not None
    assert recovered.reason is None
    assert recovered.allowed  # the second of two: state survived the crash
    assert not (await limiter.hit("k", quota)).allowed
    assert limiter.metrics().storage_healthy
    assert any("recovered" in r.getMessage() for r in caplog.records)


async def test_slow_statement_times_out_and_fails_open(
    cluster: ThrowawayCluster, storage: PostgresStorage
) -> None:
    limiter = RateLimiter(storage, timeout=0.2)
    quota = Quota(5, 60.0)
    assert (await limiter.hit("slow", quota)).allowed
    with psycopg.connect(cluster.dsn.replace("dbname=postgres", "dbname=postgres")) as blocker:
        blocker.execute(
            f"SELECT * FROM {storage.schema}.buckets WHERE key = 'slow' FOR UPDATE"
        )  # holds the row lock in an open transaction: decisions on it block
        decision = await limiter.hit("slow", quota)
        assert decision.allowed
        assert decision.reason == STORAGE_UNAVAILABLE
        assert limiter.metrics().storage_timeouts == 1
        blocker.rollback()
    good = await limiter.hit("slow", quota)
    assert good.reason is None
    assert good.remaining in (2, 3)  # the timed-out statement may have landed after all


async def test_pool_exhausted_fails_closed_when_asked(
    cluster: ThrowawayCluster, pg_schema: str
) -> None:
    async with PostgresStorage(cluster.dsn, schema=pg_schema, max_size=1) as storage:
        await storage.migrate()
        limiter = RateLimiter(storage, on_storage_error="deny", timeout=0.2)
        async with storage.pool.connection():
            decision = await limiter.hit("p", Quota(5, 60.0))
        assert not decision.allowed
        assert decision.reason == STORAGE_UNAVAILABLE
        after = await limiter.hit("p", Quota(5, 60.0))
        assert after.allowed
        assert after.reason is None
        assert storage.pool.get_stats()["pool_size"] <= 1
