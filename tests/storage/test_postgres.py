"""PostgresStorage on a real server: concurrency, processes, migrations, durability options."""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import re
import secrets
from collections.abc import AsyncIterator, Iterator, Sequence
from decimal import Decimal
from importlib import resources
from importlib.resources.abc import Traversable

import psycopg
import pytest
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from fineflow import (
    ConfigurationError,
    Decision,
    Hit,
    PostgresStorage,
    Quota,
    RateLimiter,
    SchemaVersionError,
    StorageClosedError,
    StorageError,
)
from fineflow._storage.coalescing import DeadlinesSnapshot, SchedulerSnapshot
from fineflow._storage.postgres import sqlfiles
from fineflow._storage.postgres.migrations import LATEST_VERSION, MIGRATIONS
from fineflow._storage.postgres.sqlfiles import BREAKER_FUNCTIONS, FUNCTIONS

pytestmark = pytest.mark.anyio


def idle(storage: PostgresStorage) -> bool:
    """Whether the storage's scheduler holds nothing: no statement, task or deadline."""
    return storage._scheduler.snapshot() == SchedulerSnapshot(0, 0, 0, 0, NO_DEADLINES)


NO_DEADLINES = DeadlinesSnapshot(0, 0, 0)


@pytest.fixture
async def storage(pg_dsn: str, pg_schema: str) -> AsyncIterator[PostgresStorage]:
    async with PostgresStorage(pg_dsn, schema=pg_schema) as pg:
        await pg.migrate()
        yield pg


async def test_500_concurrent_decisions_on_one_key_admit_exactly_100(
    storage: PostgresStorage,
) -> None:
    limiter = RateLimiter(storage, timeout=None)
    quota = Quota.parse("100/hour")
    results = await asyncio.gather(*(limiter.hit("hot", quota) for _ in range(500)))
    assert sum(d.allowed for d in results) == 100
    assert storage.batches > 0  # arrivals were coalesced into batches
    remaining = [d.remaining for d in results if d.allowed]
    assert min(remaining) == 0  # the last admitted request took the last slot
    assert max(remaining) == 99
    assert all(d.retry_after for d in results if not d.allowed)


async def test_distinct_keys_never_interfere(storage: PostgresStorage) -> None:
    limiter = RateLimiter(storage, timeout=None)
    quota = Quota(3, 3600.0)
    results = await asyncio.gather(*(limiter.hit(f"user-{i % 50}", quota) for i in range(250)))
    per_user: dict[int, int] = {}
    for i, decision in enumerate(results):
        per_user[i % 50] = per_user.get(i % 50, 0) + decision.allowed
    assert set(per_user.values()) == {3}


def _worker(dsn: str, schema: str, n: int) -> int:
    async def main() -> int:
        async with PostgresStorage(dsn, schema=schema, max_size=4) as pg:
            limiter = RateLimiter(pg, timeout=None)
            quota = Quota.parse("100/hour")
            out = await asyncio.gather(*(limiter.hit("shared", quota) for _ in range(n)))
            return sum(d.allowed for d in out)

    return asyncio.run(main())


async def test_four_processes_with_their_own_pools_admit_exactly_100(
    storage: PostgresStorage, pg_dsn: str
) -> None:
    ctx = multiprocessing.get_context("spawn")
    loop = asyncio.get_running_loop()
    with ctx.Pool(4) as pool:
        admitted = await loop.run_in_executor(
            None, lambda: pool.starmap(_worker, [(pg_dsn, storage.schema, 125)] * 4)
        )
    assert sum(admitted) == 100


async def test_concurrent_migrations_are_safe(pg_dsn: str, pg_schema: str) -> None:
    storages = [PostgresStorage(pg_dsn, schema=pg_schema) for _ in range(4)]
    for s in storages:
        await s.open()
    try:
        await asyncio.gather(*(s.migrate() for s in storages))
        await storages[0].migrate()
        async with storages[0].pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT count(*), count(DISTINCT version) FROM {pg_schema}.schema_migrations"
            )
            assert await cur.fetchone() == (LATEST_VERSION, LATEST_VERSION)  # each applied once
            cur = await conn.execute(f"SELECT version FROM {pg_schema}.schema_version")
            # The compatibility level, one row per level reached: every version so far is
            # additive after v1, so code that knows only v1 still accepts this schema.
            assert await cur.fetchall() == [(1,)]
    finally:
        for s in storages:
            await s.close()


