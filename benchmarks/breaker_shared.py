"""Suite: how long an open takes to reach another instance of a shared breaker.

Two OS processes share a breaker through one PostgreSQL schema (``CircuitBreaker(shared=
PostgresStorage(...))``). In each sample the parent trips its breaker; the child records,
with a state-change listener, when its own breaker went OPEN; the parent then resets (which
closes the shared row everywhere) and waits for the child to close before the next sample.
Both read ``time.monotonic()`` (one system-wide clock on Linux), so the difference is the
propagation time: the parent's ``breaker_step()``, NOTIFY, the child's LISTEN connection,
and the adoption. The same is measured between two storages of one process for reference.
Everything lives in a fresh temporary database, dropped at the end.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time

from ._common import Context, Row, Table, at_most, percentile, stat

__all__ = ["run"]

SUITE = "breaker_shared"
_TARGET_MS = 100.0

CHILD = textwrap.dedent(
    """
    import asyncio, logging, sys, time
    import fineflow as ff

    logging.getLogger("fineflow").setLevel(logging.ERROR)

    async def main():
        async with ff.PostgresStorage(sys.argv[1]) as storage:
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


async def _across_processes(dsn: str, samples: int) -> list[float]:
    import fineflow as ff

    out: list[float] = []
    async with ff.PostgresStorage(dsn) as storage:
        breaker = ff.CircuitBreaker(
            "bench", failure_threshold=1, reset_timeout=60.0, shared=storage
        )
        await breaker.sync()
        with subprocess.Popen(  # noqa: ASYNC220 - starting it does not block; reads are in threads
            [sys.executable, "-c", CHILD, dsn], stdout=subprocess.PIPE, text=True
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


async def _in_process(dsn: str, samples: int) -> list[float]:
    import fineflow as ff

    out: list[float] = []
    async with ff.PostgresStorage(dsn) as one, ff.PostgresStorage(dsn) as two:
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


def _row(name: str, values: list[float]) -> Row:
    ordered = sorted(values)
    p50, p99 = percentile(ordered, 0.5), percentile(ordered, 0.99)
    return Row(
        name,
        stat(values),
        "ms",
        extra={"p50": f"{p50:.2f} ms", "p99": f"{p99:.2f} ms", "samples": str(len(values))},
        target=f"p99 <= {_TARGET_MS:g} ms",
        met=at_most(p99, _TARGET_MS),
    )


async def run(ctx: Context) -> list[Table]:
    """Propagation of an open, across processes and within one, on PostgreSQL."""
    table = Table(SUITE, "Shared breaker: time for an open to reach another instance")
    if ctx.postgres() is None:
        table.notes.append(f"no PostgreSQL: {ctx.pg_error}")
        return [table]
    samples = max(5, ctx.profile.rounds * 15)
    with ctx.database() as dsn:
        import fineflow as ff

        async with ff.PostgresStorage(dsn) as storage:
            await storage.migrate()
        across = await _across_processes(dsn, samples)
        within = await _in_process(dsn, samples)
    table.add(_row("another process (LISTEN/NOTIFY)", across))
    table.add(_row("another storage, same process", within))
    table.notes.append(
        "from the trip (parent) to the OPEN transition of the other breaker (its listener)"
    )
    return [table]
