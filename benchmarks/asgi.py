"""Suite 1: in-process ASGI overhead per request (no HTTP, no server).

Each contender is the same Starlette app, bare or behind one middleware, called directly
with a minimal ``http`` scope, a ``receive`` that returns an empty body and a ``send`` that
drops messages. Batches of requests are timed and divided (the best of three batches per
round counts); the contenders are interleaved round-robin, and the cost a middleware adds
is its time minus bare Starlette's in the same round.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from ._apps import build, fineflow_name
from ._common import Context, Row, Table, diffs, interleave, ratios, stat

__all__ = ["run"]

SUITE = "asgi"

_BASE_SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.3"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/",
    "raw_path": b"/",
    "root_path": "",
    "query_string": b"",
    "headers": [(b"host", b"bench"), (b"user-agent", b"fineflow-bench")],
    "client": ("93.184.216.34", 50000),
    "server": ("127.0.0.1", 8000),
}
_REQUEST = {"type": "http.request", "body": b"", "more_body": False}


async def _receive() -> dict[str, Any]:
    return _REQUEST


async def _drop(message: Any) -> None:
    return None


async def _status(app: Any) -> int:
    status = 0

    async def send(message: Any) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(dict(_BASE_SCOPE), _receive, send)
    return status


async def _per_request_us(app: Any, n: int, repeat: int = 3) -> float:
    """The best of ``repeat`` timed batches of ``n // repeat`` requests, in us per request
    (the minimum filters out other processes' bursts on a shared machine)."""
    base = _BASE_SCOPE
    receive, send = _receive, _drop
    size = max(1, n // repeat)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter_ns()
        for _ in range(size):
            await app(base.copy(), receive, send)
        best = min(best, (time.perf_counter_ns() - start) / size / 1000)
    return best


# (variant, label, expected status)
_CONTENDERS = [
    ("bare", "bare Starlette (floor)", 200),
    ("passthrough", "passthrough ASGI middleware", 200),
    ("floor", "least middleware with fineflow's contract", 200),
    ("fineflow-memory", "fineflow memory, allowed", 200),
    ("fineflow-memory-429", "fineflow memory, 429 path", 429),
    ("fineflow-tiers", "fineflow memory, tiers, allowed", 200),
    ("asgi-ratelimit", "asgi-ratelimit (memory)", 200),
    ("slowapi", "slowapi decorator + SlowAPIMiddleware", 200),
    ("slowapi-decorator", "slowapi decorator only", 200),
    ("breaker", "fineflow CircuitBreakerMiddleware", 200),
    ("fineflow-postgres", "fineflow PostgreSQL, allowed", 200),
]


async def run(ctx: Context) -> list[Table]:
    """Measure every contender; return the overhead table and the targets table."""
    profile = ctx.profile
    table = Table(SUITE, "In-process ASGI: time per request", "added us vs bare")
    async with contextlib.AsyncExitStack() as stack:
        apps: dict[str, Any] = {}
        calls: dict[str, int] = {}
        for variant, _, _ in _CONTENDERS:
            if variant == "fineflow-postgres":
                app = await _postgres_app(ctx, stack, table)
                calls[variant] = profile.asgi_pg_calls
            else:
                app = build(variant)
                calls[variant] = profile.asgi_calls
            if app is None:
                if variant != "fineflow-postgres":
                    table.notes.append(f"{variant}: not available yet in fineflow, skipped")
                continue
            apps[variant] = app
        expected = {v: s for v, _, s in _CONTENDERS}
        for variant, app in list(apps.items()):
            # Warm up (lazy middleware stacks, owned storages opening) and check the path.
            first = await _status(app)
            status = await _status(app)
            if status != expected[variant]:
                table.notes.append(
                    f"{variant}: expected status {expected[variant]}, got {first}/{status}; dropped"
                )
                del apps[variant]
                continue
            await _per_request_us(app, min(calls[variant], 200))

        def runner(app: Any, n: int) -> Any:
            return lambda: _per_request_us(app, n)

        results = await interleave(
            {v: runner(a, calls[v]) for v, a in apps.items()}, profile.rounds
        )
    labels = {v: label for v, label, _ in _CONTENDERS}
    bare = results["bare"]
    added = {v: diffs(r, bare) for v, r in results.items()}
    for variant, values in results.items():
        table.add(
            Row(
                labels[variant],
                stat(values),
                "us",
                ratio=stat(added[variant]),
                raw={"variant": variant, "rounds": values, "calls": calls[variant]},
            )
        )
    return [table, _ratios(added, results)]


async def _postgres_app(ctx: Context, stack: contextlib.AsyncExitStack, table: Table) -> Any:
    if fineflow_name("RateLimitMiddleware") is None:
        table.notes.append("fineflow-postgres: RateLimitMiddleware not available yet, skipped")
        return None
    if ctx.postgres() is None:
        table.notes.append(f"fineflow-postgres: no PostgreSQL ({ctx.pg_error}), skipped")
        return None
    from fineflow import PostgresStorage, RateLimiter

    dsn = stack.enter_context(ctx.database())
    storage = await stack.enter_async_context(PostgresStorage(dsn, schema="bench_asgi"))
    await storage.migrate()
    return build("fineflow-postgres", limiter=RateLimiter(storage))


def _ratios(added: dict[str, list[float]], results: dict[str, list[float]]) -> Table:
    table = Table(SUITE, "In-process ASGI ratios (per round; reference figures, no targets)")
    ff = added.get("fineflow-memory")

    def ratio_row(name: str, num: list[float], den: list[float]) -> None:
        table.add(Row(name, stat(ratios(num, den)), "x", raw={}))

    if ff is not None:
        for peer in ("asgi-ratelimit", "slowapi", "slowapi-decorator"):
            if peer in added:
                ratio_row(f"fineflow allowed added / {peer} added", ff, added[peer])
        if "fineflow-memory-429" in results:
            ratio_row(
                "fineflow 429 path / allowed path (time per request)",
                results["fineflow-memory-429"],
                results["fineflow-memory"],
            )
    if "floor" in added and "asgi-ratelimit" in added:
        # No target: how low the asgi-ratelimit ratio can go with fineflow's contract.
        r = stat(ratios(added["floor"], added["asgi-ratelimit"]))
        table.add(Row("least middleware added / asgi-ratelimit added", r, "x", raw={}))
    if "breaker" in results and "passthrough" in results:
        d = stat(diffs(results["breaker"], results["passthrough"]))
        table.add(Row("CircuitBreakerMiddleware - passthrough", d, "us"))
    else:
        table.notes.append("CircuitBreakerMiddleware not available: not measured")
    if not table.rows:
        table.notes.append("fineflow RateLimitMiddleware not available: no ratios measured")
    return table
