"""Shared circuit-breaker state in process: the ``BreakerStore`` of a ``MemoryStorage``.

Breakers of one process that share a ``MemoryStorage`` share their state exactly as
instances sharing a database do, through the reference rules themselves
(``fineflow._breaker.shared.step_row``): fast tests of code that uses ``shared=``, and the
semantics the PostgreSQL and Redis stores are held to. Changes are told to the watchers
at once, synchronously.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from .._breaker.hub import BackgroundTasks, Watchers
from .._breaker.shared import (
    Action,
    SharedPolicy,
    SharedRow,
    SharedState,
    Tally,
    Task,
    Watcher,
    count_row,
    step_row,
)
from .._errors import StorageClosedError

__all__ = ["MemoryBreakerStore"]


class MemoryBreakerStore:
    """Breaker rows in a dict, on ``clock`` (seconds).

    Args:
        clock: the storage's clock, in seconds.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._rows: dict[str, SharedRow] = {}
        self._watchers = Watchers()
        self._tasks = BackgroundTasks()

    async def stop(self) -> None:
        """The storage closes: stop the background work; steps fail from now on."""
        await self._tasks.stop()

    def _check_open(self) -> None:
        if self._tasks.stopped:
            raise StorageClosedError("this MemoryStorage was closed; create a new one")

    async def read(self, name: str) -> SharedState:
        """The row of ``name`` now."""
        self._check_open()
        return self._rows.get(name, SharedRow()).seen_at(self._clock())

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
        """``step_row`` on the row of ``name``; watchers hear of a change at once."""
        self._check_open()
        now = self._clock()
        before = self._rows.get(name, SharedRow())
        after, granted = step_row(
            before, action, now, policy, generation=generation, want=want, shorten=shorten
        )
        self._rows[name] = after
        if after.generation != before.generation:
            self._watchers.changed(name, after.seen_at(now))
        return after.seen_at(now, granted)

    async def count(
        self,
        name: str,
        tally: Tally,
        policy: SharedPolicy,
        *,
        generation: int,
        shorten: float = 1.0,
    ) -> SharedState:
        """``count_row`` on the row of ``name``; watchers hear of an open at once."""
        self._check_open()
        now = self._clock()
        before = self._rows.get(name, SharedRow())
        after = count_row(before, tally, now, policy, generation=generation, shorten=shorten)
        self._rows[name] = after
        if after.generation != before.generation:
            self._watchers.changed(name, after.seen_at(now))
        return after.seen_at(now)

    def watch(self, name: str, watcher: Watcher) -> None:
        """Tell ``watcher`` of changes of ``name`` (and to read it now)."""
        self._watchers.add(name, watcher)
        if not self._tasks.stopped:
            watcher.connected()

    def unwatch(self, name: str, watcher: Watcher) -> None:
        """Stop telling ``watcher``."""
        self._watchers.remove(name, watcher)

    def spawn(self, work: Callable[[], Coroutine[Any, Any, None]]) -> Task | None:
        """Run ``work()`` until done, cancelled, or the storage closes."""
        return self._tasks.spawn(work)
