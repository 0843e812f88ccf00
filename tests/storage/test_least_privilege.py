"""A runtime role may decide through fineflow's functions but never touch the table."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from fineflow import (
    CircuitBreaker,
    CircuitState,
    ConfigurationError,
    Hit,
    PostgresStorage,
    Quota,
    RateLimiter,
    StorageError,
)
from fineflow._breaker.shared import SharedPolicy, Tally
from fineflow.cli import main
from shared_breaker_helpers import in_state, opened, postgres_instances

pytestmark = pytest.mark.anyio


@pytest.fixture
def runtime_role(pg_dsn: str) -> Iterator[str]:
    role = f"ff_rt_{secrets.token_hex(4)}"
    yield role
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(role)))
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


async def test_runtime_role_decides_but_cannot_read_or_change_rows(
    pg_dsn: str, pg_schema: str, runtime_role: str
) -> None:
    async with PostgresStorage(pg_dsn, schema=pg_schema) as admin:
        await admin.migrate()
        await admin.grant_runtime(runtime_role, create=True)
        await admin.decide("gcra", [Hit("other-user", Quota(5, 60.0))])

    runtime_dsn = psycopg.conninfo.make_conninfo(pg_dsn, user=runtime_role)
    async with PostgresStorage(runtime_dsn, schema=pg_schema) as runtime:
        limiter = RateLimiter(runtime, timeout=None)
        assert (await limiter.hit("me", "2/minute")).allowed
        both = await limiter.hit_all("me", ["2/minute", "10/hour"])  # the batch function
        assert both.allowed
        assert not (await limiter.hit("me", "2/minute")).allowed
        assert (await limiter.peek("me", "10/hour")).remaining == 9
        burst = await asyncio.gather(*(limiter.hit("many", "5/minute") for _ in range(20)))
        assert sum(d.allowed for d in burst) == 5  # coalesced: hit_keys()
        assert [s.key for s in await runtime.status("me")] == ["me", "me"]
        with pytest.raises(StorageError):
            await runtime.reset("other-user")
        with pytest.raises(StorageError):
            await runtime.cleanup()
        with pytest.raises(StorageError):
            await runtime.migrate()
        with pytest.raises(StorageError):
            await runtime.stats()  # (it writes its counts first: that it may do)

    async with PostgresStorage(pg_dsn, schema=pg_schema) as admin:
        # The runtime instance's requests were written through add_rollups(), at close.
        rows = await admin.stats(by=())
        assert (rows[0].allowed, rows[0].denied) == (1 + 1 + 5 + 1, 1 + 15)

    with psycopg.connect(runtime_dsn, autocommit=True) as conn:
        table = sql.SQL("{}.buckets").format(sql.Identifier(pg_schema))
        for statement in (
            sql.SQL("SELECT * FROM {}").format(table),
            sql.SQL("UPDATE {} SET count = 0").format(table),
            sql.SQL("DELETE FROM {}").format(table),
            sql.SQL("SELECT * FROM {}.stats").format(sql.Identifier(pg_schema)),
            sql.SQL("SELECT * FROM {}.rollups").format(sql.Identifier(pg_schema)),
            sql.SQL("DELETE FROM {}.rollups").format(sql.Identifier(pg_schema)),
            sql.SQL("SELECT {}.prune_rollups(0)").format(sql.Identifier(pg_schema)),
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)


async def test_functions_pin_search_path_and_definer_only_where_needed(
    pg_dsn: str, pg_schema: str
) -> None:
    async with PostgresStorage(pg_dsn, schema=pg_schema) as admin:
        await admin.migrate()
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute(
            "SELECT p.proname, p.prosecdef, p.proconfig FROM pg_proc p "
            "JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = %s",
            (pg_schema,),
        ).fetchall()
    names = {name for name, _, _ in rows}
    assert names == {
        "decide",
        "hit",
        "hit_many",
        "hit_keys",
        "peek",
        "status",
        "reset",
        "cleanup",
        "add_rollups",
        "prune_rollups",
        *("breaker_notify", "breaker_state", "breaker_step", "breaker_count"),
    }
    for _, definer, config in rows:
        assert definer
        assert config == ["search_path=pg_catalog, pg_temp"]


def test_cli_creates_the_runtime_role(pg_dsn: str, pg_schema: str, runtime_role: str) -> None:
    code = main(["migrate", "--dsn", pg_dsn, "--schema", pg_schema, "--runtime-role", runtime_role])
    assert code == 0
    runtime_dsn = psycopg.conninfo.make_conninfo(pg_dsn, user=runtime_role)
    with psycopg.connect(runtime_dsn) as conn:
        row = conn.execute(
            sql.SQL(
                "SELECT ok FROM {}.hit('k', '', 'p', '', 1, 1000000000, 1, 1, 1000000000, NULL)"
            ).format(sql.Identifier(pg_schema))
        ).fetchone()
    assert row == (True,)


async def test_bad_role_name_is_a_configuration_error(pg_dsn: str, pg_schema: str) -> None:
    async with PostgresStorage(pg_dsn, schema=pg_schema) as admin:
        with pytest.raises(ConfigurationError, match="identifier"):
            await admin.grant_runtime("evil; DROP ROLE x")


async def test_a_runtime_role_shares_breakers_through_the_functions_only(
    pg_dsn: str, pg_schema: str, runtime_role: str
) -> None:
    async with PostgresStorage(pg_dsn, schema=pg_schema) as admin:
        await admin.migrate()
        await admin.grant_runtime(runtime_role, create=True)
    runtime_dsn = psycopg.conninfo.make_conninfo(pg_dsn, user=runtime_role)
    async with opened(postgres_instances(runtime_dsn, pg_schema), 2, migrate=False) as (
        one,
        two,
    ):
        a = CircuitBreaker("api", failure_threshold=1, reset_timeout=30.0, shared=one)
        b = CircuitBreaker("api", failure_threshold=1, reset_timeout=30.0, shared=two)
        assert await a.sync() and await b.sync()
        permit = a.try_acquire()
        assert permit is not None
        permit.failure()
        await in_state(b, CircuitState.OPEN, "the open NOTIFYed to the runtime role's LISTEN")
    with psycopg.connect(runtime_dsn, autocommit=True) as conn:
        table = sql.SQL("{}.breakers").format(sql.Identifier(pg_schema))
        for statement in (
            sql.SQL("SELECT * FROM {}").format(table),
            sql.SQL("UPDATE {} SET state = 'closed'").format(table),
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)


async def test_a_runtime_role_counts_breaker_failures_through_the_function_only(
    pg_dsn: str, pg_schema: str, runtime_role: str
) -> None:
    async with PostgresStorage(pg_dsn, schema=pg_schema) as admin:
        await admin.migrate()
        await admin.grant_runtime(runtime_role, create=True)
    runtime_dsn = psycopg.conninfo.make_conninfo(pg_dsn, user=runtime_role)
    policy = SharedPolicy(30.0, 2.0, 240.0, 1, 1, 60.0, failure_threshold=3)
    async with PostgresStorage(runtime_dsn, schema=pg_schema) as runtime:
        store = runtime.breaker_store()
        two = Tally(failures=2, trailing=2)
        assert (await store.count("api", two, policy, generation=0)).failures == 2
        tripped = await store.count("api", two, policy, generation=0)
        assert (tripped.state, tripped.generation) == (CircuitState.OPEN, 1)
    with psycopg.connect(runtime_dsn, autocommit=True) as conn:
        table = sql.SQL("{}.breakers").format(sql.Identifier(pg_schema))
        for statement in (
            sql.SQL("SELECT streak, calls FROM {}").format(table),
            sql.SQL("UPDATE {} SET streak = 0, counted = -1").format(table),
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
