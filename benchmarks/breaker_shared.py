"""Suite: how long an open takes to reach another instance of a shared breaker.

Two OS processes share a breaker through one PostgreSQL schema (``CircuitBreaker(shared=
PostgresStorage(...))``), then through one Redis prefix (``shared=RedisStorage(...)``). In
each sample the parent trips its breaker; the child records, with a state-change listener,
when its own breaker went OPEN; the parent then resets (which closes the shared row
everywhere) and waits for the child to close before the next sample. Both read
``time.monotonic()`` (one system-wide clock on Linux), so the difference is the propagation
time: the parent's step (``breaker_step()`` / the Lua script), NOTIFY or PUBLISH, the
child's LISTEN connection or subscription, and the adoption. The same is measured between
two storages of one process for reference, and, with ``shared_failures=True``, the time from
the failure that brings the instances' summed count to ``failure_threshold`` (each instance
below it alone) to the OPEN of the other instance: the report interval (0.1 s) plus the count
step and the notification. PostgreSQL state lives in a fresh temporary
database, Redis state under a prefix of its own (on the found server, then on a throwaway
three-master Cluster); all are removed at the end.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from typing import Any

from ._common import Context, Row, Table, at_most, percentile, stat

__all__ = ["run"]

SUITE = "breaker_shared"
_TARGET_MS = 100.0

CHILD = textwrap.dedent(
    """
    import asyncio, logging, sys, time
    import fineflow as ff

    logging.getLogger("fineflow").setLevel(logging.ERROR)

    def make_storage():
        kind, target, prefix = sys.argv[1:4]
        if kind == "postgres":
            return ff.PostgresStorage(target)
        return ff.RedisStorage(target, prefix=prefix, cluster=sys.argv[4:] == ["1"])

    async def main():
        async with make_storage() as storage:
            breaker = ff.CircuitBreaker("bench", reset_timeout=60.0, shared=storage)
            opened = asyncio.Queue()
            breaker.add_listener(
                "state_change",
                lambda e: opened.put_nowait(time.monotonic()) if e.state.value == "open" else None,
            )
            await breaker.sync()
            print("ready", flush=True)
            while True:
                at = await opened.get()
                print(f"open {at!r}", flush=True)
                while breaker.state is not ff.CircuitState.CLOSED:
                    await asyncio.sleep(0.001)
                print("closed", flush=True)

    asyncio.run(main())
    """
)


async def _line(child: subprocess.Popen[str]) -> str:
    assert child.stdout is not None
    return (await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 30)).strip()


Factory = Callable[[], Any]


async def _across_processes(make: Factory, child_args: list[str], samples: int) -> list[float]:
    import fineflow as ff

    out: list[float] = []
    async with make() as storage:
        breaker = ff.CircuitBreaker(
            "bench", failure_threshold=1, reset_timeout=60.0, shared=storage
        )
        await breaker.sync()
        with subprocess.Popen(  # noqa: ASYNC220 - starting it does not block; reads are in threads
            [sys.executable, "-c", CHILD, *child_args], stdout=subprocess.PIPE, text=True
        ) as child:
            try:
                if await _line(child) != "ready":
                    raise RuntimeError("the child process did not start")
                for _ in range(samples):
                    permit = breaker.try_acquire()
                    assert permit is not None
                    start = time.monotonic()
                    permit.failure()
                    _, at = (await _line(child)).split()
                    out.append((float(at) - start) * 1000.0)
                    breaker.reset()
                    if await _line(child) != "closed":
                        raise RuntimeError("the child did not close")
            finally:
                child.kill()
    return out


async def _in_process(make: Factory, samples: int) -> list[float]:
    import fineflow as ff

    out: list[float] = []
    async with make() as one, make() as two:
        a = ff.CircuitBreaker("bench-local", failure_threshold=1, reset_timeout=60.0, shared=one)
        b = ff.CircuitBreaker("bench-local", reset_timeout=60.0, shared=two)
        seen: list[float] = []
        b.add_listener(
            "state_change",
            lambda e: seen.append(time.monotonic()) if e.state is ff.CircuitState.OPEN else None,
        )
        await a.sync()
        await b.sync()
        for _ in range(samples):
            permit = a.try_acquire()
            assert permit is not None
            start = time.monotonic()
            permit.failure()
            while not seen:  # noqa: ASYNC110 - polls what the listener appends
                await asyncio.sleep(0.0005)
            out.append((seen.pop() - start) * 1000.0)
            a.reset()
            while b.state is not ff.CircuitState.CLOSED:  # noqa: ASYNC110 - set by the store
                await asyncio.sleep(0.0005)
    return out


async def _counted(make: Factory, samples: int) -> list[float]:
    """Two storages of one process; each breaker fails once (below its threshold of 2):
    from the second failure to the OPEN of the other breaker, through the shared count."""
    import fineflow as ff

    out: list[float] = []
    async with make() as one, make() as two:
        options: dict[str, Any] = {"failure_threshold": 2, "reset_timeout": 60.0}
        a = ff.CircuitBreaker("bench-counted", **options, shared=one, shared_failures=True)
        b = ff.CircuitBreaker("bench-counted", **options, shared=two, shared_failures=True)
        seen: list[float] = []
        a.add_listener(
            "state_change",
            lambda e: seen.append(time.monotonic()) if e.state is ff.CircuitState.OPEN else None,
        )
        await a.sync()
        await b.sync()
        for _ in range(samples):
            for breaker in (a, b):
                permit = breaker.try_acquire()
                assert permit is not None
                start = time.monotonic()
                permit.failure()
                if breaker is a:
                    await asyncio.sleep(0.3)  # a's failure reported before b's
            give_up = time.monotonic() + 10.0
            while not seen:
                if time.monotonic() > give_up:
                    raise RuntimeError("the counted failures never opened the other breaker")
                await asyncio.sleep(0.0005)
            out.append((seen.pop() - start) * 1000.0)
            a.reset()
            while b.state is not ff.CircuitState.CLOSED:  # noqa: ASYNC110 - set by the store
                await asyncio.sleep(0.0005)
    return out


def _row(name: str, values: list[float], target_ms: float = _TARGET_MS) -> Row:
    ordered = sorted(values)
    p50, p99 = percentile(ordered, 0.5), percentile(ordered, 0.99)
    return Row(
        name,
        stat(values),
        "ms",
        extra={"p50": f"{p50:.2f} ms", "p99": f"{p99:.2f} ms", "samples": str(len(values))},
        target=f"p99 <= {target_ms:g} ms",
        met=at_most(p99, target_ms),
    )


_COUNTED_TARGET_MS = 200.0  # the report interval (100 ms) + the open's propagation target


async def _postgres(ctx: Context, table: Table, samples: int) -> None:
    if ctx.postgres() is None:
        table.notes.append(f"no PostgreSQL: {ctx.pg_error}")
        return
    with ctx.database() as dsn:
        import fineflow as ff

        async with ff.PostgresStorage(dsn) as storage:
            await storage.migrate()

        def make() -> Any:
            return ff.PostgresStorage(dsn)

        across = await _across_processes(make, ["postgres", dsn, ""], samples)
        within = await _in_process(make, samples)
        counted = await _counted(make, samples)
    table.add(_row("PostgreSQL: another process (LISTEN/NOTIFY)", across))
    table.add(_row("PostgreSQL: another storage, same process", within))
    table.add(_row("PostgreSQL: counted failures (shared_failures=)", counted, _COUNTED_TARGET_MS))


async def _redis_rows(table: Table, label: str, url: str, samples: int, **opts: Any) -> None:
    import fineflow as ff
    from fineflow.testing.redis import delete_prefix, unique_prefix

    prefix = unique_prefix("ffbench")

    def make() -> Any:
        return ff.RedisStorage(url, prefix=prefix, **opts)

    try:
        cluster = "1" if opts.get("cluster") else ""
        across = await _across_processes(make, ["redis", url, prefix, cluster], samples)
        within = await _in_process(make, samples)
        counted = await _counted(make, samples)
    finally:
        if not cluster:  # (the Cluster is thrown away)
            await delete_prefix(url, prefix)
    table.add(_row(f"{label}: another process", across))
    table.add(_row(f"{label}: another storage, same process", within))
    table.add(_row(f"{label}: counted failures (shared_failures=)", counted, _COUNTED_TARGET_MS))


async def _redis(table: Table, samples: int) -> None:
    from fineflow import FineflowError
    from fineflow.testing.redis import find_redis, throwaway_cluster

    try:
        with find_redis() as server:
            await _redis_rows(table, "Redis (PUBLISH/SUBSCRIBE)", server.url, samples)
            table.notes.append(f"Redis: {server.source} server")
        with throwaway_cluster() as cluster:
            label = "Redis Cluster (SPUBLISH/SSUBSCRIBE)"
            await _redis_rows(table, label, cluster.url, samples, cluster=True)
            table.notes.append("Redis Cluster: a throwaway one, three masters")
    except FineflowError as exc:
        table.notes.append(f"no Redis: {exc}")


async def run(ctx: Context) -> list[Table]:
    """Propagation of an open, across processes and within one, on PostgreSQL and Redis."""
    table = Table(SUITE, "Shared breaker: time for an open to reach another instance")
    samples = max(5, ctx.profile.rounds * 15)
    await _postgres(ctx, table, samples)
    await _redis(table, samples)
    table.notes.append(
        "from the trip (parent) to the OPEN transition of the other breaker (its listener)"
    )
    return [table]
