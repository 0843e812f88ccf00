"""Shared breaker state in PostgreSQL: the SQL held to the reference rules,
another OS process adopting an open, and the database going away and coming back (on a
throwaway cluster this module owns, never the machine's own server)."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator

import anyio
import anyio.to_thread
import psycopg
import psycopg_pool.base
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fineflow import CircuitBreaker, CircuitState, PostgresStorage
from fineflow._breaker.shared import Action, SharedPolicy, SharedRow, breaker_channel, step_row
from fineflow.testing import ThrowawayCluster, find_postgres_bindir
from shared_breaker_helpers import (
    an_open_reaches_a_child,
    in_state,
    the_store_going_away_and_coming_back,
)

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

OPEN, CLOSED = CircuitState.OPEN, CircuitState.CLOSED


ACTIONS = st.sampled_from(list(Action))


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    steps=st.lists(st.tuples(ACTIONS, st.integers(0, 3), st.booleans()), min_size=1, max_size=12),
    reset=st.sampled_from([0.0, 1000.0]),
    max_calls=st.integers(1, 3),
)
def test_breaker_step_follows_the_reference(
    pg_dsn: str, steps: list[tuple[Action, int, bool]], reset: float, max_calls: int
) -> None:
    """The SQL against ``step_row``: the reference at a constant ``now`` (a reset timeout of
    0 or 1000 s is due or not whatever the milliseconds the statements take)."""
    policy = SharedPolicy(reset, 2.0, max(reset, 1.0) * 8, max_calls, max_calls, 1e6)
    name = secrets.token_hex(6)
    row = SharedRow()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for action, want, stale in steps:
            generation = row.generation - 1 if stale else row.generation
            row, granted = step_row(row, action, 0.0, policy, generation=generation, want=want)
            got = conn.execute(
                "SELECT * FROM ff_reference.breaker_step("
                "%s, %s, %s, %s, %s, %s, %s, 1.0, %s, %s, %s)",
                (
                    name,
                    action.value,
                    generation,
                    want,
                    reset * 1000,
                    2.0,
                    policy.max_reset_timeout * 1000,
                    max_calls,
                    max_calls,
                    1e9,
                ),
            ).fetchone()
            assert got is not None
            assert (got[0], got[1], got[3]) == (row.state.value, row.generation, granted)
            expected_ms = row.open_until * 1000 if row.state is OPEN else 0.0
            assert abs(got[2] - expected_ms) < 1000.0


@pytest.fixture(scope="module", autouse=True)
def reference_schema(pg_dsn: str) -> Iterator[None]:
    """The schema the differential test steps rows in (Hypothesis runs many examples in one
    test function, so it is made once)."""

    async def migrate() -> None:
        async with PostgresStorage(pg_dsn, schema="ff_reference") as storage:
            await storage.migrate()

    anyio.run(migrate)
    yield
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("DROP SCHEMA ff_reference CASCADE")


async def test_an_open_reaches_another_process(pg_dsn: str, pg_schema: str) -> None:
    async with PostgresStorage(pg_dsn, schema=pg_schema) as storage:
        await storage.migrate()
        await an_open_reaches_a_child(storage, ["postgres", pg_dsn, pg_schema])


@pytest.fixture(scope="module")
def cluster() -> Iterator[ThrowawayCluster]:
    if find_postgres_bindir() is None:
        pytest.fail("fault tests need PostgreSQL server binaries (initdb, pg_ctl) on this machine")
    with ThrowawayCluster.create() as c:
        yield c


@pytest.mark.slow
async def test_the_database_going_away_and_coming_back(
    cluster: ThrowawayCluster, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(psycopg_pool.base.AttemptWithBackoff, "INITIAL_DELAY", 0.2, raising=False)
    caplog.set_level(logging.INFO, "fineflow.breaker")

    def storages() -> PostgresStorage:
        return PostgresStorage(cluster.dsn, schema="shared", connect_timeout=1.0)

    await the_store_going_away_and_coming_back(
        storages, lambda: cluster.stop("immediate"), cluster.start, caplog
    )


async def test_long_schemas_with_a_common_start_do_not_hear_each_other(pg_dsn: str) -> None:
    """Two 60-character schemas alike in their first 50: each channel names its schema by
    its MD5 (cut at PostgreSQL's 63 bytes they would be one channel), and an open in one
    reaches only the breakers of that schema."""
    common = "ff_" + secrets.token_hex(24)[:47]
    one, two = common + "a" * 10, common + "b" * 10
    assert len(one) == 60 and breaker_channel(one) != breaker_channel(two)
    assert len(breaker_channel(one).encode()) <= 63
    storages = [PostgresStorage(pg_dsn, schema=s) for s in (one, one, two)]
    try:
        for storage in storages:
            await storage.open()
            await storage.migrate()
        a, b, c = (
            CircuitBreaker("svc", failure_threshold=1, reset_timeout=30.0, shared=s)
            for s in storages
        )
        assert all([await x.sync() for x in (a, b, c)])
        permit = a.try_acquire()
        assert permit is not None
        permit.failure()
        await in_state(b, CircuitState.OPEN)  # the same schema: heard
        await anyio.sleep(0.3)
        assert c.state is CircuitState.CLOSED  # the other schema: not
        for x in (a, b, c):
            await x.aclose()
    finally:
        for storage in storages:
            await storage.close()
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            for schema in (one, two):
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
