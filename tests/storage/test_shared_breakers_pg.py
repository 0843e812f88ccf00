"""Shared breaker state in PostgreSQL: the SQL held to the reference rules,
another OS process adopting an open, and the database going away and coming back (on a
throwaway cluster this module owns, never the machine's own server)."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import anyio
import anyio.to_thread
import psycopg
import psycopg_pool.base
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from fineflow import CircuitBreaker, CircuitState, PostgresStorage
from fineflow._breaker.shared import (
    Action,
    SharedPolicy,
    SharedRow,
    SharedState,
    Tally,
    breaker_channel,
    count_row,
    step_row,
)
from fineflow._storage.postgres import migrations
from fineflow.testing import ThrowawayCluster, find_postgres_bindir
from shared_breaker_helpers import (
    an_open_reaches_a_child,
    eventually,
    in_state,
    opened,
    postgres_instances,
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


@dataclass(frozen=True)
class Count:
    """``breaker_count()`` of a tally, counted in the row's generation or a stale one."""

    tally: Tally
    stale: bool


@dataclass(frozen=True)
class Step:
    """``breaker_step()``, so that generations move (a stale one for a verdict)."""

    action: Action
    stale: bool


@dataclass(frozen=True)
class Age:
    """The row's time window started this many windows earlier (on both sides)."""

    windows: float


@st.composite
def tallies(draw: st.DrawFn) -> Tally:
    successes, failures = draw(st.integers(0, 4)), draw(st.integers(0, 4))
    slow = draw(st.integers(0, successes + failures))
    trailing = failures if successes == 0 else draw(st.integers(0, failures))
    return Tally(successes, failures, slow, trailing)


@st.composite
def count_policies(draw: st.DrawFn) -> SharedPolicy:
    """Count windows of 1 to 20 calls, or time windows of 1e6 s (the statements' real
    milliseconds cannot end one: the test moves their start instead, with ``Age``)."""
    reset, max_calls = draw(st.sampled_from([0.0, 1000.0])), draw(st.integers(1, 3))
    window_calls = draw(st.just(0) | st.integers(1, 20))
    return SharedPolicy(
        reset,
        2.0,
        max(reset, 1.0) * 8,
        max_calls,
        max_calls,
        1e6,
        failure_threshold=draw(st.none() | st.integers(1, 10)),
        failure_rate=draw(st.none() | st.sampled_from([0.25, 0.5, 0.75, 1.0])),
        slow_rate=draw(st.none() | st.sampled_from([0.25, 0.5, 1.0])),
        minimum_calls=draw(st.integers(1, 10)),
        window_calls=window_calls,
        window_seconds=0.0 if window_calls else 1e6,
    )


COUNT_OPS = st.one_of(
    st.builds(Count, tallies(), st.booleans()),
    *[st.builds(Count, tallies(), st.just(False))] * 2,  # (most tallies count)
    st.builds(Step, ACTIONS, st.booleans()),
    st.builds(Age, st.sampled_from([0.25, 0.5, 0.75, 1.25, 2.5])),
)


def _db_clock(conn: psycopg.Connection[Any]) -> float:
    row = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()
    assert row is not None
    return float(row[0])


def _counting(row: SharedRow) -> tuple[object, ...]:
    """What of a row the SQL must agree on exactly (the counters only while they count)."""
    counters = (
        (
            row.streak,
            row.calls,
            row.failures,
            row.slow,
            row.previous_calls,
            row.previous_failures,
            row.previous_slow,
        )
        if row.counted == row.generation
        else None
    )
    return (row.state.value, row.generation, row.step, row.granted, row.successes, counters)