async def test_older_code_accepts_a_schema_with_additive_migrations_only(
    storage: PostgresStorage,
) -> None:
    """A rolling deploy or a rollback: code that knows fewer versions than were applied runs
    on the schema as long as its compatibility level is one it knows."""
    schema = storage.schema
    async with storage.pool.connection() as conn:
        await conn.execute(
            f"INSERT INTO {schema}.schema_migrations (version) VALUES ({LATEST_VERSION + 1})"
        )
    await storage.migrate()  # does not raise, changes nothing
    hits = [Hit("old", Quota(2, 60.0), 1, "e")]
    results = await asyncio.gather(*(storage.decide("gcra", hits) for _ in range(3)))
    assert sorted(r[0].allowed for r in results) == [False, True, True]


async def test_refuses_a_newer_schema(storage: PostgresStorage) -> None:
    async with storage.pool.connection() as conn:
        await conn.execute(f"INSERT INTO {storage.schema}.schema_version (version) VALUES (99)")
    with pytest.raises(SchemaVersionError, match="99"):
        await storage.migrate()


async def test_unlogged_option_creates_an_unlogged_table(pg_dsn: str, pg_schema: str) -> None:
    for unlogged, expected in ((True, "u"), (False, "p")):
        schema = f"{pg_schema}_{expected}"
        async with PostgresStorage(pg_dsn, schema=schema, unlogged=unlogged) as pg:
            await pg.migrate()
            async with pg.pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT relpersistence FROM pg_class c JOIN pg_namespace n "
                    "ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = 'buckets'",
                    (schema,),
                )
                assert await cur.fetchone() == (expected,)


async def test_synchronous_commit_off_applies_to_its_connections(
    pg_dsn: str, pg_schema: str
) -> None:
    async with PostgresStorage(pg_dsn, schema=pg_schema, synchronous_commit=False) as pg:
        await pg.migrate()
        async with pg.pool.connection() as conn:
            cur = await conn.execute("SHOW synchronous_commit")
            assert await cur.fetchone() == ("off",)
        decision = await pg.decide("gcra", [Hit("k", Quota(1, 1.0))])
        assert decision[0].allowed


async def test_long_keys_are_stored_hashed(storage: PostgresStorage) -> None:
    await storage.decide("gcra", [Hit("k" * 100_000, Quota(1, 60.0), 1, "e" * 5000)])
    async with storage.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT max(octet_length(key)), max(octet_length(endpoint)) "
            f"FROM {storage.schema}.buckets"
        )
        assert await cur.fetchone() == (71, 71)


async def test_decisions_use_the_database_clock(storage: PostgresStorage) -> None:
    quota = Quota(1, 3600.0)
    first = await storage.decide("gcra", [Hit("clock", quota)])
    assert first[0].allowed
    second = await storage.decide("gcra", [Hit("clock", quota)])
    assert not second[0].allowed
    assert second[0].retry_after is not None
    assert 3590 < second[0].retry_after <= 3600


async def test_cleanup_deletes_only_expired_rows_in_batches(storage: PostgresStorage) -> None:
    quota = Quota(10, 1.0)
    now = 1_700_000_000 * 10**9
    for i in range(25):
        await storage.decide("gcra", [Hit(f"old-{i}", quota)], now=now)
    await storage.decide("gcra", [Hit("live", Quota(10, 3600.0))], now=now)
    assert await storage.cleanup(batch_size=7, now=now + 5 * 10**9) == 25
    assert [s.key for s in await storage.status("live", now=now)] == ["live"]


def test_configuration_errors_say_the_fix() -> None:
    with pytest.raises(ConfigurationError, match="identifier"):
        PostgresStorage("", schema="bad-name; DROP")
    with pytest.raises(ConfigurationError, match="DSN"):
        PostgresStorage("host=x port")
    with pytest.raises(ConfigurationError, match="not both"):
        PostgresStorage("", pool=object())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="max_size"):
        PostgresStorage("", max_size=0)


