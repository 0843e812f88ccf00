"""PostgresStorage batching on a real server: how arrivals become statements."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from fineflow import BucketState, ConfigurationError, Hit, PostgresStorage, Quota
from fineflow._ratelimit.algorithms import NS, step_all
from fineflow._storage.coalescing import DeadlinesSnapshot, SchedulerSnapshot
from fineflow._storage.postgres.statements import Statements, text_array

pytestmark = pytest.mark.anyio

QUOTA = Quota(1000, 60.0)


@pytest.fixture
async def storage(pg_dsn: str, pg_schema: str) -> AsyncIterator[PostgresStorage]:
    async with PostgresStorage(pg_dsn, schema=pg_schema) as pg:
        await pg.migrate()
        yield pg


async def test_callers_woken_together_go_out_as_one_statement(storage: PostgresStorage) -> None:
    """Callers that re-arrive in the same loop iteration are one batch, not a lone first
    arrival plus a batch of the rest (which would cost two statements per cycle)."""
    storage.max_in_flight = 1
    waves, callers = 3, 32

    async def caller(i: int) -> None:
        for _ in range(waves):
            (decision,) = await storage.decide("gcra", [Hit(f"u{i}", QUOTA, 1, "wave")])
            assert decision.allowed

    await asyncio.gather(*(caller(i) for i in range(callers)))
    assert (storage.batches, storage.batched_requests) == (waves, waves * callers)


@pytest.mark.parametrize("handoff_max", [64, 2])
async def test_a_statement_task_keeps_its_connection_for_the_next_batch(
    storage: PostgresStorage, monkeypatch: pytest.MonkeyPatch, handoff_max: int
) -> None:
    """Callers answered by a batch re-arrive and go out as the next batch on the same
    connection, with no pool round trip in between; after ``handoff_max`` batches in a
    row the connection goes back to the pool, and it always does once the load stops."""
    monkeypatch.setattr(storage._scheduler, "handoff_max", handoff_max)
    storage.max_in_flight = 1
    waves, callers = 5, 16
    before = storage.pool.get_stats().get("requests_num", 0)

    async def caller(i: int) -> None:
        for _ in range(waves):
            (decision,) = await storage.decide("gcra", [Hit(f"h{i}", QUOTA, 1, "handoff")])
            assert decision.allowed

    await asyncio.gather(*(caller(i) for i in range(callers)))
    assert (storage.batches, storage.batched_requests) == (waves, waves * callers)
    requests = storage.pool.get_stats().get("requests_num", 0) - before
    assert requests == -(-waves // handoff_max)
    for _ in range(10):
        await asyncio.sleep(0)
    idle = SchedulerSnapshot(0, 0, 0, 0, DeadlinesSnapshot(0, 0, 0))
    assert storage._scheduler.snapshot() == idle
    stats = storage.pool.get_stats()
    assert stats["pool_available"] == stats["pool_size"]


async def test_a_lone_statement_shares_its_batch_with_a_second(storage: PostgresStorage) -> None:
    """With nothing else in flight, a batch goes out as two statements of half each, so the
    client handles one's results while the database runs the other."""
    out = await asyncio.gather(
        *(storage.decide("gcra", [Hit(f"s{i}", QUOTA, 1, "split")]) for i in range(40))
    )
    assert all(d[0].allowed for d in out)
    assert (storage.batches, storage.batched_requests) == (2, 40)
    out = await asyncio.gather(
        *(storage.decide("gcra", [Hit("hot", Quota(7, 60.0), 1, "split")]) for _ in range(30))
    )
    assert (storage.batches, storage.batched_requests) == (4, 70)
    assert sum(d[0].allowed for d in out) == 7  # one row in two statements: still exact


async def test_without_coalescing_each_request_is_its_own_statement(
    pg_dsn: str, pg_schema: str
) -> None:
    async with PostgresStorage(pg_dsn, schema=pg_schema, coalesce=False, max_size=4) as pg:
        await pg.migrate()
        out = await asyncio.gather(
            *(pg.decide("gcra", [Hit("same", Quota(5, 60.0), 1, "solo")]) for _ in range(12))
        )
        assert sum(d[0].allowed for d in out) == 5
        assert pg.batches == 0  # every request went alone, through hit()


T0 = 1_700_000_000 * NS


@pytest.mark.parametrize("cost", [1, 2, 4])  # 4 > the capacity of 3: never fits
@settings(max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    keys=st.lists(st.integers(0, 3), min_size=2, max_size=40),
    gap=st.integers(0, 3 * NS),
)
async def test_batches_sharing_one_quota_match_the_model_in_arrival_order(
    storage: PostgresStorage, cost: int, keys: list[int], gap: int
) -> None:
    """hit_keys(): many requests on a few keys, one quota and cost, decided as the model
    decides them one by one in arrival order (one statement in flight)."""
    storage.max_in_flight = 1
    endpoint = f"e{secrets.token_hex(4)}"
    quota = Quota(3, 1.0)
    now = T0 + gap
    model: dict[int, BucketState | None] = {}
    expected = []
    for key in keys:
        decisions, states = step_all("gcra", [model.get(key)], now, [quota], cost)
        model[key] = states[0]
        expected.append(decisions[0])
    batches = storage.batches
    got = await asyncio.gather(
        *(storage.decide("gcra", [Hit(str(k), quota, cost, endpoint)], now=now) for k in keys)
    )
    assert [g[0] for g in got] == expected
    assert storage.batches > batches


