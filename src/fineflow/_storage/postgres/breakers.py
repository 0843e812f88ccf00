"""Shared circuit-breaker state in PostgreSQL: the ``BreakerStore`` of a ``PostgresStorage``.

Rows live in ``{schema}.breakers`` (migrations 3 and 4). A step is one call of
``breaker_step()`` (or ``breaker_count()``, for a tally of a closed breaker's outcomes) on a
pool connection; it NOTIFYs every change on the schema's channel.
One dedicated connection (not a pool connection: a listening session must stay the same
session) LISTENs on that channel while the storage is open and breakers watch it; it
reconnects with backoff when lost, and tells the breakers when notifications stop and flow
again.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from ..._breaker.config import CircuitState
from ..._breaker.hub import ListeningStore
from ..._breaker.shared import Action, SharedPolicy, SharedState, Tally, breaker_channel
from ..base import storage_key
from .errors import driver_errors, one_line

__all__ = ["PostgresBreakerStore"]


def _state(row: tuple[Any, ...] | None, granted: int = 0, failures: int = 0) -> SharedState:
    if row is None:
        raise psycopg.DataError("a breaker function returned no row")
    open_for = float(row[2]) / 1000.0
    return SharedState(CircuitState(row[0]), int(row[1]), open_for, granted, failures)


async def _resolve(value: Any) -> Any:
    """A pool's ``conninfo``/``kwargs``: the value, or what its (async) callable returns."""
    if callable(value):
        value = value()
    return await value if inspect.isawaitable(value) else value


async def _connection_args(pool: AsyncConnectionPool[Any]) -> tuple[str, dict[str, Any]]:
    """How the pool connects, for the listening connection (same server, same options)."""
    kwargs = dict(await _resolve(pool.kwargs) or {})
    kwargs.pop("autocommit", None)
    return str(await _resolve(pool.conninfo)), kwargs


class PostgresBreakerStore(ListeningStore):
    """The breaker rows of one schema (see the module docstring).

    Args:
        schema: the storage's schema.
        pool: returns the storage's open pool (raises ``StorageClosedError`` otherwise).
    """

    def __init__(self, schema: str, pool: Callable[[], AsyncConnectionPool[Any]]) -> None:
        super().__init__(key=storage_key, describe=one_line)
        ident = sql.Identifier(schema)
        self.channel = breaker_channel(schema)
        self._pool = pool
        self._read_sql = sql.SQL("SELECT * FROM {}.breaker_state(%s)").format(ident)
        self._step_sql = sql.SQL(
            "SELECT * FROM {}.breaker_step(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        ).format(ident)
        self._count_sql = sql.SQL(
            "SELECT * FROM {}.breaker_count("
            "%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        ).format(ident)

    # -- BreakerStore ----------------------------------------------------------------------

    async def read(self, name: str) -> SharedState:
        """The row of ``name`` now."""
        self.listen_if_watched()
        with driver_errors("reading shared breaker state"):
            async with self._pool().connection() as conn:
                cur = await conn.execute(self._read_sql, (storage_key(name),), prepare=True)
                return _state(await cur.fetchone())

    async def step(
        self,
        name: str,
        action: Action,
        policy: SharedPolicy,
        *,
        generation: int = 0,
        want: int = 0,
        shorten: float = 1.0,
    ) -> SharedState:
        """One ``breaker_step()`` on the row of ``name``."""
        self.listen_if_watched()
        params = (
            storage_key(name),
            action.value,
            generation,
            want,
            policy.reset_timeout * 1000.0,
            policy.backoff_multiplier,
            policy.max_reset_timeout * 1000.0,
            shorten,
            policy.half_open_max_calls,
            policy.successes_to_close,
            policy.half_open_max_wait * 1000.0,
        )
        with driver_errors(f"shared breaker step {action.value!r}"):
            async with self._pool().connection() as conn:
                cur = await conn.execute(self._step_sql, params, prepare=True)
                row = await cur.fetchone()
        return _state(row, int(row[3]) if row else 0)

    async def count(
        self,
        name: str,
        tally: Tally,
        policy: SharedPolicy,
        *,
        generation: int,
        shorten: float = 1.0,
    ) -> SharedState:
        """One ``breaker_count()`` on the row of ``name``: the shared streak in
        ``failures``."""
        self.listen_if_watched()
        params = (
            storage_key(name),
            generation,
            tally.successes,
            tally.failures,
            tally.slow,
            tally.trailing,
            policy.failure_threshold,
            policy.failure_rate,
            policy.slow_rate,
            policy.minimum_calls,
            policy.window_calls,
            policy.window_seconds,
            policy.reset_timeout * 1000.0,
            policy.backoff_multiplier,
            policy.max_reset_timeout * 1000.0,
            shorten,
        )
        with driver_errors("shared breaker count"):
            async with self._pool().connection() as conn:
                cur = await conn.execute(self._count_sql, params, prepare=True)
                row = await cur.fetchone()
        return _state(row, failures=int(row[3]) if row else 0)

    # -- the listening connection (ListeningStore) ------------------------------------------

    async def subscribe(
        self, ready: Callable[[], None], deliver: Callable[[str | bytes], None]
    ) -> None:
        """LISTEN on one dedicated connection until it fails (see ``ListeningStore``)."""
        conninfo, kwargs = await _connection_args(self._pool())
        conn = await psycopg.AsyncConnection.connect(conninfo, **kwargs, autocommit=True)
        async with conn:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
            ready()
            async for notice in conn.notifies():
                deliver(notice.payload)
