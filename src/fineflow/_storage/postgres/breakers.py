"""Shared circuit-breaker state in PostgreSQL: the ``BreakerStore`` of a ``PostgresStorage``.

Rows live in ``{schema}.breakers`` (migration 2). A step is one call of
``breaker_step()`` on a pool connection; it NOTIFYs every change on the schema's channel.
One dedicated connection (not a pool connection: a listening session must stay the same
session) LISTENs on that channel while the storage is open and breakers watch it; it
reconnects with backoff when lost, and tells the breakers when notifications stop and flow
again.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from ..._breaker.config import CircuitState
from ..._breaker.hub import ChangeFeed
from ..._breaker.shared import Action, SharedPolicy, SharedState, Task, Watcher, breaker_channel
from ..base import storage_key
from .errors import driver_errors, one_line

__all__ = ["PostgresBreakerStore"]


def _state(row: tuple[Any, ...] | None, granted: int = 0) -> SharedState:
    if row is None:
        raise psycopg.DataError("a breaker function returned no row")
    return SharedState(CircuitState(row[0]), int(row[1]), float(row[2]) / 1000.0, granted)


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


class PostgresBreakerStore:
    """The breaker rows of one schema (see the module docstring).

    Args:
        schema: the storage's schema.
        pool: returns the storage's open pool (raises ``StorageClosedError`` otherwise).
    """

    def __init__(self, schema: str, pool: Callable[[], AsyncConnectionPool[Any]]) -> None:
        ident = sql.Identifier(schema)
        self.channel = breaker_channel(schema)
        self._pool = pool
        self._read_sql = sql.SQL("SELECT * FROM {}.breaker_state(%s)").format(ident)
        self._step_sql = sql.SQL(
            "SELECT * FROM {}.breaker_step(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        ).format(ident)
        self._feed = ChangeFeed(self._subscribe, describe=one_line)

    # -- lifecycle: the storage's ----------------------------------------------------------

    def start(self) -> None:
        """The storage opened: listen if breakers watch."""
        self._feed.start()

    async def stop(self) -> None:
        """The storage closes: stop listening and every background task."""
        await self._feed.stop()

    # -- BreakerStore ----------------------------------------------------------------------

    async def read(self, name: str) -> SharedState:
        """The row of ``name`` now."""
        self._feed.listen_if_watched()
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
        self._feed.listen_if_watched()
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

    def watch(self, name: str, watcher: Watcher) -> None:
        """Tell ``watcher`` of changes of ``name``; it hears ``connected()`` once listening."""
        self._feed.watch(storage_key(name), watcher)

    def unwatch(self, name: str, watcher: Watcher) -> None:
        """Stop telling ``watcher``."""
        self._feed.watchers.remove(storage_key(name), watcher)

    def spawn(self, work: Callable[[], Coroutine[Any, Any, None]]) -> Task | None:
        """Run ``work()`` until done, cancelled, or the storage closes."""
        return self._feed.tasks.spawn(work)

    # -- the listening connection ----------------------------------------------------------

    async def _subscribe(
        self, ready: Callable[[], None], deliver: Callable[[str | bytes], None]
    ) -> None:
        """LISTEN on one dedicated connection until it fails (see ``ChangeFeed``)."""
        conninfo, kwargs = await _connection_args(self._pool())
        conn = await psycopg.AsyncConnection.connect(conninfo, **kwargs, autocommit=True)
        async with conn:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
            ready()
            async for notice in conn.notifies():
                deliver(notice.payload)