async def test_use_before_open_and_after_close_is_refused(pg_dsn: str) -> None:
    pg = PostgresStorage(pg_dsn, schema=f"ff_{secrets.token_hex(4)}")
    with pytest.raises(StorageClosedError, match="async with"):
        await pg.migrate()
    await pg.open()
    await pg.close()
    with pytest.raises(StorageClosedError):
        await pg.open()


async def test_a_user_owned_pool_is_left_open(pg_dsn: str, pg_schema: str) -> None:
    from psycopg_pool import AsyncConnectionPool

    async with AsyncConnectionPool(pg_dsn, kwargs={"autocommit": True}, open=False) as pool:
        async with PostgresStorage(pool=pool, schema=pg_schema) as pg:
            await pg.migrate()
            assert (await pg.decide("gcra", [Hit("p", Quota(1, 1.0))]))[0].allowed
        assert not pool.closed
        async with pool.connection() as conn:
            assert await (await conn.execute("SELECT 1")).fetchone() == (1,)


async def test_a_statement_task_cancelled_before_it_ran_does_not_jam_the_storage(
    storage: PostgresStorage,
) -> None:
    """Say a shutdown hook cancels every task: the storage's own statement task may be
    cancelled before its first step. Its slot is given back and the request still goes out."""
    hits = [Hit("jam", Quota(10, 60.0), 1, "e")]
    before = asyncio.all_tasks()
    caller = asyncio.create_task(storage.decide("gcra", hits))
    await asyncio.sleep(0)  # the caller queued its request and started a statement task
    owned = asyncio.all_tasks() - before - {caller}
    assert owned
    for task in owned:
        task.cancel()
    (first,) = await asyncio.wait_for(caller, 10)
    assert first.allowed
    later = await asyncio.wait_for(
        asyncio.gather(*(storage.decide("gcra", hits) for _ in range(5))), 10
    )
    assert sorted(d[0].remaining for d in later) == [4, 5, 6, 7, 8]
    assert idle(storage)


async def test_a_request_past_its_timeout_while_waiting_for_a_connection_is_not_charged(
    pg_dsn: str, pg_schema: str
) -> None:
    async with PostgresStorage(pg_dsn, schema=pg_schema, max_size=1) as storage:
        await storage.migrate()
        hits = [Hit("wait", Quota(10, 60.0), 1, "e")]
        async with storage.pool.connection():  # the pool's only connection is taken
            short = asyncio.create_task(storage.decide("gcra", hits, timeout=0.05))
            long = asyncio.create_task(storage.decide("gcra", hits, timeout=0.5))
            done, _ = await asyncio.wait({short, long}, return_when=asyncio.FIRST_COMPLETED)
            assert done == {short}  # each request keeps its own budget
            with pytest.raises(TimeoutError):
                short.result()
            with pytest.raises(TimeoutError):
                await long
        # Neither was charged: both timed out before their statement could go out.
        (after,) = await storage.decide("gcra", hits, timeout=5.0)
        assert after.remaining == 9


async def test_answers_within_the_timeout_leave_no_timer_behind(storage: PostgresStorage) -> None:
    limiter = RateLimiter(storage, timeout=0.2)
    quota = Quota(1000, 86400.0)
    results = await asyncio.gather(*(limiter.hit(f"t{i % 20}", quota) for i in range(200)))
    assert all(d.allowed and d.reason is None for d in results)
    assert limiter.metrics().storage_timeouts == 0
    await asyncio.sleep(0.3)  # past every deadline: the queue's timer drained it and stopped
    assert storage._scheduler.snapshot().deadlines == NO_DEADLINES
    # A peek (charges nothing) takes the same budget.
    (peek,) = await storage.decide("gcra", [Hit("t0", quota, 0)], timeout=0.2)
    assert peek.remaining == 990


async def test_a_subclass_overriding_decide_gets_the_limiter_budget(
    storage: PostgresStorage,
) -> None:
    # The Storage protocol hands the time budget to decide(): an override that waits on
    # something of its own keeps it (here with asyncio.timeout), and the limiter applies
    # on_storage_error when it runs out.
    budgets: list[float | None] = []

    class Delayed(PostgresStorage):
        async def decide(
            self,
            algorithm: str,
            hits: Sequence[Hit],
            *,
            now: int | None = None,
            timeout: float | None = None,  # noqa: ASYNC109 - the protocol's budget
        ) -> list[Decision]:
            budgets.append(timeout)
            async with asyncio.timeout(timeout):
                await asyncio.sleep(10)
            return await super().decide(algorithm, hits, now=now, timeout=timeout)

    async with Delayed(storage.dsn, schema=storage.schema) as slow:
        limiter = RateLimiter(slow, timeout=0.05)
        decision = await asyncio.wait_for(limiter.hit("sub", Quota(5, 60.0)), 5)
        assert decision.reason == "storage unavailable"
        assert limiter.metrics().storage_timeouts == 1
        assert budgets == [0.05]


