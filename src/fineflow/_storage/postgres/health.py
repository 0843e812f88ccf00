"""PostgresStorage's health check: one query on a connection from its pool, which also
finds a schema that was never migrated (every decision would fail there)."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from ..base import StorageHealth
from ..probe import closed, probe
from .errors import one_line

__all__ = ["check_health"]


class NotMigratedError(Exception):
    """The storage's schema has no fineflow tables: ``migrate()`` was never run."""


async def check_health(
    pool: AsyncConnectionPool[Any] | None,
    schema: str,
    timeout: float,  # noqa: ASYNC109 - the budget of this one check
) -> StorageHealth:
    """The pool's health: a connection within ``timeout`` that finds ``schema`` migrated.

    The check reads the catalog (``to_regclass``), not a table, so a least-privilege
    runtime role (``grant_runtime()``) can run it.
    """
    if pool is None:
        return closed("postgres")
    query = sql.SQL("SELECT to_regclass({}) IS NOT NULL").format(
        sql.Literal(sql.Identifier(schema, "schema_migrations").as_string(None))
    )

    async def migrated() -> None:
        async with pool.connection(timeout=timeout) as conn:
            row = await (await conn.execute(query)).fetchone()
        if not (row and row[0]):
            raise NotMigratedError(
                f"schema {schema!r} is not migrated: run `fineflow migrate` or "
                "`await storage.migrate()`"
            )

    errors = (psycopg.Error, OSError, NotMigratedError)
    return await probe("postgres", migrated, timeout, errors, _describe)


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, NotMigratedError) else one_line(exc)