def _stored(conn: psycopg.Connection[Any], name: str) -> tuple[tuple[object, ...], float]:
    """The stored row of ``name`` as ``_counting`` has it, and its window's start."""
    row = conn.execute(
        "SELECT state, generation, step, granted, successes, counted, streak, calls, "
        "failures, slow, previous_calls, previous_failures, previous_slow, window_start "
        "FROM ff_reference.breakers WHERE name = %s",
        (name,),
    ).fetchone()
    assert row is not None
    counters = tuple(row[6:13]) if row[5] == row[1] else None
    return (*row[:5], counters), float(row[13])


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    policy=count_policies(),
    ops=st.lists(COUNT_OPS, min_size=1, max_size=20),
    shorten=st.sampled_from([1.0, 0.5]),
)
def test_breaker_count_follows_the_reference(
    pg_dsn: str, policy: SharedPolicy, ops: list[Count | Step | Age], shorten: float
) -> None:
    """The SQL against ``count_row`` (and ``step_row``, which moves the generations)."""
    _against_the_reference(pg_dsn, policy, ops, shorten)


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    policy=count_policies().filter(lambda p: p.window_calls == 0),
    ops=st.lists(
        st.builds(Count, tallies(), st.just(False))
        | st.builds(Age, st.sampled_from([0.1, 0.25, 0.5, 0.75, 0.9, 1.25, 1.5])),
        min_size=1,
        max_size=20,
    ),
)
def test_breaker_count_slides_time_windows_like_the_reference(
    pg_dsn: str, policy: SharedPolicy, ops: list[Count | Step | Age]
) -> None:
    """The same, tallies only, in time windows that end and slide: the estimate's weight."""
    policy = replace(policy, failure_threshold=None)
    _against_the_reference(pg_dsn, policy, ops, 1.0)


