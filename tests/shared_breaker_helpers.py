"""Helpers for the shared-breaker tests: several "instances" (each its own storage object,
so its own connections) on one store, and bounded polling for what happens in the
background (notifications, the breakers' workers)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import anyio

from fineflow import CircuitBreaker, CircuitState, PostgresStorage

#: Bound on waiting for background work (never a speed assertion: a generous ceiling).
PATIENCE = 5.0


class Storage(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    def breaker_store(self) -> Any: ...


async def eventually(check: Callable[[], bool], what: str, *, within: float = PATIENCE) -> None:
    """Poll ``check`` until true; fail with ``what`` after ``within`` seconds."""
    with anyio.move_on_after(within):
        # Polling, not an Event: the condition changes in the store's tasks and callbacks.
        while not check():  # noqa: ASYNC110
            await anyio.sleep(0.002)
        return
    raise AssertionError(f"timed out waiting for: {what}")


async def in_state(breaker: CircuitBreaker, state: CircuitState, what: str = "") -> None:
    await eventually(lambda: breaker.state is state, what or f"{breaker!r} to be {state.name}")


def postgres_instances(dsn: str, schema: str) -> Callable[[], PostgresStorage]:
    return lambda: PostgresStorage(dsn, schema=schema)


@contextlib.asynccontextmanager
async def opened(
    factory: Callable[[], Any], n: int, *, migrate: bool = True
) -> AsyncIterator[list[Any]]:
    """``n`` storages from ``factory``, open (the first one migrates, if ``migrate``)."""
    async with contextlib.AsyncExitStack() as stack:
        storages = []
        for i in range(n):
            storage = factory()
            await storage.open()
            stack.push_async_callback(storage.close)
            if i == 0 and migrate:
                await storage.migrate()
            storages.append(storage)
        yield storages
