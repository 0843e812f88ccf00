"""Redis decisions per second and latency: fineflow's RedisStorage against limits' async
Redis storage (moving and fixed window, redis-py) and against PostgresStorage, same run,
interleaved, as ratios; and a lone decision against one raw EVALSHA round trip; and the
cost of the per-minute stats (the default) against the same storage with them off.

Concurrency 1/16/64, keys spread over 10,000 or one hot key. The Redis server is found as
the tests find it (``FINEFLOW_TEST_REDIS_URL``, the local 127.0.0.1:6379, else a throwaway
``redis-server``); every contender writes under a prefix of its own, deleted at the end.

Usage::

    python -m benchmarks.redis_storage [--smoke | --quick | --full] [--json PATH]

(or as a suite: ``run(ctx)`` returns its tables, like the suites of ``python -m benchmarks``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from ._common import (
    PROFILES,
    Context,
    Row,
    Table,
    at_least,
    at_most,
    interleave,
    machine_info,
    optional,
    ratios,
    stat,
)
from .storage import _drive

__all__ = ["main", "run"]

SUITE = "redis"
QUOTA = "1000000000/second"  # never exhausted: every decision writes

NO_STATS = "fineflow RedisStorage, stats off"

Decide = Callable[[str], Awaitable[Any]]
Opener = Callable[[], contextlib.AbstractAsyncContextManager[Decide]]


def _fineflow(url: str, prefix: str, *, stats: bool = True) -> Opener:
    from fineflow import Hit, Quota, RedisStorage

    quota = Quota.parse(QUOTA)
    flush_every = 5.0 if stats else None

    @contextlib.asynccontextmanager
    async def open_() -> AsyncIterator[Decide]:
        async with RedisStorage(url, prefix=prefix, stats_flush_every=flush_every) as storage:

            async def decide(key: str) -> Any:
                return await storage.decide("gcra", [Hit(key, quota, 1, "bench")])

            yield decide

    return open_


def _raw_evalsha(url: str, prefix: str) -> Opener:
    """The floor of a lone decision: the same script call, straight through redis-py."""
    from redis.asyncio import Redis

    from fineflow import Quota
    from fineflow._storage.redis.scripts import DECIDE, Names, decide_args

    quota = Quota.parse(QUOTA)
    names = Names(prefix)

    @contextlib.asynccontextmanager
    async def open_() -> AsyncIterator[Decide]:
        client = Redis.from_url(url)
        await client.script_load(DECIDE.text)
        args = decide_args("gcra", "bench", "", quota, 1)[0]

        async def decide(key: str) -> Any:
            return await client.evalsha(DECIDE.sha, 1, names.key(key), "gcra", "", 1, 1, *args)  # type: ignore[no-untyped-call]

        try:
            yield decide
        finally:
            await client.aclose()

    return open_


def _limits(url: str, prefix: str, strategy: str) -> Opener | None:
    strategies = optional("limits.aio.strategies")
    if strategies is None or optional("redis") is None:
        return None
    import limits
    from limits.aio.storage import RedisStorage as LimitsRedis

    item = limits.parse(QUOTA)
    cls = (
        strategies.MovingWindowRateLimiter
        if strategy == "moving"
        else strategies.FixedWindowRateLimiter
    )

    @contextlib.asynccontextmanager
    async def open_() -> AsyncIterator[Decide]:
        storage = LimitsRedis(
            "async+" + url, implementation="redispy", key_prefix=prefix, max_connections=64
        )
        limiter = cls(storage)

        async def decide(key: str) -> Any:
            return await limiter.hit(item, key)

        try:
            yield decide
        finally:
            await storage.bridge.storage.aclose()

    return open_


def _postgres(dsn: str) -> Opener:
    from fineflow import Hit, PostgresStorage, Quota

    quota = Quota.parse(QUOTA)

    @contextlib.asynccontextmanager
    async def open_() -> AsyncIterator[Decide]:
        async with PostgresStorage(dsn, schema="ff_redis_bench") as storage:
            await storage.pool.wait()

            async def decide(key: str) -> Any:
                return await storage.decide("gcra", [Hit(key, quota, 1, "bench")])

            yield decide

    return open_


async def _cell(
    ctx: Context,
    openers: dict[str, Opener],
    conc: int,
    mode: str,
    table: Table,
    targets: Table,
) -> None:
    profile = ctx.profile
    keys = [f"k{i}" for i in range(profile.spread_keys)] if mode == "spread" else ["hot"]
    details: dict[str, list[dict[str, Any]]] = {name: [] for name in openers}

    def measure(name: str) -> Callable[[], Awaitable[float]]:
        async def once() -> float:
            async with openers[name]() as decide:
                await _drive(decide, keys, conc, 0.1)  # warm up
                result = await _drive(decide, keys, conc, profile.storage_seconds)
            details[name].append(result)
            return float(result["rate"])

        return once

    results = await interleave({n: measure(n) for n in openers}, profile.storage_rounds)
    base = results["fineflow RedisStorage"]
    for name, rates in results.items():
        per = details[name]
        table.add(
            Row(
                f"c={conc} {mode} {name}",
                stat(rates),
                "/s",
                extra={
                    "p50 ms": stat([d["p50_ms"] for d in per]).text(),
                    "p99 ms": stat([d["p99_ms"] for d in per]).text(),
                },
                ratio=stat(ratios(base, rates)),
                raw={"concurrency": conc, "keys": mode, "rounds": per},
            )
        )
    peers = [results[n] for n in ("limits moving window", "limits fixed window") if n in results]
    if peers:
        faster = [max(r) for r in zip(*peers, strict=True)]
        r = stat(ratios(base, faster))
        goal = conc == 64 and mode == "spread"
        targets.add(
            Row(
                f"c={conc} {mode}: RedisStorage / the faster limits strategy (decisions/s)",
                r,
                "x",
                target=">= 3" if goal else "",
                met=at_least(r.median, 3.0) if goal else None,
            )
        )
    if NO_STATS in results:
        r = stat(ratios(base, results[NO_STATS]))
        targets.add(
            Row(f"c={conc} {mode}: RedisStorage with stats / without (decisions/s)", r, "x")
        )
    if "raw EVALSHA" in results:
        lone = [d["p50_ms"] for d in details["fineflow RedisStorage"]]
        raw = [d["p50_ms"] for d in details["raw EVALSHA"]]
        r = stat(ratios(lone, raw))
        targets.add(
            Row(
                f"c=1 {mode}: lone decision p50 / one raw EVALSHA round trip p50",
                r,
                "x",
                target="<= 1.3",
                met=at_most(r.median, 1.3),
            )
        )


async def run(ctx: Context) -> list[Table]:
    """The Redis decisions table and its targets."""
    from fineflow.testing.redis import delete_prefix, find_redis, unique_prefix

    tables: list[Table] = []
    table = Table(SUITE, "Redis decisions (GCRA, never exhausted)", "x RedisStorage / it")
    targets = Table(SUITE, "Redis targets (per-round ratios)")
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(find_redis())
        table.notes.append(f"Redis: {server.source} server")
        names = ("ff", "ff-no-stats", "raw", "moving", "fixed")
        prefixes = {name: unique_prefix("ffbench") for name in names}
        openers: dict[str, Opener] = {
            "fineflow RedisStorage": _fineflow(server.url, prefixes["ff"]),
            NO_STATS: _fineflow(server.url, prefixes["ff-no-stats"], stats=False),
        }
        for strategy in ("moving", "fixed"):
            opener = _limits(server.url, prefixes[strategy], strategy)
            if opener is not None:
                openers[f"limits {strategy} window"] = opener
        if len(openers) == 2:
            table.notes.append("limits (with redis-py) not installed: no peer")
        if ctx.postgres() is not None:
            dsn = stack.enter_context(ctx.database())
            from fineflow import PostgresStorage

            async with PostgresStorage(dsn, schema="ff_redis_bench", max_size=1) as pg:
                await pg.migrate()
            openers["fineflow PostgresStorage"] = _postgres(dsn)
        else:
            table.notes.append(f"no PostgreSQL ({ctx.pg_error})")
        try:
            for conc in ctx.profile.storage_concurrency:
                for mode in ("spread", "hot"):
                    cell = dict(openers)
                    if conc == 1:
                        cell["raw EVALSHA"] = _raw_evalsha(server.url, prefixes["raw"])
                    await _cell(ctx, cell, conc, mode, table, targets)
        finally:
            for prefix in prefixes.values():
                await delete_prefix(server.url, prefix)
    tables += [table, targets]
    return tables


def main(argv: list[str] | None = None) -> int:
    """Run this suite alone: print its tables, write JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.redis_storage")
    parser.add_argument("--smoke", dest="mode", action="store_const", const="smoke")
    parser.add_argument("--quick", dest="mode", action="store_const", const="quick")
    parser.add_argument("--full", dest="mode", action="store_const", const="full")
    parser.set_defaults(mode="quick")
    parser.add_argument(
        "--json", type=Path, default=Path(__file__).resolve().parent / "results" / "redis.json"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    ctx = Context(PROFILES[args.mode])
    started = time.perf_counter()
    try:
        tables = asyncio.run(run(ctx))
        info = machine_info(ctx)
    finally:
        ctx.close()
    for table in tables:
        print("\n" + table.render(), flush=True)
    report = {
        "mode": args.mode,
        "seconds": round(time.perf_counter() - started, 1),
        "machine": info,
        "tables": [t.to_json() for t in tables],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"\nwrote {args.json} ({report['seconds']}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
