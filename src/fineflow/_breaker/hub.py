"""The parts every ``BreakerStore`` shares: its watchers and its background tasks.

A store adapter (PostgreSQL, Redis, memory) keeps one ``Watchers`` and one
``BackgroundTasks``: the first says a notification to the breakers of its name, the second
runs the breakers' background work and the store's listener until the storage closes.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import Callable, Coroutine
from typing import Any

from .config import CircuitState
from .shared import SharedState, Watcher

__all__ = ["BackgroundTasks", "Watchers", "decode_notice", "encode_notice"]


def encode_notice(name: str, state: SharedState) -> str:
    """A change of the row of ``name`` as a notification payload (JSON, as PostgreSQL's
    ``breaker_step`` writes it)."""
    return json.dumps(
        {
            "name": name,
            "state": state.state.value,
            "generation": state.generation,
            "open_ms": state.open_for * 1000.0,
        }
    )


def decode_notice(payload: str | bytes) -> tuple[str, SharedState] | None:
    """``(name, state)`` of a notification payload; ``None`` if it is not one."""
    try:
        data = json.loads(payload)
        state = SharedState(
            CircuitState(data["state"]), int(data["generation"]), float(data["open_ms"]) / 1000
        )
        return str(data["name"]), state
    except (ValueError, KeyError, TypeError):
        return None


class Watchers:
    """The watchers of each name, held weakly (a dropped breaker stops watching)."""

    def __init__(self) -> None:
        self._by_name: dict[str, weakref.WeakSet[Watcher]] = {}

    def add(self, name: str, watcher: Watcher) -> None:
        """Call ``watcher`` on changes of ``name``."""
        self._by_name.setdefault(name, weakref.WeakSet()).add(watcher)

    def remove(self, name: str, watcher: Watcher) -> None:
        """Stop calling ``watcher``."""
        watchers = self._by_name.get(name)
        if watchers is not None:
            watchers.discard(watcher)
            if not watchers:
                del self._by_name[name]

    def __bool__(self) -> bool:
        return any(self._by_name.values())

    def changed(self, name: str, state: SharedState) -> None:
        """Tell the watchers of ``name``."""
        for watcher in list(self._by_name.get(name, ())):
            watcher.changed(state)

    def connected(self) -> None:
        """Tell every watcher that notifications flow (again)."""
        for watcher in self._all():
            watcher.connected()

    def disconnected(self, reason: str) -> None:
        """Tell every watcher that notifications stopped."""
        for watcher in self._all():
            watcher.disconnected(reason)

    def _all(self) -> list[Watcher]:
        return [w for watchers in list(self._by_name.values()) for w in list(watchers)]


class BackgroundTasks:
    """asyncio tasks a store owns: started by ``spawn``, cancelled and awaited by ``stop``."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self.stopped = False

    def spawn(self, work: Callable[[], Coroutine[Any, Any, None]]) -> asyncio.Task[None] | None:
        """Run ``work()`` as a task; ``None`` if stopped or no event loop runs here."""
        if self.stopped:
            return None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        task = loop.create_task(work())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def stop(self) -> None:
        """Cancel every task and wait for them; ``spawn`` refuses from now on."""
        self.stopped = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