async def _lock_row(conn: psycopg.AsyncConnection[object], schema: str, key: str, ep: str) -> None:
    await conn.execute(
        sql.SQL("SELECT 1 FROM {}.buckets WHERE key = %s AND endpoint = %s FOR UPDATE").format(
            sql.Identifier(schema)
        ),
        (key, ep),
    )


async def test_close_keeps_the_time_budget_of_callers_already_waiting(
    pg_dsn: str, pg_schema: str
) -> None:
    quota = Quota(100, 60.0)
    storage = PostgresStorage(pg_dsn, schema=pg_schema, statement_timeout=30.0)
    await storage.open()
    await storage.migrate()
    limiter = RateLimiter(storage, timeout=0.2)
    await limiter.hit("k", quota)
    async with await psycopg.AsyncConnection.connect(pg_dsn) as holder:
        await _lock_row(holder, pg_schema, "k", "")  # the next decision on "k" blocks
        call = asyncio.create_task(limiter.hit("k", quota))
        await asyncio.sleep(0.05)
        closing = asyncio.create_task(storage.close())
        # Within its budget, not when close() gives up on the statement (30 s).
        decision = await asyncio.wait_for(call, 10)
        await holder.rollback()
        await closing
    assert decision.reason == "storage unavailable"
    assert limiter.metrics().storage_timeouts == 1


async def test_deadline_queues_hold_neither_answered_requests_nor_spent_timeouts(
    storage: PostgresStorage,
) -> None:
    quota = Quota(10**6, 60.0)
    for i in range(200):  # a caller passing its remaining budget: a new timeout each time
        await storage.decide("gcra", [Hit(f"k{i % 10}", quota)], timeout=0.3 - i / 10_000)
    await asyncio.sleep(0.35)
    assert storage._scheduler.snapshot().deadlines == NO_DEADLINES
    limiter = RateLimiter(storage, timeout=math.inf)  # accepted: never due, never queued
    for i in range(100):
        assert (await limiter.hit(f"k{i % 10}", quota)).allowed
    held = storage._scheduler.snapshot().deadlines.waiting
    assert held == 0
    budget = RateLimiter(storage, timeout=60.0)
    for i in range(100):
        assert (await budget.hit(f"k{i % 10}", quota)).allowed
    held = storage._scheduler.snapshot().deadlines.waiting
    assert held <= 1  # answered requests leave the queue as the next one arrives


async def test_a_decide_wrapped_on_the_instance_is_called_with_the_budget(
    storage: PostgresStorage,
) -> None:
    inner = storage.decide
    calls: list[tuple[int, float | None]] = []

    async def spy(
        algorithm: str,
        hits: Sequence[Hit],
        *,
        now: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the protocol's budget
    ) -> list[Decision]:
        calls.append((len(hits), timeout))
        return await inner(algorithm, hits, now=now, timeout=timeout)

    storage.decide = spy  # type: ignore[method-assign]
    decision = await RateLimiter(storage).hit("k", Quota(10, 60.0))
    assert decision.allowed and decision.reason is None
    assert calls == [(1, 0.05)]


async def test_bad_timeouts_are_refused_before_anything_is_charged(
    storage: PostgresStorage,
) -> None:
    quota = Quota(10, 60.0)
    for bad in (0, -1.0, math.nan, True, "0.5", Decimal("0.5")):
        with pytest.raises(ValueError, match="timeout"):
            await storage.decide("gcra", [Hit("k", quota)], timeout=bad)  # type: ignore[arg-type]
    (peek,) = await storage.decide("gcra", [Hit("k", quota, 0)])
    assert peek.remaining == 10
    assert storage._scheduler.snapshot().deadlines == NO_DEADLINES
    (ok,) = await storage.decide("gcra", [Hit("k", quota)], timeout=1)  # an int is seconds
    assert ok.remaining == 9


