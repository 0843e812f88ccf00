"""The administration queries: one key's status, reset, cleanup and the stats."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from ..._ratelimit.algorithms import ALGORITHMS, NS, BucketState
from ..._ratelimit.quota import Quota
from ..base import KeyStatus, StatsPoint, StatsRow, storage_key
from ..rollups import Cell, series, totals
from .errors import driver_errors
from .sqlfiles import compose
from .statements import tier_text

__all__ = ["Admin", "cleanup_lock"]


def cleanup_lock(schema: str) -> str:
    """The text whose ``hashtext()`` keys the advisory lock of background cleanup rounds."""
    return f"fineflow:cleanup:{schema}"


class Admin:
    """The administration queries of one schema, composed once."""

    def __init__(self, schema: str) -> None:
        ident = sql.Identifier(schema)
        self._lock = cleanup_lock(schema)
        self._try_lock = sql.SQL("SELECT pg_try_advisory_lock(hashtext(%s))")
        self._unlock = sql.SQL("SELECT pg_advisory_unlock(hashtext(%(lock)s))")
        # (As _unlock, without the server's warning when the session does not hold it.)
        self._unlock_if_held = sql.SQL(
            "SELECT pg_advisory_unlock(hashtext(%(lock)s)) FROM pg_locks "
            "WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted "
            "AND objsubid = 1 AND ((classid::bigint << 32) | objid::bigint) "
            "= hashtext(%(lock)s)::bigint"
        )
        self._status = sql.SQL("SELECT * FROM {}.status(%s, %s::bigint)").format(ident)
        self._reset = sql.SQL("SELECT {}.reset(%s, %s)").format(ident)
        self._cleanup = sql.SQL("SELECT {}.cleanup(%s, %s)").format(ident)
        self._stats = compose("queries/stats.sql", schema=ident)
        self._series = compose("queries/stats_series.sql", schema=ident)
        self._prune = sql.SQL("SELECT {}.prune_rollups(%s, %s::bigint, %s)").format(ident)
        self._add = sql.SQL(
            "SELECT {}.add_rollups(%b::bigint[], %b::text[], %b::text[], %b::bigint[], "
            "%b::bigint[])"
        ).format(ident)

    async def status(
        self, pool: AsyncConnectionPool[Any], key: str, now: int | None
    ) -> list[KeyStatus]:
        """The live state of every (endpoint, quota) of ``key``, decided as a peek."""
        with driver_errors("status query"):
            async with pool.connection() as conn:
                cur = await conn.execute(self._status, (storage_key(key), now))
                rows = await cur.fetchall()
        out = []
        for k, ep, policy, tier, alg, t, count, prev, lim, period, cap, ok_n, no_n, db_now in rows:
            quota = Quota(lim, period / NS, None if cap == lim else cap, name=policy)
            decision = ALGORITHMS[alg](BucketState(t, count, prev), db_now, quota, 0)[0]
            out.append(KeyStatus(k, ep, policy, tier, alg, decision, ok_n, no_n))
        return out

    async def reset(self, pool: AsyncConnectionPool[Any], key: str, endpoint: str | None) -> int:
        """Delete ``key``'s rows (of one endpoint, or all); return how many."""
        ep = None if endpoint is None else storage_key(endpoint)
        with driver_errors("reset"):
            async with pool.connection() as conn:
                cur = await conn.execute(self._reset, (storage_key(key), ep))
                row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def cleanup(
        self, pool: AsyncConnectionPool[Any], batch_size: int, now: int | None
    ) -> int:
        """Delete expired rows, ``batch_size`` at a time (a connection from the pool each),
        until none are left; return how many were deleted."""

        async def batch() -> int:
            async with pool.connection() as conn:
                return await self._cleanup_batch(conn, batch_size, now)

        with driver_errors("cleanup"):
            return await _drain(batch, batch_size)

    async def cleanup_alone(self, pool: AsyncConnectionPool[Any], batch_size: int) -> int | None:
        """:meth:`cleanup` on one connection under a session advisory lock, unless another
        session holds that lock: then return ``None`` and do nothing."""
        with driver_errors("background cleanup"):
            async with pool.connection() as conn:
                locked: bool | None = None  # None: the try-lock has not answered
                try:
                    cur = await conn.execute(self._try_lock, (self._lock,))
                    row = await cur.fetchone()
                    locked = bool(row and row[0])
                    if not locked:
                        return None
                    return await _drain(
                        partial(self._cleanup_batch, conn, batch_size, None), batch_size
                    )
                finally:
                    # Interrupted before the answer (a round cancelled by close()), the
                    # server may have granted the lock all the same: the session goes back
                    # to the pool, so release it if held. (A connection this fails on is
                    # broken: the pool discards it, and the server ends the lock with the
                    # session.)
                    if locked is not False:
                        unlock = self._unlock if locked else self._unlock_if_held
                        with contextlib.suppress(psycopg.Error):
                            await conn.execute(unlock, {"lock": self._lock})

    async def _cleanup_batch(
        self, conn: psycopg.AsyncConnection[Any], batch_size: int, now: int | None
    ) -> int:
        cur = await conn.execute(self._cleanup, (batch_size, now))
        row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def prune(
        self, pool: AsyncConnectionPool[Any], keep: float, now: int | None, batch_size: int
    ) -> int:
        """Delete the per-minute counts of minutes that ended ``keep`` seconds ago or
        earlier, ``batch_size`` rows per statement (short, each under the statement
        timeout) until none are left; return how many rows."""
        total = 0
        with driver_errors("pruning the stats"):
            async with pool.connection() as conn:
                while True:
                    cur = await conn.execute(self._prune, (keep, now, batch_size))
                    row = await cur.fetchone()
                    deleted = int(row[0]) if row else 0
                    total += deleted
                    if deleted < batch_size:
                        return total

    async def stats(
        self,
        pool: AsyncConnectionPool[Any],
        since: float | None,
        by: tuple[str, ...],
        now: int | None,
    ) -> list[StatsRow]:
        """Allowed and denied requests by endpoint and tier (then by the groups ``by``),
        with the keys that have state stored."""
        with driver_errors("stats query"):
            async with pool.connection() as conn:
                cur = await conn.execute(self._stats, {"since": since, "now": now})
                rows = await cur.fetchall()
        cells = [Cell(0, e, t, int(a), int(d)) for e, t, _, a, d in rows]
        return totals(cells, by, {(e, t): int(k) for e, t, k, _, _ in rows})

    async def series(
        self,
        pool: AsyncConnectionPool[Any],
        since: float | None,
        by: tuple[str, ...],
        now: int | None,
    ) -> list[StatsPoint]:
        """Allowed and denied requests per minute and group ``by``."""
        with driver_errors("stats query"):
            async with pool.connection() as conn:
                cur = await conn.execute(self._series, {"since": since, "now": now})
                rows = await cur.fetchall()
        return series([Cell(int(m), e, t, int(a), int(d)) for m, e, t, a, d in rows], by)

    async def add_rollups(self, pool: AsyncConnectionPool[Any], cells: list[Cell]) -> None:
        """Add ``cells`` (an instance's counts) to the rollups, in one statement."""
        params = (
            [c.minute for c in cells],
            [storage_key(c.endpoint) for c in cells],
            [tier_text(c.tier) for c in cells],
            [c.allowed for c in cells],
            [c.denied for c in cells],
        )
        with driver_errors("writing the stats"):
            async with pool.connection() as conn:
                await conn.execute(self._add, params, prepare=True)


async def _drain(batch: Callable[[], Awaitable[int]], batch_size: int) -> int:
    """Run ``batch`` until it deletes fewer than ``batch_size`` rows; the total deleted."""
    removed = 0
    while True:
        done = await batch()
        removed += done
        if done < batch_size:
            return removed
