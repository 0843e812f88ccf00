"""Helpers for the shared-breaker tests: several "instances" (each its own storage object,
so its own connections) on one store, and bounded polling for what happens in the
background (notifications, the breakers' workers)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, Protocol

import anyio
import anyio.to_thread
import pytest

from fineflow import CircuitBreaker, CircuitState, MemoryStorage, PostgresStorage, RedisStorage
from fineflow._breaker.shared import (
    Action,
    BreakerStore,
    SharedPolicy,
    SharedState,
    Tally,
    Task,
    Watcher,
)
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


class DelegatingStore:
    """A real ``BreakerStore`` behind another object: the tests' stores in front of one
    subclass it and change what they need (fail, wait, count what is sent)."""

    def __init__(self, inner: BreakerStore) -> None:
        self.inner = inner

    async def read(self, name: str) -> SharedState:
        return await self.inner.read(name)

    async def step(self, name: str, action: Action, policy: SharedPolicy, **kw: Any) -> SharedState:
        return await self.inner.step(name, action, policy, **kw)

    async def count(self, name: str, tally: Tally, policy: SharedPolicy, **kw: Any) -> SharedState:
        return await self.inner.count(name, tally, policy, **kw)

    def watch(self, name: str, watcher: Watcher) -> None:
        self.inner.watch(name, watcher)

    def unwatch(self, name: str, watcher: Watcher) -> None:
        self.inner.unwatch(name, watcher)

    def spawn(self, work: Callable[[], Coroutine[Any, Any, None]]) -> Task | None:
        return self.inner.spawn(work)


class Switchable(DelegatingStore):
    """A real store that can be taken down: while ``down`` every read, step and count
    fails; ``hold[action]`` (an event) makes steps of that action wait for it; ``sent``
    lists the actions of the steps sent."""

    def __init__(self, inner: BreakerStore) -> None:
        super().__init__(inner)
        self.down = False
        self.hold: dict[Action, anyio.Event] = {}
        self.sent: list[Action] = []

    def _check(self) -> None:
        if self.down:
            raise OSError("store down")

    async def read(self, name: str) -> SharedState:
        self._check()
        return await super().read(name)

    async def step(self, name: str, action: Action, policy: SharedPolicy, **kw: Any) -> SharedState:
        self._check()
        if action in self.hold:
            await self.hold[action].wait()
        self.sent.append(action)
        return await super().step(name, action, policy, **kw)

    async def count(self, name: str, tally: Tally, policy: SharedPolicy, **kw: Any) -> SharedState:
        self._check()
        return await super().count(name, tally, policy, **kw)


class Sharing:
    """A storage whose breaker store is ``store`` (what ``shared=`` takes)."""

    def __init__(self, store: BreakerStore) -> None:
        self.store = store

    def breaker_store(self) -> BreakerStore:
        return self.store


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


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    import fineflow as ff

    def make_storage():
        kind, target, extra = sys.argv[1:4]
        if kind == "postgres":
            return ff.PostgresStorage(target, schema=extra)
        return ff.RedisStorage(target, prefix=extra)

    async def main():
        async with make_storage() as storage:
            breaker = ff.CircuitBreaker("upstream", reset_timeout=30.0, shared=storage)
            assert await breaker.sync()
            print("ready", flush=True)
            while breaker.state is not ff.CircuitState.OPEN:
                await asyncio.sleep(0.001)
            print("open", breaker.retry_after(), flush=True)

    asyncio.run(main())
    """
)


async def an_open_reaches_a_child(storage: Any, child_args: list[str]) -> None:
    """Trip breaker ``upstream`` on ``storage``; a child process (``CHILD`` with
    ``child_args``: the kind of store, its URL, schema or prefix) sees it open with the
    same deadline."""
    from fineflow import CircuitBreaker

    breaker = CircuitBreaker("upstream", failure_threshold=1, reset_timeout=30.0, shared=storage)
    await breaker.sync()
    with subprocess.Popen(  # noqa: ASYNC220 - starting it does not block; reads are in threads
        [sys.executable, "-c", CHILD, *child_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as child:
        try:
            assert child.stdout is not None
            with anyio.fail_after(60):
                line = await anyio.to_thread.run_sync(child.stdout.readline)
            assert line.strip() == "ready", child.stderr.read() if child.stderr else ""
            permit = breaker.try_acquire()
            assert permit is not None
            permit.failure()
            with anyio.fail_after(30):
                line = await anyio.to_thread.run_sync(child.stdout.readline)
            word, retry_after = line.split()
            assert word == "open" and 25.0 < float(retry_after) <= 30.0
            assert await anyio.to_thread.run_sync(child.wait, 30) == 0
        finally:
            child.kill()


async def the_store_going_away_and_coming_back(
    storages: Callable[[], Any],
    stop: Callable[[], object],
    start: Callable[[], object],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two instances on the store ``storages`` makes; ``stop()`` it: each goes on with its
    local state (one trips, its local half-open budget applies) and says so once;
    ``start()`` it: both say once that they rejoined, and the open made meanwhile reaches
    the other."""
    from fineflow import CircuitBreaker

    open_, closed = CircuitState.OPEN, CircuitState.CLOSED
    async with opened(storages, 2) as (one, two):
        options = {"failure_threshold": 1, "reset_timeout": 0.2, "half_open_max_calls": 2}
        a = CircuitBreaker("api", **options, shared=one)  # type: ignore[arg-type]
        b = CircuitBreaker("api", **options, shared=two)  # type: ignore[arg-type]
        assert await a.sync() and await b.sync()

        await anyio.to_thread.run_sync(stop)
        permit = a.try_acquire()
        assert permit is not None
        permit.failure()  # decided here; nothing raises
        assert a.state is open_ and b.state is closed
        await eventually(lambda: a.retry_after() == 0.0, "the local deadline")
        trials = [a.try_acquire() for _ in range(5)]
        assert sum(t is not None for t in trials) == 2, "the local budget while the store is down"

        await anyio.to_thread.run_sync(start)
        await in_state(b, open_, "the open made while the store was down, published on rejoining")
        await eventually(
            lambda: sum("available again" in r.getMessage() for r in caplog.records) >= 2,
            "both say that they rejoined",
            within=30.0,
        )
        messages = [r.getMessage() for r in caplog.records]
        assert sum("shared state unavailable" in m for m in messages) == 2  # once each
        assert sum("available again" in m for m in messages) == 2
        for t in trials:
            if t is not None:
                t.success()
