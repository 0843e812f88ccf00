"""PostgresStorage's health check: ``SELECT 1`` on a connection from its pool."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from ..base import StorageHealth
from ..probe import closed, probe
from .errors import one_line

__all__ = ["check_health"]


async def check_health(
    pool: AsyncConnectionPool[Any] | None,
    timeout: float,  # noqa: ASYNC109 - the budget of this one check
) -> StorageHealth:
    """The pool's health: a connection within ``timeout`` that answers ``SELECT 1``."""
    if pool is None:
        return closed("postgres")

    async def select_one() -> None:
        async with pool.connection(timeout=timeout) as conn:
            await conn.execute("SELECT 1")

    return await probe("postgres", select_one, timeout, (psycopg.Error, OSError), one_line)
