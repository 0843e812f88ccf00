"""Suite 3: rate-limit decisions per second and latency, PostgreSQL and memory storage.

PostgreSQL: fineflow's ``PostgresStorage`` (automatic coalescing) against a naive GCRA upsert,
one ``INSERT ... ON CONFLICT DO UPDATE`` per request through a psycopg
``AsyncConnectionPool``, and against the server's own ceiling for that same statement, measured
by ``pgbench`` (when on PATH). Concurrency 1/16/64, keys spread over 10,000 or one hot key,
logged tables, unlogged tables, and logged tables with ``synchronous_commit = off``. Each cell
interleaves its contenders round-robin; each contender opens its pool before its turn and
closes it after (untimed), so the server never sees more connections than one contender's.
Everything lives in a fresh temporary database, dropped at the end.

Memory: fineflow's ``MemoryStorage`` (through ``RateLimiter.hit``) against ``limits.aio``'s
memory storage with its moving-window and fixed-window strategies, and against the floor:
GCRA's arithmetic over a dict with none of the bookkeeping (``benchmarks._floors``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from ._common import (
    Context,
    Row,
    Table,
    at_least,
    at_most,
    interleave,
    optional,
    percentile,
    ratios,
    stat,
)
from ._floors import bare_gcra, bare_gcra_hit

__all__ = ["NaiveUpsert", "run"]

SUITE = "storage"
QUOTA = "1000000000/second"  # never exhausted: every decision writes
MEMORY_QUOTA = "1000/minute"
NAIVE_POOL_MAX = 16  # naive pool size cap (more connections only contend on 2 cores)

# The naive statement: GCRA in one upsert, clock from the server, one round trip.
# %(key)s is the key, %(iv)s the emission interval and %(tau)s the tolerance, in ns.
_NAIVE_TABLE = """
CREATE {unlogged} TABLE IF NOT EXISTS {schema}.naive (
    key text PRIMARY KEY,
    tat bigint NOT NULL
) WITH (fillfactor = 70)
"""
_NAIVE = """
INSERT INTO {schema}.naive AS b (key, tat)
VALUES ({key}, (extract(epoch FROM clock_timestamp()) * 1000000000)::bigint + {iv})
ON CONFLICT (key) DO UPDATE SET tat =
    CASE WHEN greatest(b.tat, EXCLUDED.tat - {iv}) + {iv} - {tau} <= EXCLUDED.tat - {iv}
         THEN greatest(b.tat, EXCLUDED.tat - {iv}) + {iv}
         ELSE b.tat END
