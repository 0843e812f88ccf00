"""Background cleanup, ``PostgresStorage(cleanup_every=...)``, on a real server: expired rows
go without a cleanup call, one instance at a time does the work (seen in the database's own
lock table), ``close()`` stops it, failures are logged once per burst and never raised."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable

import psycopg
import pytest
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from fineflow import ConfigurationError, Hit, PostgresStorage, Quota
from fineflow._storage.postgres.admin import cleanup_lock
from fineflow._storage.postgres.cleaner import Cleaner, CleanerSnapshot

pytestmark = pytest.mark.anyio

PAST = 1_700_000_000 * 10**9  # a decision made at this time has long expired
SHORT = Quota(10, 1.0)
LONG = Quota(10, 3600.0)


async def eventually(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``condition`` until it holds (the background task runs on its own schedule);
    fail, saying ``what`` was awaited, if it never does."""
    for _ in range(2000):
        if await condition():
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"never happened: {what}")


def cleaner_of(storage: PostgresStorage) -> Cleaner:
    assert storage._cleaner is not None
    return storage._cleaner


async def counted(cleaner: Cleaner, **at_least: int) -> None:
    """Wait until each named counter of ``cleaner`` has reached its figure."""

    async def reached() -> bool:
        snapshot = cleaner.snapshot()
        return all(getattr(snapshot, name) >= n for name, n in at_least.items())

    await eventually(reached, f"cleanup counters {at_least}")


async def scalar(
    conn: psycopg.AsyncConnection, query: str | sql.Composed, params: tuple[object, ...]
) -> int:
    row = await (await conn.execute(query, params)).fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
async def admin(pg_dsn: str, pg_schema: str) -> AsyncIterator[psycopg.AsyncConnection]:
    """A connection of the test's own, on a migrated schema holding 20 expired rows and
    one live row."""
    async with PostgresStorage(pg_dsn, schema=pg_schema) as seeder:
        await seeder.migrate()
        for i in range(20):
            await seeder.decide("gcra", [Hit(f"old-{i}", SHORT)], now=PAST)
        await seeder.decide("gcra", [Hit("live", LONG)])
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        yield conn


async def rows(conn: psycopg.AsyncConnection, schema: str) -> int:
    query = sql.SQL("SELECT count(*) FROM {}.buckets").format(sql.Identifier(schema))
    return await scalar(conn, query, ())


async def lock_holders(conn: psycopg.AsyncConnection, schema: str) -> int:
    """Sessions holding the cleanup's advisory lock of ``schema`` (a one-bigint key: high
    half in classid, low half in objid)."""
    return await scalar(
        conn,
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
        "AND objsubid = 1 AND database = (SELECT oid FROM pg_database "
        "WHERE datname = current_database()) "
        "AND ((classid::bigint << 32) | objid::bigint) = hashtext(%s)::bigint",
        (cleanup_lock(schema),),
    )


async def waiting_on_table(conn: psycopg.AsyncConnection, schema: str) -> int:
    """Sessions waiting for a lock on ``schema``'s table."""
    return await scalar(
        conn,
        "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = %s::regclass",
        (f"{schema}.buckets",),
    )


async def test_expired_rows_disappear_without_a_cleanup_call(
    pg_dsn: str, pg_schema: str, admin: psycopg.AsyncConnection
) -> None:
    assert await rows(admin, pg_schema) == 21
    async with PostgresStorage(pg_dsn, schema=pg_schema, cleanup_every=0.1) as storage:
        cleaner = cleaner_of(storage)
        await counted(cleaner, rounds=2)
        assert await rows(admin, pg_schema) == 1  # the live row stays
        assert [s.key for s in await storage.status("live")] == ["live"]
        assert cleaner.snapshot().removed == 20


@pytest.fixture
async def locker(
    pg_dsn: str, pg_schema: str, admin: psycopg.AsyncConnection
) -> AsyncIterator[psycopg.AsyncConnection]:
    """A connection in a transaction that holds ``pg_schema``'s table locked until it
    commits (after ``admin`` has seeded it): a cleanup round that reaches the table waits
    there, holding its lock."""
    conn = await psycopg.AsyncConnection.connect(pg_dsn)
    try:
        table = sql.Identifier(pg_schema, "buckets")
        await conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(table))
        yield conn
    finally:
        await conn.close()


