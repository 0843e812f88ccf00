"""The SQL of the PostgreSQL storage, read from the ``sql/`` files shipped in the package.

Each file is the complete text the database runs: ``sql/schema.sql`` (the table and the
stats view), one file per function in ``sql/functions/``, the later versions in
``sql/migrations/``, ``sql/revoke.sql``, ``sql/grant_runtime.sql``, and the longer queries
of the administration commands in ``sql/queries/``. The only placeholders are identifiers
and one keyword, filled with :mod:`psycopg.sql` objects (never string formatting):
``{schema}``, ``{role}`` and ``{unlogged}`` (``UNLOGGED`` or nothing). Literal braces would
be written ``{{``/``}}``; none of the files needs one.
"""

from __future__ import annotations

import functools
from importlib import resources

from psycopg import sql

__all__ = ["BREAKER_FUNCTIONS", "FUNCTIONS", "INITIAL_FUNCTIONS", "QUERIES", "compose", "text"]

# The functions of version 1 of the schema, by name: sql/functions/<name>.sql.
INITIAL_FUNCTIONS = ("hit", "hit_keys", "hit_many", "decide", "peek", "status", "reset", "cleanup")
# The functions of shared circuit breakers (migration 3).
BREAKER_FUNCTIONS = ("breaker_notify", "breaker_state", "breaker_step")
# Every function of the schema (later ones are created by their migration).
FUNCTIONS = (
    *INITIAL_FUNCTIONS,
    "add_rollups",
    "prune_rollups",
    *BREAKER_FUNCTIONS,
    "breaker_count",  # shared failure counting (migration 4)
)
# The administration queries too long to read inline: sql/queries/<name>.sql.
QUERIES = ("stats", "stats_series")


@functools.cache
def text(name: str) -> str:
    """The text of ``sql/<name>`` (a path relative to the ``sql`` folder)."""
    return resources.files(__package__).joinpath("sql", name).read_text(encoding="utf-8")


def compose(name: str, **fields: sql.Composable) -> sql.Composed:
    """``sql/<name>`` with its placeholders filled by ``fields``."""
    return sql.SQL(text(name)).format(**fields)