RETURNING tat
"""

Decide = Callable[[str], Awaitable[Any]]
Opener = Callable[[], contextlib.AbstractAsyncContextManager[Decide]]


class NaiveUpsert:
    """The naive contender: one prepared upsert per decision through a connection pool."""

    def __init__(self, dsn: str, schema: str, *, unlogged: bool, sync_off: bool) -> None:
        from psycopg import sql

        self.dsn = dsn
        self.schema = schema
        self.unlogged = unlogged
        self.sync_off = sync_off
        ident = sql.Identifier(schema)
        self.statement = sql.SQL(_NAIVE).format(
            schema=ident,
            key=sql.Placeholder("key"),
            iv=sql.SQL("%(iv)s::bigint"),
            tau=sql.SQL("%(tau)s::bigint"),
        )
        self.table = sql.SQL(_NAIVE_TABLE).format(
            schema=ident, unlogged=sql.SQL("UNLOGGED" if unlogged else "")
        )

    def pgbench_script(self, hot: bool, keys: int, interval: int, tau: int) -> str:
        """The same statement as a pgbench script (``-M prepared``)."""
        key_line = "\\set k 0" if hot else f"\\set k random(0, {keys - 1})"
        body = _NAIVE.format(
            schema=f'"{self.schema}"',
            key="('k' || :k::text)",
            iv=f"{interval}::bigint",
            tau=f"{tau}",
        )
        return key_line + "\n" + " ".join(body.split()) + ";\n"

    async def migrate(self) -> None:
        """Create the schema and table."""
        import psycopg
        from psycopg import sql

        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            await conn.execute(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema))
            )
            await conn.execute(self.table)

    @contextlib.asynccontextmanager
    async def open(self, size: int, interval: int, tau: int) -> AsyncIterator[Decide]:
        """A warm pool of ``size`` connections; yields ``decide(key)``."""
        from psycopg_pool import AsyncConnectionPool

        options = "-c synchronous_commit=off" if self.sync_off else ""
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            self.dsn,
            min_size=size,
            max_size=size,
            kwargs={"autocommit": True, "options": options},
            open=False,
        )
        await pool.open(wait=True)
        statement = self.statement

        async def decide(key: str) -> Any:
            async with pool.connection() as conn:
                cur = await conn.execute(
                    statement, {"key": key, "iv": interval, "tau": tau}, prepare=True
                )
                return await cur.fetchone()

        try:
            yield decide
        finally:
            await pool.close()


async def _drive(
    decide: Decide, keys: Sequence[str], concurrency: int, seconds: float
) -> dict[str, Any]:
    """Run ``concurrency`` tasks deciding random keys for ``seconds``; rate and latency."""
    latencies: list[int] = []
    deadline = time.perf_counter_ns() + int(seconds * 1e9)
    n = len(keys)

    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        clock = time.perf_counter_ns
        record = latencies.append
        while True:
            start = clock()
            if start >= deadline:
                return
            await decide(keys[rng.randrange(n)] if n > 1 else keys[0])
            record(clock() - start)

    start = time.perf_counter_ns()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = (time.perf_counter_ns() - start) / 1e9
    latencies.sort()
    return {
        "rate": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 0.5) / 1e6,
        "p99_ms": percentile(latencies, 0.99) / 1e6,
        "decisions": len(latencies),
    }


async def _pgbench(
    dsn: str, script: str, clients: int, seconds: int, sync_off: bool
) -> dict[str, Any]:
    import psycopg

    exe = shutil.which("pgbench")
    assert exe is not None
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    env = dict(os.environ)
    for key, var in (
        ("host", "PGHOST"),
        ("port", "PGPORT"),
        ("user", "PGUSER"),
        ("password", "PGPASSWORD"),
        ("dbname", "PGDATABASE"),
    ):
        if params.get(key) is not None:
            env[var] = str(params[key])
    if sync_off:
        env["PGOPTIONS"] = "-c synchronous_commit=off"
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(script)
        path = f.name
    cmd = [exe, "-n", "-M", "prepared", "-f", path, "-c", str(clients)]
    cmd += ["-j", str(min(2, clients)), "-T", str(seconds)]
    proc = await asyncio.create_subprocess_exec(
        *cmd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=seconds + 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        os.unlink(path)
    text = out.decode(errors="replace")
    tps = re.search(r"tps = ([0-9.]+)", text)
    lat = re.search(r"latency average = ([0-9.]+) ms", text)
    if proc.returncode != 0 or tps is None:
        raise RuntimeError(f"pgbench failed: {err.decode(errors='replace').strip()[:500]}")
    return {
        "rate": float(tps.group(1)),
        "p50_ms": float("nan"),
        "p99_ms": float("nan"),
        "avg_ms": float(lat.group(1)) if lat else float("nan"),
    }


_DURABILITY = {
    "logged": {"unlogged": False, "sync_off": False},
    "unlogged": {"unlogged": True, "sync_off": False},
    "sync_off": {"unlogged": False, "sync_off": True},
}


class _Cell:
    """One (durability, concurrency) comparison: its contenders, interleaved."""

    def __init__(self, ctx: Context, dsn: str, durability: str, conc: int) -> None:
        from fineflow import Quota

        self.profile = ctx.profile
        self.dsn = dsn
        self.durability = durability
        self.opts = _DURABILITY[durability]
        self.conc = conc
        self.quota = Quota.parse(QUOTA)
        self.interval = self.quota.emission_interval_ns
        self.tau = self.quota.capacity * self.interval
        self.keys = [f"k{i}" for i in range(self.profile.spread_keys)]
        self.naive = NaiveUpsert(dsn, f"naive_{durability}", **self.opts)
        self.schema = f"ff_{durability}"
        self.details: dict[str, list[dict[str, Any]]] = {}
        self.modes: dict[str, str] = {}

    def fineflow(self, coalesce: bool, pool: int | None) -> Opener:
        """fineflow's storage; ``pool=None`` keeps its default pool (1 to 10, grows on demand)."""
        from fineflow import Hit, PostgresStorage

        quota = self.quota

        @contextlib.asynccontextmanager
        async def open_() -> AsyncIterator[Decide]:
            storage = PostgresStorage(
                self.dsn,
                schema=self.schema,
                unlogged=self.opts["unlogged"],
                synchronous_commit=not self.opts["sync_off"],
                coalesce=coalesce,
                **({} if pool is None else {"min_size": pool, "max_size": pool}),
            )
            async with storage:
                await storage.pool.wait()

                async def decide(key: str) -> Any:
                    return await storage.decide("gcra", [Hit(key, quota, 1, "bench")])

                yield decide

        return open_

    def naive_opener(self) -> Opener:
        size = min(self.conc, NAIVE_POOL_MAX)
        return lambda: self.naive.open(size, self.interval, self.tau)

    def measure(
        self, name: str, opener: Opener | None, mode: str
    ) -> Callable[[], Awaitable[float]]:
        self.details[name] = []
        self.modes[name] = mode
        keys = self.keys if mode == "spread" else self.keys[:1]

        async def once() -> float:
            if opener is None:
                script = self.naive.pgbench_script(
                    mode == "hot", len(self.keys), self.interval, self.tau
                )
                result = await _pgbench(
                    self.dsn, script, self.conc, self.profile.pgbench_seconds, self.opts["sync_off"]
                )
            else:
                async with opener() as decide:
                    await _drive(decide, keys, self.conc, 0.1)  # warm up (and grow the pool)
                    result = await _drive(decide, keys, self.conc, self.profile.storage_seconds)
            self.details[name].append(result)
            return float(result["rate"])

        return once

    async def run(self, table: Table, targets: Table, pgbench: bool) -> None:
        contenders: dict[str, Callable[[], Awaitable[float]]] = {}
        for mode in ("spread", "hot"):
            contenders[f"fineflow {mode}"] = self.measure(
                f"fineflow {mode}", self.fineflow(True, None), mode
            )
            contenders[f"naive upsert {mode}"] = self.measure(
                f"naive upsert {mode}", self.naive_opener(), mode
            )
            if mode == "spread" and self.durability == "logged":
                name = f"fineflow coalesce=False {mode}"
                pool = min(self.conc, NAIVE_POOL_MAX)
                contenders[name] = self.measure(name, self.fineflow(False, pool), mode)
            if pgbench and self.conc >= 16:
                contenders[f"pgbench ceiling {mode}"] = self.measure(
                    f"pgbench ceiling {mode}", None, mode
                )
        results = await interleave(contenders, self.profile.storage_rounds)
        for name, rates in results.items():
            mode = self.modes[name]
            per = self.details[name]
            extra = {
                "p50 ms": stat([d["p50_ms"] for d in per]).text(),
                "p99 ms": stat([d["p99_ms"] for d in per]).text(),
            }
            if name.startswith("pgbench"):
                extra = {"p50 ms": "avg " + stat([d["avg_ms"] for d in per]).text()}
            table.add(
                Row(
                    f"c={self.conc} {name}",
                    stat(rates),
                    "/s",
                    extra=extra,
                    ratio=stat(ratios(rates, results[f"naive upsert {mode}"])),
                    raw={
                        "durability": self.durability,
                        "concurrency": self.conc,
                        "keys": mode,
                        "rounds": per,
                    },
                )
            )
        _storage_targets(targets, self.durability, self.conc, results, self.details)


