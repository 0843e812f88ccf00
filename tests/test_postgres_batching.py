"""PostgresStorage batching on a real server: how arrivals become statements."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from fineflow import Hit, PostgresStorage, Quota

pytestmark = pytest.mark.anyio

QUOTA = Quota(1000, 60.0)


@pytest.fixture
async def storage(pg_dsn: str, pg_schema: str) -> AsyncIterator[PostgresStorage]:
    async with PostgresStorage(pg_dsn, schema=pg_schema) as pg:
        await pg.migrate()
        yield pg


@pytest.mark.parametrize("max_in_flight", [1, 2])
async def test_callers_woken_together_go_out_as_one_statement(
    storage: PostgresStorage, max_in_flight: int
) -> None:
    """Callers that re-arrive in the same loop iteration are one batch, not a lone first
    arrival plus a batch of the rest (which would cost two statements per cycle)."""
    storage.max_in_flight = max_in_flight
    waves, callers = 3, 32

    async def caller(i: int) -> None:
        for _ in range(waves):
            (decision,) = await storage.decide("gcra", [Hit(f"u{i}", QUOTA, 1, "wave")])
            assert decision.allowed

    await asyncio.gather(*(caller(i) for i in range(callers)))
    assert (storage.batches, storage.batched_requests) == (waves, waves * callers)


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
