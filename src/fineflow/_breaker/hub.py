"""The parts every ``BreakerStore`` shares: its watchers, its background tasks, and the
one subscription to the store's notifications.

A store adapter (PostgreSQL, Redis, memory) keeps one ``Watchers`` and one
``BackgroundTasks``: the first says a notification to the breakers of its name, the second
runs the breakers' background work and the store's listener until the storage closes. A
store that hears of changes over the network (PostgreSQL LISTEN, Redis pub/sub) is a
``ListeningStore``, which owns both and runs the store's subscription while the storage is
open and breakers watch, restarting it with backoff when it is lost.
"""

from __future__ import annotations

import abc
import asyncio
import json
import weakref
from collections.abc import Callable, Coroutine
from typing import Any

from .config import CircuitState
from .shared import SharedState, Task, Watcher

__all__ = [
    "BackgroundTasks",
    "ListeningStore",
    "Watchers",
    "decode_notice",
    "encode_notice",
]

_FIRST_RETRY, _LAST_RETRY = 0.05, 5.0

#: A store's subscription: ``subscribe(ready, deliver)`` connects and subscribes, calls
#: ``ready()`` once notifications flow, then ``deliver(payload)`` for each one; it returns
#: when the connection closes and raises when it fails.
Subscribe = Callable[[Callable[[], None], Callable[[str | bytes], None]], Coroutine[Any, Any, None]]


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


class ListeningStore(abc.ABC):
    """The half of a ``BreakerStore`` that a store hearing of changes over the network
    shares: its watchers, its background tasks (``spawn``) and its one subscription, run
    while the storage is open and breakers watch, restarted with backoff when lost. A
    subclass adds ``read`` and ``step``, and gives the subscription (``subscribe``).

    Args:
        key: the name a breaker's row is stored under (notifications carry it).
        describe: ``exc`` as a short text, for the reason told to the watchers.
    """

    def __init__(
        self, *, key: Callable[[str], str], describe: Callable[[BaseException], str]
    ) -> None:
        self._key = key
        self._describe = describe
        self._watchers = Watchers()
        self._tasks = BackgroundTasks()
        self._open = False
        self._listener: Task | None = None
        self.listening = False

    @abc.abstractmethod
    async def subscribe(
        self, ready: Callable[[], None], deliver: Callable[[str | bytes], None]
    ) -> None:
        """Connect and subscribe, call ``ready()`` once notifications flow, then
        ``deliver(payload)`` for each; return when the connection closes, raise when it
        fails."""

    def start(self) -> None:
        """The storage opened: subscribe if breakers watch."""
        self._open = True
        self.listen_if_watched()

    async def stop(self) -> None:
        """The storage closes: stop the subscription and every background task."""
        self._open = False
        await self._tasks.stop()

    def watch(self, name: str, watcher: Watcher) -> None:
        """Tell ``watcher`` of changes of ``name``; it hears ``connected()`` once
        notifications flow."""
        self._watchers.add(self._key(name), watcher)
        if self.listening:
            watcher.connected()
        else:
            self.listen_if_watched()

    def unwatch(self, name: str, watcher: Watcher) -> None:
        """Stop telling ``watcher``."""
        self._watchers.remove(self._key(name), watcher)

    def spawn(self, work: Callable[[], Coroutine[Any, Any, None]]) -> Task | None:
        """Run ``work()`` until done, cancelled, or the storage closes."""
        return self._tasks.spawn(work)

    def listen_if_watched(self) -> None:
        """Start the subscription if the storage is open, breakers watch, and it is not
        running (watchers made outside the event loop could not start it)."""
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

    def _ready(self) -> None:
        self.listening = True
        self._watchers.connected()

    def _deliver(self, payload: str | bytes) -> None:
        decoded = decode_notice(payload)
        if decoded is not None:
            self._watchers.changed(*decoded)

    async def _listen_once(self) -> tuple[str, bool]:
        """Listen until the subscription ends; return why, and whether it listened at all."""
        try:
            await self.subscribe(self._ready, self._deliver)
        except Exception as exc:
            reason = f"listening for breaker changes failed: {self._describe(exc)}"
        else:
            reason = "the listening connection closed"
        finally:
            listened, self.listening = self.listening, False
        return reason, listened