async def _postgres(ctx: Context, tables: list[Table], targets: Table) -> None:
    from fineflow import PostgresStorage

    profile = ctx.profile
    pgbench = shutil.which("pgbench") is not None and profile.pgbench_seconds > 0
    with ctx.database() as dsn:
        for durability in profile.storage_durability:
            opts = _DURABILITY[durability]
            kind = "UNLOGGED table" if opts["unlogged"] else "logged table"
            sync = ", synchronous_commit=off" if opts["sync_off"] else ""
            table = Table(
                SUITE,
                f"PostgreSQL decisions, {durability.replace('_', ' ')} ({kind}{sync})",
                "x naive (same keys)",
            )
            tables.append(table)
            if not pgbench:
                table.notes.append("pgbench not on PATH (or off in this profile): no ceiling")
            await NaiveUpsert(dsn, f"naive_{durability}", **opts).migrate()
            async with PostgresStorage(
                dsn, schema=f"ff_{durability}", unlogged=opts["unlogged"], max_size=1
            ) as storage:
                await storage.migrate()
            concurrencies = (
                profile.storage_concurrency
                if durability == "logged"
                else profile.durability_concurrency
            )
            for conc in concurrencies:
                await _Cell(ctx, dsn, durability, conc).run(table, targets, pgbench)


