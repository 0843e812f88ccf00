"""Reaching the server: one direct connection attempt, for the server's own reason.

The pool connects in the background and retries until its timeout, and then says only that
it timed out. One direct attempt fails at once with libpq's reason (connection refused, no
such database, password authentication failed): what a person needs to read.
"""

from __future__ import annotations

import psycopg

from ..._errors import StorageError
from .errors import one_line

__all__ = ["check_reachable", "why_unreachable"]

_CHECK = "(check the DSN or FINEFLOW_DSN)"


def libpq_seconds(timeout: float) -> int:
    """``connect_timeout`` as libpq takes it: whole seconds, at least 1."""
    return max(int(timeout), 1)


async def check_reachable(dsn: str, connect_timeout: float) -> None:
    """Connect once and close again.

    Raises:
        StorageError: the server could not be reached or refused, with its reason.
    """
    try:
        conn = await psycopg.AsyncConnection.connect(
            dsn, connect_timeout=libpq_seconds(connect_timeout)
        )
    except psycopg.Error as exc:
        raise StorageError(f"could not connect to PostgreSQL: {one_line(exc)} {_CHECK}") from exc
    await conn.close()


async def why_unreachable(dsn: str | None, connect_timeout: float, exc: Exception) -> str:
    """Why the pool found no connection in time (``exc``, its timeout), from one direct
    attempt; ``dsn`` is ``None`` for a pool the user owns (nothing to try directly)."""
    if dsn is None:
        return str(exc)
    try:
        await check_reachable(dsn, connect_timeout)
    except StorageError as direct:
        return str(direct)
    return f"{exc} (the server answers now: the pool may be too small or busy)"