async def test_two_instances_never_clean_at_once(
    pg_dsn: str, pg_schema: str, admin: psycopg.AsyncConnection, locker: psycopg.AsyncConnection
) -> None:
    """The first instance to start a round waits inside it for the table, holding the
    advisory lock; the other keeps finding the lock taken and skips. The database shows
    one holder and one waiter; once the table is free, the rows go."""
    options = {"schema": pg_schema, "cleanup_every": 0.05, "statement_timeout": 120.0}
    async with (
        PostgresStorage(pg_dsn, **options) as one,  # type: ignore[arg-type]
        PostgresStorage(pg_dsn, **options) as two,  # type: ignore[arg-type]
    ):
        cleaners = [cleaner_of(one), cleaner_of(two)]

        async def one_waits_and_the_other_skips() -> bool:
            skipped = sum(c.snapshot().skipped for c in cleaners)
            return skipped >= 5 and await waiting_on_table(admin, pg_schema) == 1

        await eventually(one_waits_and_the_other_skips, "one round waiting, rounds skipped")
        assert await lock_holders(admin, pg_schema) == 1
        assert [c.snapshot().rounds for c in cleaners] == [0, 0]
        await locker.commit()  # the table is free

        # A round counts its rows when it ends, after its unlock and the stats pruning: the
        # rows are gone from the table before then, so wait for the counters, not the table.
        async def cleaned() -> bool:
            return sum(c.snapshot().removed for c in cleaners) >= 20

        await eventually(cleaned, "the expired rows deleted")
        assert sum(c.snapshot().removed for c in cleaners) == 20  # each counted once
        assert await rows(admin, pg_schema) == 1  # the live row stays
    assert await lock_holders(admin, pg_schema) == 0


async def test_close_stops_a_round_in_flight_and_releases_the_lock(
    pg_dsn: str, pg_schema: str, admin: psycopg.AsyncConnection, locker: psycopg.AsyncConnection
) -> None:
    storage = PostgresStorage(pg_dsn, schema=pg_schema, cleanup_every=0.05)
    await storage.open()

    async def round_waiting() -> bool:
        return await waiting_on_table(admin, pg_schema) == 1

    await eventually(round_waiting, "a cleanup round waiting for the table")
    assert await lock_holders(admin, pg_schema) == 1
    await storage.close()
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("fineflow-cleanup")]
    assert await lock_holders(admin, pg_schema) == 0
    assert await waiting_on_table(admin, pg_schema) == 0
    await locker.commit()
    assert await rows(admin, pg_schema) == 21  # the round was cancelled before it deleted


async def test_a_round_cancelled_while_taking_the_lock_leaves_it_free(
    pg_dsn: str, pg_schema: str, admin: psycopg.AsyncConnection
) -> None:
    """``close()`` may cancel a round while its ``pg_try_advisory_lock()`` is on the server,
    which may grant it all the same: the session that goes back to the pool must not keep
    the lock (in a pool of the app's own, left open, every instance would skip cleanup
    until that connection is recycled)."""
    async with AsyncConnectionPool(
        pg_dsn, min_size=1, max_size=1, kwargs={"autocommit": True}, open=False
    ) as pool:
        storage = PostgresStorage(pool=pool, schema=pg_schema, cleanup_every=0.01)
        # The lock granted, the answer late: a round is cancelled after the server took it.
        storage._admin._try_lock = sql.SQL(
            "SELECT pg_try_advisory_lock(hashtext(%s)), pg_sleep(60)"
        )
        await storage.open()

        async def locked() -> bool:
            return await lock_holders(admin, pg_schema) == 1

        await eventually(locked, "a round holding the lock, its answer on the way")
        await storage.close()
        assert await lock_holders(admin, pg_schema) == 0
        assert cleaner_of(storage).snapshot() == CleanerSnapshot(0, 0, 0, 0)
        async with pool.connection() as conn:  # the pool's connection, still usable
            assert await scalar(conn, "SELECT 1", ()) == 1


async def test_failures_are_logged_once_per_burst_and_never_raised(
    pg_dsn: str, pg_schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="fineflow.storage")
    async with PostgresStorage(pg_dsn, schema=pg_schema, cleanup_every=0.05) as storage:
        cleaner = cleaner_of(storage)
        await counted(cleaner, failures=3)  # the schema is not migrated
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "background cleanup" in warnings[0].getMessage()
        assert "fineflow migrate" in warnings[0].getMessage()
        await storage.migrate()  # the app goes on; the next round works
        await counted(cleaner, rounds=1)
        infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
        assert sum("works again" in m for m in infos) == 1
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


@pytest.mark.parametrize("every", [0, -1, math.nan, math.inf, True, "300"])
def test_cleanup_every_must_be_positive_seconds_or_none(every: object) -> None:
    with pytest.raises(ConfigurationError, match="cleanup_every must be seconds > 0"):
        PostgresStorage("", cleanup_every=every)  # type: ignore[arg-type]


def test_cleanup_every_is_off_by_default_and_takes_seconds() -> None:
    assert PostgresStorage("")._cleaner is None
    assert PostgresStorage("", cleanup_every=None)._cleaner is None
    assert cleaner_of(PostgresStorage("", cleanup_every=300)).every == 300.0