def _storage_targets(
    targets: Table,
    durability: str,
    conc: int,
    results: dict[str, list[float]],
    details: dict[str, list[dict[str, Any]]],
) -> None:
    logged = durability == "logged"
    if conc == 64:
        r = stat(ratios(results["fineflow spread"], results["naive upsert spread"]))
        targets.add(
            Row(
                f"{durability}, c=64, 10k keys: fineflow / naive decisions/s",
                r,
                "x",
                target=">= 8" if logged else "(>= 8)",
                met=at_least(r.median, 8.0) if logged else None,
            )
        )
        r = stat(ratios(results["fineflow hot"], results["fineflow spread"]))
        targets.add(
            Row(
                f"{durability}, c=64: fineflow hot key / spread keys",
                r,
                "x",
                target=">= 0.5" if logged else "(>= 0.5)",
                met=at_least(r.median, 0.5) if logged else None,
            )
        )
        if "pgbench ceiling spread" in results:
            r = stat(ratios(results["fineflow spread"], results["pgbench ceiling spread"]))
            targets.add(Row(f"{durability}, c=64, 10k keys: fineflow / pgbench ceiling", r, "x"))
    if conc == 1 and logged:
        ff = [d["p50_ms"] for d in details["fineflow spread"]]
        naive = [d["p50_ms"] for d in details["naive upsert spread"]]
        r = stat(ratios(ff, naive))
        targets.add(
            Row(
                "logged, c=1: fineflow p50 latency / naive p50",
                r,
                "x",
                target="<= 1.3",
                met=at_most(r.median, 1.3),
            )
        )


async def _memory(ctx: Context, tables: list[Table], targets: Table) -> None:
    from fineflow import Hit, MemoryStorage, Quota, RateLimiter

    profile = ctx.profile
    n = profile.memory_calls
    keys = [f"user{i}" for i in range(1000)]
    table = Table(SUITE, "Memory storage: time per decision (1,000 keys)", "x fineflow hit")
    tables.append(table)
    quota = Quota.parse(MEMORY_QUOTA)
    limiter = RateLimiter(MemoryStorage())
    storage = MemoryStorage()
    floor = bare_gcra(quota)
    contenders: dict[str, Callable[[str], Awaitable[Any]]] = {
        "fineflow RateLimiter.hit": lambda k: limiter.hit(k, quota),
        "fineflow MemoryStorage.decide": lambda k: storage.decide("gcra", [Hit(k, quota)]),
        "bare GCRA step behind an await (floor)": lambda k: bare_gcra_hit(floor, k),
    }
    limits_aio = optional("limits.aio.strategies")
    if limits_aio is not None:
        import limits
        from limits.aio.storage import MemoryStorage as LimitsMemory

        item = limits.parse(MEMORY_QUOTA)
        moving = limits_aio.MovingWindowRateLimiter(LimitsMemory())
        fixed = limits_aio.FixedWindowRateLimiter(LimitsMemory())
        contenders["limits.aio moving window"] = lambda k: moving.hit(item, k)
        contenders["limits.aio fixed window"] = lambda k: fixed.hit(item, k)
    else:
        table.notes.append("limits not installed: no peer")

    def batch(decide: Callable[[str], Awaitable[Any]]) -> Callable[[], Awaitable[float]]:
        async def measure() -> float:
            nk = len(keys)
            size = max(1, n // 3)
            best = float("inf")
            for _ in range(3):  # best of three batches (filters out noisy neighbours)
                start = time.perf_counter_ns()
                for i in range(size):
                    await decide(keys[i % nk])
                best = min(best, (time.perf_counter_ns() - start) / size)
            return best

        return measure

    for decide in contenders.values():
        await batch(decide)()
    results = await interleave({k: batch(v) for k, v in contenders.items()}, profile.rounds)
    base = results["fineflow RateLimiter.hit"]
    for name, values in results.items():
        table.add(Row(name, stat(values), "ns", ratio=stat(ratios(values, base))))
    for name in ("limits.aio moving window", "limits.aio fixed window"):
        if name in results:
            r = stat(ratios(results[name], base))
            targets.add(
                Row(
                    f"{name} / fineflow RateLimiter.hit (time per decision)",
                    r,
                    "x",
                    target=">= 5",
                    met=at_least(r.median, 5.0),
                )
            )


async def run(ctx: Context) -> list[Table]:
    """PostgreSQL tables (when a server is found), the memory table and the targets."""
    tables: list[Table] = []
    targets = Table(SUITE, "Storage targets (per-round ratios)")
    if ctx.postgres() is None:
        targets.notes.append(f"no PostgreSQL ({ctx.pg_error}): PostgreSQL rows skipped")
    else:
        await _postgres(ctx, tables, targets)
    await _memory(ctx, tables, targets)
    return [*tables, targets]
