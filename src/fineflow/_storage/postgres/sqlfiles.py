"""The SQL of the PostgreSQL storage, read from the ``sql/`` files shipped in the package.

Each file is the complete text the database runs: ``sql/schema.sql`` (the table and the
stats view), one file per function in ``sql/functions/``, ``sql/revoke.sql`` and
``sql/grant_runtime.sql``. The only placeholders are identifiers and one keyword, filled
with :mod:`psycopg.sql` objects (never string formatting): ``{schema}``, ``{role}`` and
``{unlogged}`` (``UNLOGGED`` or nothing). Literal braces would be written ``{{``/``}}``;
none of the files needs one.
"""

from __future__ import annotations

import functools
from importlib import resources

from psycopg import sql

__all__ = ["BREAKER_FUNCTIONS", "FUNCTIONS", "compose", "text"]

# Every function of the schema's first version, by name: sql/functions/<name>.sql.
FUNCTIONS = ("hit", "hit_keys", "hit_many", "decide", "peek", "status", "reset", "cleanup")
# The functions of shared circuit breakers (migration 2).
BREAKER_FUNCTIONS = ("breaker_notify", "breaker_state", "breaker_step")


@functools.cache
def text(name: str) -> str:
    """The text of ``sql/<name>`` (a path relative to the ``sql`` folder)."""
    return resources.files(__package__).joinpath("sql", name).read_text(encoding="utf-8")


def compose(name: str, **fields: sql.Composable) -> sql.Composed:
    """``sql/<name>`` with its placeholders filled by ``fields``."""
    return sql.SQL(text(name)).format(**fields)
