"""A bounded load test: several uvicorn workers sharing PostgreSQL, hundreds of clients.

Run it with ``python -m benchmarks.load`` (about a minute) or ``python -m benchmarks.load
--short`` (under 30 s). What it does:

* finds PostgreSQL (``fineflow.testing.find_postgres``: ``FINEFLOW_TEST_DSN``, the local
  server, or a throwaway cluster) and creates a scratch database, dropped afterwards;
* starts three uvicorn processes on 127.0.0.1 (distinct ports), each serving
  :func:`create_app`: a Starlette app behind ``RateLimitMiddleware`` (its own
  ``PostgresStorage`` pool, one shared schema) and, inside it, ``CircuitBreakerMiddleware``
  (a breaker per route) in front of an upstream route that answers 502 to 10% of requests;
* drives them with hundreds of concurrent keep-alive clients on raw asyncio streams
  (bounded by a request cap and a deadline), with mixed tiers (free / pro / enterprise, by
  header), one hot key and thousands of cold keys;
* reports admitted vs expected per key (exact: quotas are per day, so nothing refills
  during a run and a key admits exactly ``min(sent, limit)``), p50/p99 latency, error counts
  (500s, storage failures, connection errors: all must be zero), the workers' limiter and
  breaker counters, and the rows left after ``storage.cleanup()``;
* stops every process in a ``finally`` and exits non-zero if any key's count is not exact
  or there was any error.

``run(ctx)`` returns the same figures as :class:`benchmarks._common.Table` s for the suite
runner.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import secrets
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fineflow.testing import UvicornProcess

from ._common import Context, Row, Stat, Table, num, percentile

__all__ = ["LoadConfig", "LoadReport", "create_app", "main", "run", "run_load"]

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 3
TIERS = {"free": 3, "pro": 50, "enterprise": 1000}  # admitted per key and day
HOT_KEY, HOT_TIER = "hot", "enterprise"
UPSTREAM_FAILURE = 0.10  # share of upstream calls answered 502
_LENGTH = re.compile(rb"(?i)\r\ncontent-length:\s*(\d+)")
_CIRCUIT = re.compile(rb"(?i)\r\nx-circuit-state:")


# -- the app each worker serves ---------------------------------------------------------


def create_app() -> Any:
    """The ASGI app of one worker (``uvicorn --factory benchmarks.load:create_app``).

    Reads ``FINEFLOW_LOAD_DSN`` and ``FINEFLOW_LOAD_SCHEMA`` from the environment.
    """
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    from fineflow import (
        BreakerRegistry,
        CircuitBreakerMiddleware,
        PostgresStorage,
        RateLimitMiddleware,
        Rule,
        keys,
    )

    storage = PostgresStorage(
        os.environ["FINEFLOW_LOAD_DSN"], schema=os.environ["FINEFLOW_LOAD_SCHEMA"], max_size=4
    )
    registry = BreakerRegistry(max_size=100, reset_timeout=2.0)
    upstream_rng = random.Random(os.getpid())
    parts: dict[str, Any] = {}

    async def data(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def upstream(request: Request) -> Response:
        if upstream_rng.random() < UPSTREAM_FAILURE:
            return PlainTextResponse("upstream failed", status_code=502)
        return PlainTextResponse("ok")

    async def stats(request: Request) -> Response:
        limiter = parts["limiter"].limiter
        return JSONResponse(
            {
                "pid": os.getpid(),
                "limiter": _plain(asdict(limiter.metrics())),
                "middleware": _plain(asdict(parts["limiter"].metrics())),
                "breakers": {n: _plain(asdict(m)) for n, m in registry.metrics().items()},
            }
        )

    def breaker_key(scope: Any) -> str | None:
        path = str(scope.get("path", ""))
        return path if path.startswith("/api/") else None

    inner = Starlette(
        routes=[
            Route("/api/data", data),
            Route("/api/upstream", upstream),
            Route("/_stats", stats),
        ]
    )
    breakers = CircuitBreakerMiddleware(
        inner, registry=registry, key=breaker_key, state_header="x-circuit-state"
    )
    limited = RateLimitMiddleware(
        breakers,
        storage=storage,
        rules=[Rule("/api/*", tiers={t: f"{n}/day" for t, n in TIERS.items()}, name="api")],
        key=keys.header("x-api-key"),
        tier=keys.header("x-tier"),
        default_tier="free",
        timeout=1.0,  # generous: a slow decision must not turn into on_storage_error
        on_storage_error="deny",  # a storage failure shows as a 503 (an error), never a 200
        exempt_paths=["/_stats"],
    )
    parts["limiter"] = limited
    return limited


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if hasattr(value, "value") and not isinstance(value, int | float | str):
        return value.value  # enums
    return value


# -- processes -----------------------------------------------------------------------------


@contextlib.contextmanager
def _workers(dsn: str, schema: str) -> Iterator[list[UvicornProcess]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINEFLOW_")}
    src = str(ROOT / "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), src, env.get("PYTHONPATH")]))
    env.update(FINEFLOW_LOAD_DSN=dsn, FINEFLOW_LOAD_SCHEMA=schema)
    started: list[UvicornProcess] = []
    try:
        for _ in range(WORKERS):
            started.append(
                UvicornProcess(
                    "benchmarks.load:create_app",
                    factory=True,
                    cwd=ROOT,
                    env=env,
                    args=("--backlog", "4096"),
                )
            )
        yield started
    finally:
        for worker in started:
            worker.stop()


async def _get(port: int, path: str) -> tuple[int, bytes]:
    """One request on a fresh connection (``Connection: close``), bounded to 5 s."""
    async with asyncio.timeout(5.0):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            writer.write(request.encode())
            data = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head[9:12]), body


async def _ready(workers: list[UvicornProcess], deadline_s: float = 60.0) -> None:
    deadline = time.monotonic() + deadline_s
    for worker in workers:
        while True:
            if worker.process.poll() is not None:
                raise RuntimeError(f"uvicorn exited at startup:\n{worker.output()}")
            with contextlib.suppress(OSError, asyncio.TimeoutError, ValueError):
                if (await _get(worker.port, "/_stats"))[0] == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not answer within {deadline_s}s")
            await asyncio.sleep(0.05)  # waiting for a subprocess to listen


# -- the load ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadConfig:
    """How much load: ``clients`` connections, at most ``requests`` in ``seconds``."""

    clients: int = 400
    requests: int = 40_000
    seconds: float = 30.0
    cold_keys: int = 3_000
    hot_share: float = 0.3
    upstream_share: float = 0.2
    seed: int = 7

    @classmethod
    def short(cls) -> LoadConfig:
        """The ``--short`` mode: the whole run in well under 30 s."""
        return cls(clients=300, requests=8_000, seconds=8.0, cold_keys=2_000)


@dataclass(slots=True)
class LoadReport:
    """What one run measured."""

    config: LoadConfig
    elapsed: float = 0.0
    sent: Counter[str] = field(default_factory=Counter)
    admitted: Counter[str] = field(default_factory=Counter)
    tier_of: dict[str, str] = field(default_factory=dict)
    statuses: Counter[int] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    breaker_rejections: int = 0
    worker_stats: list[dict[str, Any]] = field(default_factory=list)
    rows_before_cleanup: int = 0
    rows_deleted: int = 0
    rows_left: int = -1

    def expected(self, key: str) -> int:
        return min(self.sent[key], TIERS[self.tier_of[key]])

    @property
    def hot_exact(self) -> bool:
        return self.admitted[HOT_KEY] == self.expected(HOT_KEY)

    @property
    def cold_mismatches(self) -> list[str]:
        return [k for k in self.sent if k != HOT_KEY and self.admitted[k] != self.expected(k)]

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def ok(self) -> bool:
        return (
            self.hot_exact
            and not self.cold_mismatches
            and self.error_count == 0
            and self.rows_left == 0
        )


def _key_plan(config: LoadConfig) -> tuple[list[str], dict[str, str]]:
    cold = [f"cold-{i}" for i in range(config.cold_keys)]
    tiers = {HOT_KEY: HOT_TIER}
    for i, key in enumerate(cold):
        tiers[key] = "free" if i % 10 < 6 else ("pro" if i % 10 < 9 else "enterprise")
    return cold, tiers


async def _drive(ports: list[int], config: LoadConfig, report: LoadReport) -> None:
    cold, tiers = _key_plan(config)
    report.tier_of.update(tiers)
    budget = [config.requests]
    clock = time.perf_counter
    deadline = clock() + config.seconds

    async def client(index: int) -> None:
        rng = random.Random(config.seed * 100_003 + index)
        port = ports[index % len(ports)]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as exc:
            report.errors[f"connect: {type(exc).__name__}"] += 1
            return
        try:
            while budget[0] > 0 and clock() < deadline:
                budget[0] -= 1
                key = HOT_KEY if rng.random() < config.hot_share else rng.choice(cold)
                path = "/api/upstream" if rng.random() < config.upstream_share else "/api/data"
                request = (
                    f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Api-Key: {key}\r\n"
                    f"X-Tier: {tiers[key]}\r\n\r\n"
                ).encode()
                start = clock()
                report.sent[key] += 1
                try:
                    writer.write(request)
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = _LENGTH.search(head)
                    if length is None:
                        report.errors["response without content-length"] += 1
                        return
                    await reader.readexactly(int(length.group(1)))
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                    report.errors[f"connection: {type(exc).__name__}"] += 1
                    return
                report.latencies_ms.append((clock() - start) * 1e3)
                status = int(head[9:12])
                report.statuses[status] += 1
                if status == 429:
                    continue
                if status in (200, 502):
                    report.admitted[key] += 1
                elif status == 503 and _CIRCUIT.search(head):
                    report.admitted[key] += 1  # passed the limiter, rejected by the breaker
                    report.breaker_rejections += 1
                elif status == 503:
                    report.errors["503 storage unavailable"] += 1
                else:
                    report.errors[f"HTTP {status}"] += 1
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    start = clock()
    await asyncio.wait_for(
        asyncio.gather(*(client(i) for i in range(config.clients))),
        timeout=config.seconds + 60,
    )
    report.elapsed = clock() - start


async def _count_rows(storage: Any) -> int:
    async with storage.pool.connection() as conn:
        cur = await conn.execute(f'SELECT count(*) FROM "{storage.schema}".buckets')
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def run_load(config: LoadConfig, dsn: str) -> LoadReport:
    """Start the workers on ``dsn`` (a scratch database), drive them, clean up, report."""
    from fineflow import PostgresStorage

    report = LoadReport(config)
    schema = f"ff_load_{secrets.token_hex(4)}"
    async with PostgresStorage(dsn, schema=schema, max_size=2) as storage:
        await storage.migrate()
        with _workers(dsn, schema) as workers:
            await _ready(workers)
            await _drive([w.port for w in workers], config, report)
            for worker in workers:
                status, body = await _get(worker.port, "/_stats")
                if status == 200:
                    report.worker_stats.append(json.loads(body))
        report.rows_before_cleanup = await _count_rows(storage)
        far_future = time.time_ns() + 10 * 86_400 * 10**9  # every per-day quota has expired
        report.rows_deleted = await storage.cleanup(batch_size=5_000, now=far_future)
        report.rows_left = await _count_rows(storage)
    return report


# -- reporting -----------------------------------------------------------------------------


def tables(report: LoadReport) -> list[Table]:
    """The report as tables: admitted vs expected per key, then latency, errors, storage."""
    counts = Table(
        "load",
        f"load: admitted vs expected per key ({WORKERS} uvicorn workers, one PostgreSQL schema, "
        f"{report.config.clients} clients)",
    )

    def one(x: float) -> Stat:
        return Stat(x, x, x)

    hot_expected = report.expected(HOT_KEY)
    counts.add(
        Row(
            f"hot key ({HOT_TIER}, {TIERS[HOT_TIER]}/day)",
            one(report.admitted[HOT_KEY]),
            "admitted",
            extra={"sent": str(report.sent[HOT_KEY]), "expected": str(hot_expected)},
            target="exact",
            met=report.hot_exact,
        )
    )
    by_tier: dict[str, list[str]] = defaultdict(list)
    for key in report.sent:
        if key != HOT_KEY:
            by_tier[report.tier_of[key]].append(key)
    for tier in TIERS:
        keys = by_tier.get(tier, [])
        bad = [k for k in keys if report.admitted[k] != report.expected(k)]
        counts.add(
            Row(
                f"cold keys, {tier} ({TIERS[tier]}/day): {len(keys)} keys",
                one(sum(report.admitted[k] for k in keys)),
                "admitted",
                extra={
                    "sent": str(sum(report.sent[k] for k in keys)),
                    "expected": str(sum(report.expected(k) for k in keys)),
                },
                target="exact per key",
                met=not bad,
                note=f"{len(bad)} keys off: {bad[:5]}" if bad else "",
            )
        )

    lat = sorted(report.latencies_ms)
    total = sum(report.statuses.values())
    health = Table("load", "load: latency, errors, storage")
    health.add(
        Row(
            "requests",
            one(total),
            f"in {report.elapsed:.1f} s",
            extra={"rate": f"{num(total / report.elapsed if report.elapsed else 0)}/s"},
        )
    )
    health.add(Row("latency p50", one(percentile(lat, 0.50)), "ms"))
    health.add(Row("latency p99", one(percentile(lat, 0.99)), "ms"))
    health.add(Row("latency max", one(lat[-1] if lat else float("nan")), "ms"))
    statuses = ", ".join(f"{s}: {n}" for s, n in sorted(report.statuses.items()))
    health.add(Row("statuses", None, note=statuses))
    health.add(
        Row(
            "breaker rejections (503 + x-circuit-state)",
            one(report.breaker_rejections),
            note="expected behaviour, not errors",
        )
    )
    health.add(
        Row(
            "errors (500, other 5xx, storage 503, connection)",
            one(report.error_count),
            target="0",
            met=report.error_count == 0,
            note=", ".join(f"{k}: {n}" for k, n in report.errors.items()),
        )
    )
    limiter = [s["limiter"] for s in report.worker_stats]
    breakers = [b for s in report.worker_stats for b in s["breakers"].values()]
    health.add(
        Row(
            "workers' limiter storage errors + timeouts",
            one(sum(m["storage_errors"] + m["storage_timeouts"] for m in limiter)),
            target="0",
            met=all(m["storage_errors"] + m["storage_timeouts"] == 0 for m in limiter),
            note=f"decisions per worker: {[m['decisions'] for m in limiter]}",
        )
    )
    health.add(
        Row(
            "workers' breakers opened",
            one(sum(b["times_opened"] for b in breakers)),
            note=f"upstream failures recorded: "
            f"{sum(b['total_failures'] for b in breakers)}, rejections: "
            f"{sum(b['total_rejections'] for b in breakers)}",
        )
    )
    health.add(
        Row(
            "database rows left after cleanup",
            one(report.rows_left),
            extra={"before": str(report.rows_before_cleanup), "deleted": str(report.rows_deleted)},
            target="0",
            met=report.rows_left == 0,
        )
    )
    return [counts, health]


async def run(ctx: Context) -> list[Table]:
    """The suite entry point for ``python -m benchmarks`` (short unless the profile is full)."""
    config = LoadConfig() if ctx.profile.name == "full" else LoadConfig.short()
    if ctx.postgres() is None:
        table = Table("load", "load: skipped")
        table.notes.append(f"no PostgreSQL: {ctx.pg_error}")
        return [table]
    with ctx.database() as dsn:
        report = await run_load(config, dsn)
    return tables(report)


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.load [--short]``: print the tables; exit 1 unless all exact."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.load",
        description="Bounded load test: uvicorn workers sharing PostgreSQL, hundreds of clients.",
    )
    parser.add_argument("--short", action="store_true", help="a run of under 30 s")
    args = parser.parse_args(argv)
    config = LoadConfig.short() if args.short else LoadConfig()

    from fineflow.testing import find_postgres, temporary_database

    started = time.monotonic()
    print(
        f"load test: {WORKERS} uvicorn workers, {config.clients} clients, at most "
        f"{config.requests} requests in {config.seconds:.0f} s",
        flush=True,
    )
    with find_postgres() as server, temporary_database(server) as dsn:
        print(f"PostgreSQL: {server.source}", flush=True)
        report = asyncio.run(run_load(config, dsn))
    for table in tables(report):
        print()
        print(table.render())
    verdict = "OK" if report.ok else "FAILED"
    print(f"\n{verdict} in {time.monotonic() - started:.1f} s", flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