ODD_KEYS = ["", " ", " x ", "NULL", '"', "\\", '\\"', "{a,b}", ",", "é€😀", "\t\n", "$1", "k"]


async def test_keys_with_array_literal_syntax_reach_their_own_rows(
    storage: PostgresStorage,
) -> None:
    """hit_keys() takes its keys as one array literal: quotes, backslashes, braces, commas,
    blanks and the word NULL are keys like any other, each on its own row."""
    storage.max_in_flight = 1
    quota = Quota(2, 3600.0)
    hits = [[Hit(k, quota, 1, "odd")] for k in ODD_KEYS]
    batches = storage.batches
    for allowed, left in ((True, 1), (True, 0), (False, 0)):
        out = await asyncio.gather(*(storage.decide("gcra", h) for h in hits))
        assert [(d[0].allowed, d[0].remaining) for d in out] == [(allowed, left)] * len(ODD_KEYS)
    assert storage.batches > batches
    for key in ODD_KEYS:
        (status,) = await storage.status(key)
        assert (status.key, status.endpoint, status.decision.remaining) == (key, "odd", 0)


def test_text_array_round_trips_through_postgresql(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for items in ([], ["a"], ODD_KEYS, [str(i) for i in range(300)]):
            row = conn.execute("SELECT %s::text[]", (text_array(items),)).fetchone()
            assert row is not None and row[0] == items


async def test_a_statement_that_reaches_a_row_late_decides_it_no_earlier_than_its_last_decision(
    storage: PostgresStorage, pg_dsn: str
) -> None:
    """Statement B reads the clock, then waits for a row held by transaction L; L decides
    another row at its later clock and commits; B then decides that row. At B's own
    (earlier) clock the request that fits would be denied with a retry-after of a few
    milliseconds; hit_keys() decides the row at the later of the two times."""
    quota = Quota(2, 3600.0)  # the second request of the hour fits
    statements = Statements.compose(storage.schema)

    def params(keys: list[str]) -> tuple[Any, ...]:
        period, cap = quota.period_ns, quota.capacity
        return (None, text_array(keys), None, "late", quota.policy, "", 2, period, cap, 1)

    await storage.decide("gcra", [Hit("a", quota, 1, "late")])  # row "a" exists
    async with (
        await psycopg.AsyncConnection.connect(pg_dsn) as holder,
        await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as late,
    ):
        await holder.execute(
            sql.SQL("SELECT 1 FROM {}.buckets WHERE key = 'a' FOR UPDATE").format(
                sql.Identifier(storage.schema)
            )
        )

        async def run_late() -> list[tuple[Any, ...]]:
            cur = await late.execute(statements.hit_keys, params(["a", "k"]))
            return await cur.fetchall()

        task = asyncio.create_task(run_late())  # reads its clock, then waits for "a"
        await asyncio.sleep(0.2)
        cur = await holder.execute(statements.hit_keys, params(["k"]))
        ((_, _, first, _),) = await cur.fetchall()
        await holder.commit()
        rows = {row[0]: row for row in await task}
    assert first == 1
    assert rows["k"][2] == 1  # admitted: the second of two
    assert rows["k"][3] >= rows["a"][3]


async def test_the_pool_starts_with_one_connection(pg_dsn: str, pg_schema: str) -> None:
    """Idle connections are handed out in turn, and a lone request is slower on one of two
    alternating connections than on the same one each time: start with one."""
    async with PostgresStorage(pg_dsn, schema=pg_schema) as pg:
        await pg.pool.wait()
        assert pg.pool.get_stats()["pool_size"] == 1


@pytest.mark.parametrize("fast_paths", [(), ("hit",), ("hit_many",), ("hit_keys", "hit_many")])
async def test_fast_paths_change_the_statements_not_the_decisions(
    pg_dsn: str, pg_schema: str, fast_paths: tuple[str, ...]
) -> None:
    """Whatever statements are allowed, a burst on one key admits exactly its quota and a
    lone request gets the same answer; ``decide()`` takes what they do not."""
    async with PostgresStorage(pg_dsn, schema=pg_schema, fast_paths=fast_paths) as pg:
        await pg.migrate()
        assert pg.fast_paths == frozenset(fast_paths)
        hits = [Hit("k", Quota(5, 3600.0), 1, "paths")]
        out = await asyncio.gather(*(pg.decide("gcra", hits) for _ in range(12)))
        assert sorted(d[0].remaining for d in out if d[0].allowed) == [0, 1, 2, 3, 4]
        batches = pg.batches
        (lone,) = await pg.decide("gcra", [Hit("lone", Quota(5, 3600.0), 1, "paths")])
        assert (lone.allowed, lone.remaining) == (True, 4)
        # hit() is the one statement not counted as a batch
        assert pg.batches == batches + ("hit" not in fast_paths)


def test_unknown_fast_paths_are_a_configuration_error() -> None:
    for bad in ("hit", ["hit", "hit_fast"]):
        with pytest.raises(ConfigurationError, match="fast_paths"):
            PostgresStorage("", fast_paths=bad)