async def test_the_connection_hand_off_does_not_starve_a_batch_waiting_for_a_connection(
    pg_dsn: str, pg_schema: str
) -> None:
    """With a pool smaller than max_in_flight, a task running batch after batch on its
    connection must give it back when another batch already waits for one."""
    quota = Quota(10**6, 60.0)
    async with (
        AsyncConnectionPool(
            pg_dsn, min_size=1, max_size=1, kwargs={"autocommit": True}, open=False
        ) as pool,
        PostgresStorage(pool=pool, schema=pg_schema, max_in_flight=2) as storage,
    ):
        await storage.migrate()
        waits: list[int] = []

        async def caller(i: int) -> None:
            for _ in range(40):
                before = storage.batches
                await storage.decide("gcra", [Hit(f"u{i}", quota, 1, "e")])
                waits.append(storage.batches - before)

        await asyncio.gather(*(caller(i) for i in range(16)))
        assert max(waits) <= 4, f"a request waited {max(waits)} batches"


@pytest.mark.parametrize("path", ["hit", "hit_many", "decide"])
async def test_every_decision_function_decides_a_row_no_earlier_than_its_last_decision(
    storage: PostgresStorage, path: str
) -> None:
    """Statement S reads the database clock, then waits for row "k" held by transaction L;
    L decides "k" at its later clock and commits; S then decides "k". The second request of
    2/hour fits at any instant S holds the row (hit_keys() is covered in
    test_postgres_batching)."""
    quota = Quota(2, 3600.0)
    schema = storage.schema
    hit_sql = sql.SQL("SELECT * FROM {}.hit(%s, %s, %s, '', 2, %s, 2, %s, %s, NULL)").format(
        sql.Identifier(schema)
    )
    storage.max_in_flight = 1
    args = ("k", "e", quota.policy, quota.period_ns)
    async with await psycopg.AsyncConnection.connect(storage.dsn or "", autocommit=True) as c:
        await c.execute(hit_sql, (*args, 0, quota.emission_interval_ns))  # the row, uncharged
    async with await psycopg.AsyncConnection.connect(storage.dsn or "") as holder:
        await _lock_row(holder, schema, "k", "e")
        requests = [[Hit("k", quota, 1, "e")]]
        if path == "hit_many":  # two endpoints in one batch: hit_many()
            requests.append([Hit("z", quota, 1, "other")])
        elif path == "decide":  # two quotas on one request: decide()
            requests[0].append(Hit("k", Quota(9, 60.0), 1, "o"))
        task = asyncio.gather(*(storage.decide("gcra", hits) for hits in requests))
        await asyncio.sleep(0.3)  # S has read its clock and waits for the row
        await holder.execute(hit_sql, (*args, 1, quota.emission_interval_ns))
        await holder.commit()
        results = await asyncio.wait_for(task, 10)
    decision = results[0][0]
    assert decision.allowed, f"denied, retry_after={decision.retry_after}"


async def test_a_failed_decision_is_reported_in_one_line(pg_dsn: str, pg_schema: str) -> None:
    """psycopg's message carries the CONTEXT, which quotes the whole statement of the
    function that failed; the StorageError (and so the limiter's log line) keeps the first
    line, the full error stays on __cause__."""
    async with PostgresStorage(pg_dsn, schema=pg_schema, statement_timeout=0.2) as storage:
        await storage.migrate()
        hits = [Hit("held", Quota(5, 60.0), 1, "e")]
        await storage.decide("gcra", hits)
        async with await psycopg.AsyncConnection.connect(pg_dsn) as holder:
            await _lock_row(holder, pg_schema, "held", "e")
            with pytest.raises(StorageError) as caught:
                await storage.decide("gcra", hits)
            await holder.rollback()
    message = str(caught.value)
    assert "statement timeout" in message and "\n" not in message
    assert "CONTEXT" in str(caught.value.__cause__)


