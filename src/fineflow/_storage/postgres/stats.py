"""Durable stats of a PostgresStorage: requests counted where decisions come back, written
to the ``rollups`` table every few seconds (``sql/functions/add_rollups.sql``).

Each statement's requests are counted in process once the statement has answered (a
request whose caller stopped waiting but was charged counts too), per minute of this
process's clock, endpoint and tier (:mod:`fineflow._storage.rollups`). A
:class:`~fineflow._storage.flusher.Flusher` adds them to the table in one statement every
``flush_every`` seconds, before every ``stats()`` read and at close. Cleanup deletes the
minutes older than the retention.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from psycopg_pool import AsyncConnectionPool

from ..base import StatsPoint, StatsRow
from ..coalescing import Request
from ..flusher import Flusher, FlushSnapshot
from ..rollups import Cell, Rollups, check_by, check_since
from .admin import Admin
from .scheduler import Cursor, Run

__all__ = ["StatsKeeper"]


class StatsKeeper:
    """The per-minute request counts of one storage: counting, flushing, reading.

    Args:
        admin: the storage's queries.
        pool: gives the storage's pool (raises when the storage is not open).
        retention: seconds a minute's counts are kept (cleanup deletes older ones;
            ``None``: kept).
        flush_every: seconds between writes; ``None``: requests are not counted.
        name: what the log lines call it (the schema).
    """

    def __init__(
        self,
        admin: Admin,
        pool: Callable[[], AsyncConnectionPool[Any]],
        *,
        retention: float | None,
        flush_every: float | None,
        name: str,
    ) -> None:
        self.retention = retention
        self.counting = flush_every is not None
        self._admin = admin
        self._pool = pool
        self._rollups = Rollups()
        self._flusher = Flusher(self._rollups, self._write, flush_every, name)

    def counted(self, run: Run) -> Run:
        """``run`` (which decides a batch), counting the batch's requests once it answered."""
        if not self.counting:
            return run
        count = self._rollups.count_answered

        async def run_and_count(cur: Cursor, algorithm: str, batch: list[Request]) -> str:
            name = await run(cur, algorithm, batch)
            count(batch, time.time_ns())
            return name

        return run_and_count

    def start(self) -> None:
        """Start writing every ``flush_every`` seconds."""
        self._flusher.start()

    async def stop(self) -> None:
        """Stop the writes, and write what is left (the pool must still be open)."""
        await self._flusher.stop()

    async def flush(self) -> bool:
        """Write this process's pending counts now; whether it worked (see Flusher)."""
        return await self._flusher.flush()

    def snapshot(self) -> FlushSnapshot:
        """The flusher's counters."""
        return self._flusher.snapshot()

    async def prune(self, now: int | None, batch_size: int) -> int:
        """Delete the minutes older than the retention, ``batch_size`` rows per statement;
        return how many rows (0 without a retention)."""
        if self.retention is None:
            return 0
        return await self._admin.prune(self._pool(), self.retention, now, batch_size)

    async def stats(
        self, since: float | timedelta | None, by: object, now: int | None
    ) -> list[StatsRow]:
        """See :meth:`fineflow.Storage.stats` (this process's counts written first)."""
        seconds, groups = check_since(since), check_by(by)
        await self.flush()
        return await self._admin.stats(self._pool(), seconds, groups, now)

    async def series(
        self, since: float | timedelta | None, by: object, now: int | None
    ) -> list[StatsPoint]:
        """See :meth:`fineflow.PostgresStorage.stats_series` (this process's counts first)."""
        seconds, groups = check_since(since), check_by(by)
        await self.flush()
        return await self._admin.series(self._pool(), seconds, groups, now)

    async def _write(self, cells: list[Cell]) -> None:
        await self._admin.add_rollups(self._pool(), cells)
