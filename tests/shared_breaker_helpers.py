"""Helpers for the shared-breaker tests: several "instances" (each its own storage object,
so its own connections) on one store, and bounded polling for what happens in the
background (notifications, the breakers' workers)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Protocol

import anyio
import pytest

from fineflow import CircuitBreaker, CircuitState, MemoryStorage, PostgresStorage, RedisStorage
from fineflow.testing.redis import delete_prefix, shared_cluster, shared_redis, unique_prefix

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


#: The stores every shared-breaker test runs on.
STORES = ["memory", "postgres", "redis", "redis_cluster"]


@contextlib.contextmanager
def redis_instances(*, cluster: bool = False) -> Iterator[Callable[[], RedisStorage]]:
    """A factory of ``RedisStorage`` instances sharing one prefix of their own, on the
    session's Redis server or its throwaway Cluster; the prefix's keys are removed after."""
    url = shared_cluster().url if cluster else shared_redis().url
    prefix = unique_prefix("ffbreakers")
    try:
        yield lambda: RedisStorage(url, prefix=prefix, cluster=cluster)
    finally:
        if not cluster:  # (the Cluster is thrown away)
            asyncio.run(delete_prefix(url, prefix))


def store_instances(request: pytest.FixtureRequest, store: str) -> Iterator[Callable[[], Any]]:
    """A factory of storages that are instances of one service on the store named by
    ``store`` (one of ``STORES``; in memory: breakers sharing one ``MemoryStorage``)."""
    if store == "memory":
        storage = MemoryStorage()
        yield lambda: storage
    elif store == "postgres":
        dsn: str = request.getfixturevalue("pg_dsn")
        yield postgres_instances(dsn, request.getfixturevalue("pg_schema"))
    elif store in ("redis", "redis_cluster"):
        with redis_instances(cluster=store == "redis_cluster") as factory:
            yield factory
    else:
        raise AssertionError(store)


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
