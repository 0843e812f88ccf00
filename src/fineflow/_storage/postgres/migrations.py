"""Versioned migrations of fineflow's schema, and the grants of the runtime role.

Version 1 is the initial schema: ``sql/schema.sql``, every function file in
``sql/functions/`` and ``sql/revoke.sql``. A later version is one file,
``sql/migrations/NNNN_<what>.sql``, listed in :data:`MIGRATIONS` with its compatibility
level; a migration that changes a function lists that function's file after its own, so
the function files always hold the text the database runs. Migrations are applied in
order, in one transaction under an advisory lock, so instances that migrate at once wait
for each other and each version is applied once.

``schema_migrations`` lists the versions applied; ``schema_version`` records the
compatibility level, the oldest version whose code can still use the schema. An additive
migration (new functions, say) keeps the level, so older instances keep running through a
rolling deploy or a rollback; code that finds a level newer than it knows refuses to run
(:class:`fineflow.SchemaVersionError`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from ..._errors import SchemaVersionError
from ..._logfields import log_extra
from .sqlfiles import BREAKER_FUNCTIONS, INITIAL_FUNCTIONS, compose

__all__ = [
    "LATEST_VERSION",
    "MIGRATIONS",
    "Migration",
    "MigrationResult",
    "grant_runtime",
    "migrate",
]

logger = logging.getLogger("fineflow.storage")


@dataclass(frozen=True, slots=True)
class Migration:
    """One version of the schema: the files it runs, in order.

    Attributes:
        version: the version it brings the schema to (1, 2, ...).
        files: paths below ``sql/``.
        compatible_with: the oldest version whose code can use the schema afterwards.
    """

    version: int
    files: tuple[str, ...]
    compatible_with: int


@dataclass(frozen=True, slots=True)
class MigrationResult:
    """What one ``migrate()`` did.

    Attributes:
        before: the schema's version before (0: there was none).
        after: its version after; the same as ``before`` when it was already up to date
            (or newer than this code, with a compatibility level this code knows).
    """

    before: int
    after: int

    @property
    def action(self) -> str:
        """``"created"``, ``"upgraded"`` or ``"up to date"``."""
        if self.before == self.after:
            return "up to date"
        return "created" if self.before == 0 else "upgraded"


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        ("schema.sql", *(f"functions/{name}.sql" for name in INITIAL_FUNCTIONS), "revoke.sql"),
        compatible_with=1,
    ),
    # Additive (a table, two functions, the view over the table): code of version 1 keeps
    # running on it, and its requests simply go uncounted.
    Migration(
        2,
        (
            "migrations/0002_rollups.sql",
            "functions/add_rollups.sql",
            "functions/prune_rollups.sql",
            "revoke.sql",
        ),
        compatible_with=1,
    ),
    # Shared circuit breakers: additive, older code keeps running.
    Migration(
        3,
        (
            "functions/breaker_notify.sql",  # the table's trigger: made before the table
            "migrations/0003_breakers.sql",
            *(f"functions/{name}.sql" for name in BREAKER_FUNCTIONS if name != "breaker_notify"),
            "revoke.sql",
        ),
        compatible_with=1,
    ),
    # Shared failure counting: columns added to the breakers table and one function;
    # additive, older code keeps running (its breaker_step() never reads the counters).
    Migration(
        4,
        (
            "migrations/0004_breaker_counts.sql",
            "functions/breaker_count.sql",
            "revoke.sql",
        ),
        compatible_with=1,
    ),
)
LATEST_VERSION = MIGRATIONS[-1].version


async def migrate(
    conn: psycopg.AsyncConnection[Any], schema: str, *, unlogged: bool
) -> MigrationResult:
    """Bring ``schema`` to :data:`LATEST_VERSION` (idempotent; safe to run concurrently);
    return the versions before and after (read under the lock: of instances migrating at
    once, one reports the change and the others find it up to date).

    Raises:
        SchemaVersionError: the schema's compatibility level is newer than this code.
        psycopg.Error: the database refused.
    """
    ident = sql.Identifier(schema)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"fineflow:{schema}",))
        await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
        await conn.execute(compose("versions.sql", schema=ident))
        level = await _max_version(conn, ident, "schema_version")
        if level > LATEST_VERSION:
            raise SchemaVersionError(
                f"schema {schema!r} is at version {level}, newer than this fineflow knows "
                f"({LATEST_VERSION}); upgrade fineflow"
            )
        applied = await _max_version(conn, ident, "schema_migrations")
        keyword = sql.SQL("UNLOGGED" if unlogged else "")
        for migration in MIGRATIONS[applied:]:
            for name in migration.files:
                await conn.execute(compose(name, schema=ident, unlogged=keyword))
            await conn.execute(
                sql.SQL("INSERT INTO {}.schema_migrations (version) VALUES (%s)").format(ident),
                (migration.version,),
            )
            if migration.compatible_with > level:
                level = migration.compatible_with
                await conn.execute(
                    sql.SQL("INSERT INTO {}.schema_version (version) VALUES (%s)").format(ident),
                    (level,),
                )
            logger.info(
                "migrated schema %r to version %d",
                schema,
                migration.version,
                extra=log_extra(
                    "storage_migrated", storage="PostgresStorage", count=migration.version
                ),
            )
    return MigrationResult(applied, max(applied, LATEST_VERSION))


async def grant_runtime(
    conn: psycopg.AsyncConnection[Any], schema: str, role: str, *, create: bool
) -> None:
    """Let ``role`` use the decision functions only (``sql/grant_runtime.sql``); with
    ``create``, create it first (``LOGIN``, no password) if it does not exist."""
    async with conn.transaction():
        if create:
            cur = await conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
            if await cur.fetchone() is None:
                await conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        await conn.execute(
            compose("grant_runtime.sql", schema=sql.Identifier(schema), role=sql.Identifier(role))
        )


async def _max_version(
    conn: psycopg.AsyncConnection[Any], schema: sql.Identifier, table: str
) -> int:
    query = sql.SQL("SELECT coalesce(max(version), 0) FROM {}.{}")
    cur = await conn.execute(query.format(schema, sql.Identifier(table)))
    row = await cur.fetchone()
    return int(row[0]) if row else 0