def _against_the_reference(
    pg_dsn: str, policy: SharedPolicy, ops: list[Count | Step | Age], shorten: float
) -> None:
    """Run ``ops`` on a new row through the SQL and the reference, which runs on the
    database clock read just before each statement. Only a time window's weight depends on
    the instant within the statement; where a threshold lies in between, the reference at
    the reading after it decides too, and the SQL must agree with one of the two (a reset
    timeout of 0 or 1000 s and windows of 1e6 s leave every other rule far from the
    statements' milliseconds)."""
    name = secrets.token_hex(6)
    row = SharedRow()
    count_sql = (
        "SELECT * FROM ff_reference.breaker_count("
        "%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    )
    step_sql = "SELECT * FROM ff_reference.breaker_step(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    timeouts = (policy.reset_timeout * 1000, 2.0, policy.max_reset_timeout * 1000, shorten)
    verdicts = (policy.half_open_max_calls, policy.successes_to_close, 1e9)
    trips = (
        policy.failure_threshold,
        policy.failure_rate,
        policy.slow_rate,
        policy.minimum_calls,
        policy.window_calls,
        policy.window_seconds,
    )
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for op in ops:
            if isinstance(op, Age):
                back = op.windows * 1e6
                conn.execute(
                    "UPDATE ff_reference.breakers SET window_start = window_start - %s "
                    "WHERE name = %s",
                    (back, name),
                )
                row = replace(row, window_start=row.window_start - back)
                continue
            generation = row.generation - 1 if op.stale else row.generation
            before = _db_clock(conn)
            if isinstance(op, Step):
                got = conn.execute(
                    step_sql,
                    (name, op.action.value, generation, 1, *timeouts, *verdicts),
                ).fetchone()
                after = _db_clock(conn)
                candidates = [
                    step_row(
                        row,
                        op.action,
                        before,
                        policy,
                        generation=generation,
                        want=1,
                        shorten=shorten,
                    )
                ]
            else:
                tally = op.tally
                got = conn.execute(
                    count_sql,
                    (
                        name,
                        generation,
                        tally.successes,
                        tally.failures,
                        tally.slow,
                        tally.trailing,
                        *trips,
                        *timeouts,
                    ),
                ).fetchone()
                after = _db_clock(conn)
                candidates = [
                    (count_row(row, tally, now, policy, generation=generation, shorten=shorten), 0)
                    for now in (before, after)
                ]
            assert got is not None
            stored, window_start = _stored(conn, name)
            matching = [c for c in candidates if _counting(c[0]) == stored]
            assert matching, (op, stored, [_counting(c[0]) for c in candidates])
            row, granted = matching[0]
            seen = row.seen_at(before, granted)
            assert (got[0], got[1], got[3]) == (
                seen.state.value,
                seen.generation,
                seen.granted if isinstance(op, Step) else seen.failures,
            )
            assert abs(got[2] - seen.open_for * 1000) < 1000.0
            if row.counted == row.generation:
                # The window starts on the database clock, within the statement at the first
                # tally of a generation; from then on the two move it alike, to the bit.
                assert abs(window_start - row.window_start) <= after - before
                row = replace(row, window_start=window_start)


@pytest.fixture(scope="module", autouse=True)
def reference_schema(pg_dsn: str) -> Iterator[None]:
    """The schema the differential tests step rows in (Hypothesis runs many examples in one
    test function, so it is made once)."""

    async def migrate() -> None:
        async with PostgresStorage(pg_dsn, schema="ff_reference") as storage:
            await storage.migrate()

    anyio.run(migrate)
    yield
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("DROP SCHEMA ff_reference CASCADE")


class Heard:
    """A watcher that keeps what it hears."""

    def __init__(self) -> None:
        self.changes: list[SharedState] = []
        self.connections = 0

    def changed(self, state: SharedState) -> None:
        self.changes.append(state)

    def connected(self) -> None:
        self.connections += 1

    def disconnected(self, reason: str) -> None:
        pass


#: Five failures in a row open the row, for 30 s.
STREAK = SharedPolicy(30.0, 2.0, 240.0, 1, 1, 60.0, failure_threshold=5)


async def test_instances_count_the_failures_of_one_breaker_together(
    pg_dsn: str, pg_schema: str
) -> None:
    """Three instances count two failures each: the third tally reaches the threshold of
    five, opens the row and NOTIFYs an instance that LISTENs; a tally of the generation that
    ended changes nothing, and tells nobody."""
    async with opened(postgres_instances(pg_dsn, pg_schema), 4) as storages:
        heard = Heard()
        storages[3].breaker_store().watch("api", heard)
        await eventually(lambda: heard.connections > 0, "the LISTEN")
        two = Tally(failures=2, trailing=2)
        seen = [
            await s.breaker_store().count("api", two, STREAK, generation=0) for s in storages[:3]
        ]
        assert [(s.state, s.generation, s.failures) for s in seen] == [
            (CLOSED, 0, 2),
            (CLOSED, 0, 4),
            (OPEN, 1, 0),
        ]
        assert 29.0 < seen[2].open_for <= 30.0
        await eventually(lambda: bool(heard.changes), "the open NOTIFYed")
        ((state, generation, open_for, _, _),) = (
            (s.state, s.generation, s.open_for, s.granted, s.failures) for s in heard.changes
        )
        assert (state, generation) == (OPEN, 1) and 29.0 < open_for <= 30.0

        stale = Tally(failures=9, trailing=9)
        late = await storages[0].breaker_store().count("api", stale, STREAK, generation=0)
        assert (late.state, late.generation, late.failures) == (OPEN, 1, 0)
        read = await storages[1].breaker_store().read("api")
        assert (read.state, read.generation) == (OPEN, 1)
        await anyio.sleep(0.2)
        assert len(heard.changes) == 1


@pytest.mark.parametrize(
    ("policy", "tallies"),
    [
        pytest.param(
            STREAK,
            [Tally(0, 3, 0, 3), Tally(1, 2, 0, 1), Tally(0, 3, 0, 3), Tally(0, 1, 0, 1)],
            id="a success anywhere restarts the streak",
        ),
        pytest.param(
            replace(STREAK, failure_threshold=None, failure_rate=0.5, minimum_calls=6),
            [Tally(3, 2, 0, 0), Tally(0, 1, 0, 1)],
            id="failure rate, once the window holds minimum_calls",
        ),
        pytest.param(
            replace(
                STREAK, failure_threshold=None, failure_rate=0.9, slow_rate=0.5, minimum_calls=4
            ),
            [Tally(0, 0, 0, 0), Tally(2, 0, 1, 0), Tally(1, 1, 1, 1)],
            id="slow-call rate",
        ),
        pytest.param(
            replace(
                STREAK,
                failure_threshold=None,
                failure_rate=0.75,
                minimum_calls=4,
                window_calls=4,
                window_seconds=0.0,
            ),
            [Tally(3, 1, 0, 0), Tally(0, 2, 0, 2), Tally(0, 1, 0, 1)],
            id="a window of 4 calls slides",
        ),
    ],
)
async def test_the_store_counts_as_the_reference(
    pg_dsn: str, pg_schema: str, policy: SharedPolicy, tallies: list[Tally]
) -> None:
    """Each policy through ``PostgresBreakerStore.count``: closed until the last tally,
    which opens the row (for the shortened timeout), exactly when the reference does."""
    row = SharedRow()
    async with PostgresStorage(pg_dsn, schema=pg_schema) as storage:
        await storage.migrate()
        store = storage.breaker_store()
        for i, tally in enumerate(tallies):
            got = await store.count("api", tally, policy, generation=0, shorten=0.5)
            row = count_row(row, tally, 0.0, policy, generation=0, shorten=0.5)
            assert (got.state, got.generation, got.failures) == (
                row.state,
                row.generation,
                row.seen_at(0.0).failures,
            )
            assert got.state is (OPEN if i == len(tallies) - 1 else CLOSED)
        assert 14.0 < got.open_for <= 15.0


async def test_a_time_window_ends_on_the_database_clock(pg_dsn: str, pg_schema: str) -> None:
    """Windows of 10 s, the first one moved back. 1.5 windows on, it is the window before,
    weighted by half: its 4 calls and 1 failure with 2 failures now are 2.5 failures in 4
    calls, a rate >= 0.6 that opens. 2.5 windows on, an empty window came in between: only
    the 2 calls now count, fewer than minimum_calls."""
    policy = replace(
        STREAK, failure_threshold=None, failure_rate=0.6, minimum_calls=3, window_seconds=10.0
    )
    async with PostgresStorage(pg_dsn, schema=pg_schema) as storage:
        await storage.migrate()
        store = storage.breaker_store()
        for name, back, state in (("half", 15.0, OPEN), ("gone", 25.0, CLOSED)):
            first = await store.count(name, Tally(3, 1, 0, 0), policy, generation=0)
            assert first.state is CLOSED
            async with storage.pool.connection() as conn:
                cur = await conn.execute(
                    sql.SQL(
                        "UPDATE {}.breakers SET window_start = window_start - %s "
                        "WHERE name = %s RETURNING window_start"
                    ).format(sql.Identifier(pg_schema)),
                    (back, name),
                )
                moved = await cur.fetchone()
            assert moved is not None
            (start,) = moved
            got = await store.count(name, Tally(0, 2, 0, 2), policy, generation=0)
            assert got.state is state, name
            async with storage.pool.connection() as conn:
                cur = await conn.execute(
                    sql.SQL(
                        "SELECT window_start, previous_calls, previous_failures, calls, failures "
                        "FROM {}.breakers WHERE name = %s"
                    ).format(sql.Identifier(pg_schema)),
                    (name,),
                )
                stored = await cur.fetchone()
            ended = int(back // 10.0)
            previous = (4, 1) if ended == 1 else (0, 0)
            assert stored == (start + ended * 10.0, *previous, 2, 2), name


async def test_a_schema_of_version_3_is_upgraded_with_its_breakers(
    pg_dsn: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shared counting comes as an additive migration: the rows of a version-3 schema keep
    their state and count from then on, and code of version 3 still running steps them."""
    with monkeypatch.context() as old_code:
        old_code.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:3])
        old_code.setattr(migrations, "LATEST_VERSION", 3)
        old = PostgresStorage(pg_dsn, schema=pg_schema, min_size=1, max_size=1)
        await old.open()
        assert (await old.apply_migrations()).after == 3
    try:
        store = old.breaker_store()
        assert (await store.step("tripped", Action.OPEN, STREAK)).state is OPEN
        closed = await store.step("reset", Action.CLOSE, STREAK)
        assert (closed.state, closed.generation) == (CLOSED, 1)
        async with PostgresStorage(pg_dsn, schema=pg_schema) as new:
            result = await new.apply_migrations()
            assert (result.before, result.after) == (3, migrations.LATEST_VERSION)
            tripped = await new.breaker_store().read("tripped")
            assert (tripped.state, tripped.generation) == (OPEN, 1)
            assert 25.0 < tripped.open_for <= 30.0
            four = Tally(failures=4, trailing=4)
            counted = await new.breaker_store().count("reset", four, STREAK, generation=1)
            assert (counted.state, counted.generation, counted.failures) == (CLOSED, 1, 4)
        # The old code's breaker_step() (on the connection it had) steps the wider rows.
        reopened = await store.step("reset", Action.OPEN, STREAK)
        assert (reopened.state, reopened.generation) == (OPEN, 2)
    finally:
        await old.close()


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
