"""Shared circuit-breaker state in PostgreSQL: the ``BreakerStore`` of a ``PostgresStorage``.

Rows live in ``{schema}.breakers`` (migration 3). A step is one call of
``breaker_step()`` on a pool connection; it NOTIFYs every change on the schema's channel.
One dedicated connection (not a pool connection: a listening session must stay the same
session) LISTENs on that channel while the storage is open and breakers watch it; it
reconnects with backoff when lost, and tells the breakers when notifications stop and flow
again.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from ..._breaker.config import CircuitState
from ..._breaker.hub import BackgroundTasks, Watchers, decode_notice
from ..._breaker.shared import Action, SharedPolicy, SharedState, Task, Watcher, breaker_channel
from ..base import storage_key
from .errors import driver_errors, one_line

__all__ = ["PostgresBreakerStore"]

logger = logging.getLogger("fineflow.storage")

_FIRST_RETRY, _LAST_RETRY = 0.05, 5.0


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
        self._watchers = Watchers()
        self._tasks = BackgroundTasks()
        self._open = False
        self._listener: Task | None = None
        self.listening = False

    # -- lifecycle: the storage's ----------------------------------------------------------

    def start(self) -> None:
        """The storage opened: listen if breakers watch."""
        self._open = True
        self._listen_if_watched()

    async def stop(self) -> None:
        """The storage closes: stop listening and every background task."""
        self._open = False
        await self._tasks.stop()

    # -- BreakerStore ----------------------------------------------------------------------

    async def read(self, name: str) -> SharedState:
        """The row of ``name`` now."""
        self._listen_if_watched()  # watchers made outside the event loop could not start it
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
        self._listen_if_watched()
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
        self._watchers.add(storage_key(name), watcher)
        if self.listening:
            watcher.connected()
        else:
            self._listen_if_watched()

    def unwatch(self, name: str, watcher: Watcher) -> None:
        """Stop telling ``watcher``."""
        self._watchers.remove(storage_key(name), watcher)

    def spawn(self, work: Callable[[], Coroutine[Any, Any, None]]) -> Task | None:
        """Run ``work()`` until done, cancelled, or the storage closes."""
        return self._tasks.spawn(work)

    # -- the listening connection ----------------------------------------------------------

    def _listen_if_watched(self) -> None:
        if self._open and self._listener is None and self._watchers:
            self._listener = self._tasks.spawn(self._listen)

    async def _listen(self) -> None:
        delay = _FIRST_RETRY
        try:
            while True:
                reason, listened = await self._listen_once()
                self._watchers.disconnected(reason)
                delay = _FIRST_RETRY if listened else min(delay * 2, _LAST_RETRY)
                await asyncio.sleep(delay)
        finally:
            self._listener = None

    async def _listen_once(self) -> tuple[str, bool]:
        """Listen until the connection fails; return why, and whether it listened at all."""
        listened = False
        try:
            conninfo, kwargs = await _connection_args(self._pool())
            conn = await psycopg.AsyncConnection.connect(conninfo, **kwargs, autocommit=True)
            async with conn:
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                self.listening = listened = True
                self._watchers.connected()
                async for notice in conn.notifies():
                    decoded = decode_notice(notice.payload)
                    if decoded is not None:
                        self._watchers.changed(*decoded)
        except Exception as exc:
            return f"listening for breaker changes failed: {one_line(exc)}", listened
        finally:
            self.listening = False
        return "the listening connection closed", listened
