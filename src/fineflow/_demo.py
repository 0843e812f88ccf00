"""``fineflow demo``: a limited app on a real server, driven by a scripted burst.

It finds PostgreSQL the way the test harness does (``FINEFLOW_TEST_DSN``/``--dsn``, the local
server, or a throwaway cluster), works in a scratch database it drops afterwards, serves a
Starlette app behind ``CircuitBreakerMiddleware`` and ``RateLimitMiddleware`` with uvicorn
on 127.0.0.1, sends a bounded burst from users of three tiers plus a flaky route, prints
what happened (tables, or one JSON document with ``--json``), and stops by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

from ._breaker.middleware import CircuitBreakerMiddleware
from ._breaker.registry import BreakerRegistry
from ._errors import FineflowError
from ._ratelimit.middleware import RateLimitMiddleware
from ._ratelimit.rules import Rule
from ._storage.base import Storage
from ._storage.memory import MemoryStorage
from ._storage.postgres.storage import PostgresStorage
from .keys import header

__all__ = ["run_demo"]

API_KEYS = {"alice-key": "free", "bob-key": "pro", "carol-key": "enterprise"}
TIERS = {"free": "5/minute", "pro": "20/minute", "enterprise": "60/minute"}
BURST = {"alice-key": 12, "bob-key": 30, "carol-key": 40}
FLAKY_CALLS = 10
_api_key = header("x-api-key")


def _key(scope: Any) -> str | None:
    return _api_key(scope)


def _tier(scope: Any) -> str | None:
    return API_KEYS.get(_api_key(scope) or "")


def _build_app(storage: Storage) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def chat(request: Request) -> Response:
        decision = request.state.fineflow[0]
        return JSONResponse({"reply": "hello", "remaining": decision.remaining})

    async def flaky(request: Request) -> Response:
        return JSONResponse({"error": "upstream failed"}, status_code=502)

    app = Starlette(routes=[Route("/api/chat", chat), Route("/api/flaky", flaky)])
    limited = RateLimitMiddleware(
        app,
        storage=storage,
        rules=[Rule("/api/chat", tiers=TIERS, name="chat")],
        key=_key,
        tier=_tier,
        default_tier="free",
        # The demo shows exact quotas: a first concurrent burst on a cold pool, on a busy
        # machine, must not fail open for want of the 50 ms production budget.
        timeout=1.0,
    )
    return CircuitBreakerMiddleware(
        limited,
        registry=BreakerRegistry(failure_threshold=5, reset_timeout=30.0),
        state_header="x-circuit-state",
    )


Row = dict[str, Any]


async def _drive(app: Any) -> tuple[list[Row], list[Row], list[str]]:
    import httpx
    import uvicorn

    from .testing import free_port

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        for _ in range(200):
            if server.started:
                break
            await asyncio.sleep(0.05)
        else:
            raise FineflowError("the demo server did not start within 10 s")
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, timeout=10.0) as client:
            rows, samples = await _bursts(client)
            flaky_rows = []
            for i in range(FLAKY_CALLS):
                reply = await client.get("/api/flaky", headers={"x-api-key": "carol-key"})
                flaky_rows.append(
                    {
                        "call": i + 1,
                        "status": reply.status_code,
                        "circuit_state": reply.headers.get("x-circuit-state"),
                        "retry_after": reply.headers.get("retry-after"),
                    }
                )
        return rows, flaky_rows, samples
    finally:
        server.should_exit = True
        await serving


async def _bursts(client: Any) -> tuple[list[Row], list[str]]:
    """One concurrent burst per user to /api/chat: a row each, and sample headers."""
    rows, samples = [], []
    for api_key, count in BURST.items():
        replies = await asyncio.gather(
            *(client.get("/api/chat", headers={"x-api-key": api_key}) for _ in range(count))
        )
        status = Counter(r.status_code for r in replies)
        ok = next((r for r in replies if r.status_code == 200), None)
        limited = next((r for r in replies if r.status_code == 429), None)
        tier = API_KEYS[api_key]
        rows.append(
            {
                "user": api_key.split("-")[0],
                "tier": tier,
                "quota": TIERS[tier],
                "sent": count,
                "allowed": status.get(200, 0),
                "limited": status.get(429, 0),
            }
        )
        if ok is not None:
            samples.append(
                f"{tier:>10} 200: RateLimit-Policy: "
                f"{ok.headers.get('ratelimit-policy')} | RateLimit: "
                f"{ok.headers.get('ratelimit')}"
            )
        if limited is not None:
            samples.append(
                f"{tier:>10} 429: Retry-After: "
                f"{limited.headers.get('retry-after')} | "
                f"{limited.headers.get('content-type')}"
            )
    return rows, samples


def _table(headers: list[str], rows: list[Row]) -> str:
    cells = [["-" if v is None else str(v) for v in row.values()] for row in rows]
    return _text_table(headers, cells)


def _text_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    out = [
        "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


@contextlib.contextmanager
def _storage(dsn: str | None, memory: bool) -> Iterator[tuple[Storage, str]]:
    if memory:
        yield MemoryStorage(), "in-memory storage (--memory)"
        return
    from .testing import PostgresNotFoundError, find_postgres, temporary_database

    if dsn is not None:
        yield PostgresStorage(dsn, schema="fineflow_demo"), "PostgreSQL from --dsn"
        return
    try:
        server = find_postgres()
    except PostgresNotFoundError as exc:
        print(
            "WARNING: no PostgreSQL found, falling back to in-memory storage.\n"
            f"         ({str(exc).splitlines()[0]})",
            file=sys.stderr,
        )
        yield MemoryStorage(), "in-memory storage (no PostgreSQL found)"
        return
    with server, temporary_database(server) as scratch:
        yield PostgresStorage(scratch), f"PostgreSQL ({server.source} server, scratch database)"


def run_demo(*, dsn: str | None = None, memory: bool = False, as_json: bool = False) -> int:
    """Run the demo and print its tables (or, with ``as_json``, one JSON document on
    stdout, errors included); return the exit status."""
    try:
        import httpx  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        needs = f"fineflow demo needs the demo extra: pip install 'fineflow[demo]' ({exc})"
        return _fail(needs, 2, as_json)
    with _storage(dsn, memory) as (storage, where):
        if not as_json:
            print(
                f"fineflow demo: Starlette + CircuitBreakerMiddleware + RateLimitMiddleware on "
                f"uvicorn at 127.0.0.1, state in {where}\n"
            )
        rows, flaky, samples = asyncio.run(_drive(_build_app(storage)))
    expected = [min(BURST[k], int(TIERS[API_KEYS[k]].split("/")[0])) for k in BURST]
    got = [row["allowed"] for row in rows]
    problem = None if got == expected else f"UNEXPECTED: allowed {got}, expected {expected}"
    if as_json:
        report: dict[str, Any] = {"storage": where, "rate_limiting": rows}
        report.update(sample_headers=samples, circuit_breaking=flaky, ok=problem is None)
        if problem is not None:
            report.update(error=problem, exit_code=1)
        print(json.dumps(report, indent=2))
        return 0 if problem is None else 1
    print("Rate limiting: one burst per user, sent concurrently to GET /api/chat")
    print(_table(["user", "tier", "quota", "sent", "200 allowed", "429 limited"], rows))
    print("\nSample headers")
    for line in samples:
        print("  " + line)
    print("\nCircuit breaking: GET /api/flaky answers 502; the breaker opens after 5 failures")
    print(_table(["call", "status", "x-circuit-state", "retry-after"], flaky))
    if problem is not None:
        return _fail(problem, 1, as_json)
    print("\nEvery user got exactly their tier's quota; the rest were told when to retry.")
    return 0


def _fail(message: str, exit_code: int, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"error": message, "exit_code": exit_code}))
    else:
        print(f"\n{message}", file=sys.stderr)
    return exit_code
