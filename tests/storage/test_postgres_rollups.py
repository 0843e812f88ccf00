"""Durable stats in PostgreSQL: per-minute request counts by endpoint and tier, written by
every instance, that outlive cleanup and restarts, pruned after their retention; their writes
never fail a request. On the session's real server."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta

import psycopg
import pytest
from psycopg import sql

from fineflow import ConfigurationError, Hit, PostgresStorage, Quota, RateLimiter
from fineflow._ratelimit.algorithms import NS
from fineflow._storage.postgres import migrations

pytestmark = pytest.mark.anyio

MINUTE = 60 * NS


@pytest.fixture
async def admin(pg_dsn: str, pg_schema: str) -> AsyncIterator[PostgresStorage]:
    """The schema's owner, migrated; its own requests are not counted."""
    async with PostgresStorage(pg_dsn, schema=pg_schema, stats_flush_every=None) as storage:
        await storage.migrate()
        yield storage


async def until(condition: Callable[[], bool | Awaitable[bool]], what: str) -> None:
    """Wait for a background task's effect (it runs on its own schedule)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        outcome = condition()
        if outcome if isinstance(outcome, bool) else await outcome:
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"never happened: {what}")


async def table_total(dsn: str, schema: str) -> tuple[int, int]:
    """The rollups table's sums, read directly."""
    query = sql.SQL("SELECT coalesce(sum(allowed), 0), coalesce(sum(denied), 0) FROM {}.rollups")
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(query.format(sql.Identifier(schema)))
        row = await cur.fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


async def burst(limiter: RateLimiter) -> Counter[tuple[str, str, bool]]:
    """Concurrent callers on three (endpoint, tier) groups, some with two quotas; what
    each group's callers saw."""
    calls: list[tuple[str, str, Awaitable[object]]] = []
    for i in range(60):
        user = f"user-{i % 7}"
        calls.append(
            ("/chat", "free", limiter.hit(user, "3/minute", endpoint="/chat", tier="free"))
        )
        calls.append(("/chat", "pro", limiter.hit(user, "8/minute", endpoint="/chat", tier="pro")))
        both = limiter.hit_all(user, ["4/minute", "100/day"], endpoint="/search", tier="free")
        calls.append(("/search", "free", both))
    results = await asyncio.gather(*(call for _, _, call in calls))
    seen: Counter[tuple[str, str, bool]] = Counter()
    for (endpoint, tier, _), decision in zip(calls, results, strict=True):
        seen[endpoint, tier, decision.allowed] += 1  # type: ignore[attr-defined]
    return seen


async def test_counts_equal_what_callers_saw_and_outlive_cleanup_and_restart(
    pg_dsn: str, pg_schema: str, admin: PostgresStorage
) -> None:
    seen: Counter[tuple[str, str, bool]] = Counter()
    async with (
        PostgresStorage(pg_dsn, schema=pg_schema) as one,
        PostgresStorage(pg_dsn, schema=pg_schema) as two,  # another instance of the app
    ):
        for storage in (one, two):
            seen += await burst(RateLimiter(storage, timeout=None))
    expected = {
        (endpoint, tier): (seen[endpoint, tier, True], seen[endpoint, tier, False])
        for endpoint, tier, _ in seen
    }
    assert expected[("/chat", "free")] == (21, 99)  # 7 users x 3, the rest denied
    # Both instances closed ("the app restarted"); the state expires and is cleaned up.
    assert await admin.cleanup(now=time.time_ns() + 2 * 86400 * NS) > 0
    assert await admin.status("user-1") == []
    rows = await admin.stats()
    assert {(r.endpoint, r.tier): (r.allowed, r.denied) for r in rows} == expected
    assert {r.keys for r in rows} == {0}
    async with PostgresStorage(pg_dsn, schema=pg_schema) as reopened:
        assert await reopened.stats() == rows
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        view = sql.SQL("SELECT endpoint, tier, allowed, denied FROM {}.stats ORDER BY 1, 2")
        cur = await conn.execute(view.format(sql.Identifier(pg_schema)))
        assert [((e, t), (a, d)) for e, t, a, d in await cur.fetchall()] == sorted(expected.items())