def test_every_sql_file_is_package_data_and_in_use() -> None:
    """The files migrations and grants run are all in the package, and every ``.sql`` file
    of the package is one of them (none forgotten, none missing from the wheel's source)."""
    root = resources.files("fineflow._storage.postgres").joinpath("sql")

    def walk(folder: Traversable, prefix: str = "") -> Iterator[str]:
        for item in folder.iterdir():
            if item.is_dir():
                yield from walk(item, f"{prefix}{item.name}/")
            elif item.name.endswith(".sql"):
                yield prefix + item.name

    shipped = set(walk(root))
    used = {name for m in MIGRATIONS for name in m.files} | {"versions.sql", "grant_runtime.sql"}
    used |= {f"queries/{name}.sql" for name in sqlfiles.QUERIES}
    assert shipped == used
    assert {f"functions/{name}.sql" for name in FUNCTIONS} <= used
    for name in shipped:  # written out in full: no Python-side macros left to fill
        placeholders = set(re.findall(r"\{(\w*)\}", sqlfiles.text(name)))
        assert placeholders <= {"schema", "role", "unlogged"}, (name, placeholders)


async def test_the_functions_the_database_runs_are_the_files_text(storage: PostgresStorage) -> None:
    """A fresh schema's function bodies are, character for character, the bodies in the
    ``sql/functions/`` files (with the schema's name filled in)."""
    async with storage.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT p.proname, p.prosrc FROM pg_proc p "
            "JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = %s",
            (storage.schema,),
        )
        bodies = dict(await cur.fetchall())
        assert set(bodies) == {*FUNCTIONS, *BREAKER_FUNCTIONS}
        for name in (*FUNCTIONS, *BREAKER_FUNCTIONS):
            composed = sqlfiles.compose(
                f"functions/{name}.sql", schema=sql.Identifier(storage.schema)
            )
            text = composed.as_string(conn)
            _, body, _ = text.split("$fn$")
            assert bodies[name] == body, name


async def test_open_with_wait_fails_at_once_with_the_servers_reason() -> None:
    """``open(wait=True)`` connects once first: a refused connection is the error, not the
    pool's retries ending in a PoolTimeout. Without ``wait``, opening still succeeds (an
    app starts while its database is down)."""
    from fineflow.testing import free_port

    dsn = f"host=127.0.0.1 port={free_port()} connect_timeout=30"
    pg = PostgresStorage(dsn, connect_timeout=30.0)
    with pytest.raises(StorageError, match="Connection refused") as caught:
        await pg.open(wait=True)
    assert "PoolTimeout" not in str(caught.value)
    assert "\n" not in str(caught.value)
    with pytest.raises(StorageClosedError):
        pg.pool  # noqa: B018 - not opened
    await pg.open()  # the default: connections are made in the background
    await pg.close()


async def test_open_with_wait_is_connected_when_it_returns(pg_dsn: str, pg_schema: str) -> None:
    pg = PostgresStorage(pg_dsn, schema=pg_schema, min_size=2)
    await pg.open(wait=True)
    try:
        assert pg.pool.get_stats()["pool_available"] == 2
    finally:
        await pg.close()
    async with AsyncConnectionPool(pg_dsn, kwargs={"autocommit": True}, open=False) as pool:
        owned = PostgresStorage(pool=pool, schema=pg_schema)
        await owned.open(wait=True)
        await owned.close()
        assert not pool.closed


async def test_apply_migrations_says_what_it_did(pg_dsn: str, pg_schema: str) -> None:
    async with PostgresStorage(pg_dsn, schema=pg_schema) as pg:
        created = await pg.apply_migrations()
        assert (created.before, created.after, created.action) == (0, LATEST_VERSION, "created")
        again = await pg.apply_migrations()
        assert (again.before, again.after, again.action) == (
            LATEST_VERSION,
            LATEST_VERSION,
            "up to date",
        )
        await pg.migrate()  # the Storage protocol's form: the same, saying nothing


async def test_a_missing_schema_says_to_migrate(pg_dsn: str, pg_schema: str) -> None:
    async with PostgresStorage(pg_dsn, schema=pg_schema) as pg:
        for call in (
            pg.status("k"),
            pg.reset("k"),
            pg.cleanup(),
            pg.stats(),
            pg.decide("gcra", [Hit("k", Quota(1, 1.0))]),
        ):
            with pytest.raises(StorageError, match="run `fineflow migrate`") as caught:
                await call
            assert pg_schema in str(caught.value)
            assert "type casts" not in str(caught.value)
