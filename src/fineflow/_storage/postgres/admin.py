"""The administration queries: one key's status, reset, cleanup and the stats view."""

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
from ..base import KeyStatus, StatsRow, storage_key
from .errors import driver_errors

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
        self._unlock = sql.SQL("SELECT pg_advisory_unlock(hashtext(%s))")
        self._status = sql.SQL("SELECT * FROM {}.status(%s, %s::bigint)").format(ident)
        self._reset = sql.SQL("SELECT {}.reset(%s, %s)").format(ident)
        self._cleanup = sql.SQL("SELECT {}.cleanup(%s, %s)").format(ident)
        self._stats = sql.SQL(
            "SELECT endpoint, tier, keys, allowed, denied FROM {}.stats ORDER BY 1, 2"
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
                cur = await conn.execute(self._try_lock, (self._lock,))
                row = await cur.fetchone()
                if not (row and row[0]):
                    return None
                try:
                    return await _drain(
                        partial(self._cleanup_batch, conn, batch_size, None), batch_size
                    )
                finally:
                    # (A connection this fails on is broken: the pool discards it, and the
                    # server ends the lock with the session.)
                    with contextlib.suppress(psycopg.Error):
                        await conn.execute(self._unlock, (self._lock,))

    async def _cleanup_batch(
        self, conn: psycopg.AsyncConnection[Any], batch_size: int, now: int | None
    ) -> int:
        cur = await conn.execute(self._cleanup, (batch_size, now))
        row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def stats(self, pool: AsyncConnectionPool[Any]) -> list[StatsRow]:
        """Allowed and denied counts grouped by endpoint and tier (the ``stats`` view)."""
        with driver_errors("stats query"):
            async with pool.connection() as conn:
                cur = await conn.execute(self._stats)
                rows = await cur.fetchall()
        return [StatsRow(e, t, int(k), int(a), int(d)) for e, t, k, a, d in rows]


async def _drain(batch: Callable[[], Awaitable[int]], batch_size: int) -> int:
    """Run ``batch`` until it deletes fewer than ``batch_size`` rows; the total deleted."""
    removed = 0
    while True:
        done = await batch()
        removed += done
        if done < batch_size:
            return removed