async def test_retention_deletes_old_minutes_at_cleanup(pg_dsn: str, pg_schema: str) -> None:
    now = time.time_ns()
    old, recent = now - 3 * 3600 * NS, now - 10 * MINUTE
    async with PostgresStorage(
        pg_dsn, schema=pg_schema, stats_retention=timedelta(hours=1)
    ) as storage:
        await storage.migrate()
        assert storage.stats_retention == 3600.0
        for at in (old, old, recent):
            await storage.decide("gcra", [Hit("k", Quota(9, 60.0), 1, "/e")], now=at)
        before = await storage.stats_series()
        assert [p.allowed for p in before] == [2, 1]
        await storage.cleanup()
        after = await storage.stats_series()
        assert [(p.minute, p.allowed) for p in after] == [(before[1].minute, 1)]
        # since counts back from the database clock, or from the now given
        assert [p.allowed for p in await storage.stats(since=3600)] == [1]
        assert await storage.stats(since=60) == []
        assert [p.allowed for p in await storage.stats(since=60, now=recent)] == [1]


@pytest.mark.parametrize("retention", [timedelta(hours=1), None])
async def test_old_minutes_are_pruned_in_batches_or_kept_without_a_retention(
    pg_dsn: str, pg_schema: str, retention: timedelta | None
) -> None:
    """25 old minutes and a recent one; cleanup(batch_size=10) prunes in three statements of
    at most 10 rows (each short, whatever the backlog); with no retention nothing goes."""
    async with PostgresStorage(pg_dsn, schema=pg_schema, stats_retention=retention) as storage:
        await storage.migrate()
        async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
            insert = sql.SQL(
                "INSERT INTO {}.rollups (minute, endpoint, tier, allowed, denied) "
                "SELECT date_trunc('minute', now()) - make_interval(mins => m), '/e', '', 1, 0 "
                "FROM unnest(%s::int[]) AS m"
            )
            minutes = [0, *range(120, 145)]  # now, and 25 minutes from two hours ago
            await conn.execute(insert.format(sql.Identifier(pg_schema)), (minutes,))
        assert await storage.cleanup(batch_size=10) == 0  # (no expired state rows)
        left = await storage.stats_series()
        assert len(left) == (1 if retention is not None else 26)
        assert storage.stats_retention == (None if retention is None else 3600.0)


async def test_the_background_flush_writes_without_a_read(pg_dsn: str, pg_schema: str) -> None:
    async with PostgresStorage(pg_dsn, schema=pg_schema, stats_flush_every=0.02) as storage:
        await storage.migrate()
        limiter = RateLimiter(storage, timeout=None)
        for _ in range(5):
            await limiter.hit("k", "3/minute", endpoint="/e")

        async def written() -> bool:
            return await table_total(pg_dsn, pg_schema) == (3, 2)

        await until(written, "the counts written by the background flush")
        snapshot = storage.stats_flush_snapshot()
        assert snapshot.flushes >= 1
        assert (snapshot.failures, snapshot.pending, snapshot.dropped) == (0, 0, 0)


async def test_a_failing_write_keeps_the_counts_and_is_logged_once(
    pg_dsn: str, pg_schema: str, admin: PostgresStorage, caplog: pytest.LogCaptureFixture
) -> None:
    """A runtime role that may not write the stats (EXECUTE on add_rollups revoked): every
    decision still works, the counts wait; once allowed again, they are all written."""
    role = f"ff_rt_{secrets.token_hex(4)}"
    await admin.grant_runtime(role, create=True)
    signature = "FUNCTION {}.add_rollups(bigint[], text[], text[], bigint[], bigint[])"
    function = sql.SQL(signature).format(sql.Identifier(pg_schema))
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as owner:
        await owner.execute(
            sql.SQL("REVOKE EXECUTE ON {} FROM {}").format(function, sql.Identifier(role))
        )
        runtime_dsn = psycopg.conninfo.make_conninfo(pg_dsn, user=role)
        caplog.set_level(logging.DEBUG, logger="fineflow.storage")
        try:
            async with PostgresStorage(
                runtime_dsn, schema=pg_schema, stats_flush_every=0.02
            ) as runtime:
                limiter = RateLimiter(runtime, timeout=None)
                allowed = [(await limiter.hit("k", "2/minute", endpoint="/e")).allowed]
                await until(lambda: runtime.stats_flush_snapshot().failures >= 3, "3 failures")
                allowed += [(await limiter.hit("k", "2/minute", endpoint="/e")).allowed]
                allowed += [(await limiter.hit("k", "2/minute", endpoint="/e")).allowed]
                assert allowed == [True, True, False]
                assert runtime.stats_flush_snapshot().pending >= 1
                await owner.execute(
                    sql.SQL("GRANT EXECUTE ON {} TO {}").format(function, sql.Identifier(role))
                )
                await until(lambda: runtime.stats_flush_snapshot().pending == 0, "written")
                assert runtime.stats_flush_snapshot().dropped == 0
        finally:
            await owner.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            await owner.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    assert await table_total(pg_dsn, pg_schema) == (2, 1)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage().split(":")[0] for r in warnings] == [
        f"writing the stats of {pg_schema!r} failed"
    ]
    assert "permission denied" in warnings[0].getMessage()
    assert any("are written again" in r.getMessage() for r in caplog.records)


async def test_instances_writing_the_same_minutes_at_once_add_up(
    pg_dsn: str, pg_schema: str, admin: PostgresStorage
) -> None:
    """Writes of the same cells from several instances at once neither deadlock nor lose
    counts (add_rollups takes rows in key order)."""
    at = time.time_ns()
    instances = [PostgresStorage(pg_dsn, schema=pg_schema) for _ in range(3)]
    for storage in instances:
        await storage.open()
    try:
        for round_ in range(3):
            for n, storage in enumerate(instances):
                endpoints = [f"/e{i}" for i in range(40)][:: 1 if n % 2 else -1]
                hits = [[Hit(f"u{round_}", Quota(99, 60.0), 1, e, "t")] for e in endpoints]
                await asyncio.gather(*(storage.decide("gcra", h, now=at) for h in hits))
            await asyncio.gather(*(s.stats() for s in instances))
    finally:
        for storage in instances:
            await storage.close()
    rows = await admin.stats()
    assert len(rows) == 40
    assert {(r.allowed, r.denied) for r in rows} == {(9, 0)}


async def test_a_schema_of_version_1_is_upgraded_with_its_state(
    pg_dsn: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rollups come as an additive migration: a schema made by the code before them keeps
    its state, and its stats view now counts requests."""
    with monkeypatch.context() as old_code:
        old_code.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:1])
        old_code.setattr(migrations, "LATEST_VERSION", 1)
        async with PostgresStorage(pg_dsn, schema=pg_schema, stats_flush_every=None) as old:
            assert (await old.apply_migrations()).after == 1
            await old.decide("gcra", [Hit("k", Quota(1, 3600.0), 1, "/e")])
    async with PostgresStorage(pg_dsn, schema=pg_schema) as new:
        result = await new.apply_migrations()
        assert (result.before, result.after) == (1, migrations.LATEST_VERSION)
        assert await new.stats() == []  # the old code's requests were never counted
        assert not (await new.decide("gcra", [Hit("k", Quota(1, 3600.0), 1, "/e")]))[0].allowed
        (row,) = await new.stats()
        assert (row.endpoint, row.keys, row.allowed, row.denied) == ("/e", 1, 0, 1)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("stats_retention", 30, "stats_retention must be seconds >= 60"),
        ("stats_retention", "7d", "stats_retention must be seconds >= 60"),
        ("stats_retention", timedelta(seconds=-1), "timedelta"),
        ("stats_flush_every", 0, "stats_flush_every must be seconds > 0"),
        ("stats_flush_every", float("inf"), "stats_flush_every must be seconds > 0"),
        ("stats_flush_every", True, "stats_flush_every must be seconds > 0"),
    ],
)
def test_bad_stats_options_are_configuration_errors(
    option: str, value: object, message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        PostgresStorage("host=localhost", **{option: value})  # type: ignore[arg-type]


async def test_without_counting_nothing_is_written(pg_dsn: str, pg_schema: str) -> None:
    async with PostgresStorage(pg_dsn, schema=pg_schema, stats_flush_every=None) as storage:
        await storage.migrate()
        await storage.decide("gcra", [Hit("k", Quota(1, 60.0), 1, "/e")])
        assert await storage.stats() == []
        assert storage.stats_flush_snapshot().pending == 0
