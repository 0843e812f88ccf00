"""The rate-limit families in process: every front end (middleware, FastAPI dependency,
``@ff.limit``) counts the same way; a storage that fails is counted as failed_open or
failed_closed and by its own errors or timeouts (a real PostgreSQL, a port where nothing
listens); a dropped middleware leaves the export."""

from __future__ import annotations

import gc
import uuid
from collections import Counter

import httpx
import pytest
from fastapi import Depends, FastAPI
from obs_ratelimit_burst import Key, decisions
from prometheus_client import CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import fineflow as ff
import fineflow.prometheus
from asgi_helpers import echo_app
from fineflow._ratelimit.live import decision_counts
from fineflow.fastapi import RateLimit, install
from fineflow.testing import free_port

pytestmark = pytest.mark.anyio


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Scraper:
    """A registry with fineflow's collector; what changed since it was made."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        fineflow.prometheus.register(self.registry)
        self.before = decisions(self.text())

    def text(self) -> str:
        return generate_latest(self.registry).decode()

    def new_decisions(self) -> Counter[Key]:
        return decisions(self.text()) - self.before


async def statuses(app: object, *paths: str) -> list[int]:
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return [(await client.get(p)).status_code for p in paths]


async def test_the_route_limits_count_as_the_middleware_does() -> None:
    scraper = Scraper()
    limiter = ff.RateLimiter(ff.MemoryStorage())
    deco, dep = unique("deco"), unique("dep")

    @ff.limit("2/minute", name=deco, limiter=limiter)
    async def search(request: Request) -> Response:
        return PlainTextResponse("ok")

    fastapi = FastAPI()
    install(fastapi)

    @fastapi.get("/items", dependencies=[Depends(RateLimit("2/minute", name=dep, limiter=limiter))])
    async def items() -> dict[str, str]:
        return {"ok": "yes"}

    starlette = Starlette(routes=[Route("/search", search)])
    assert await statuses(starlette, *["/search"] * 3) == [200, 200, 429]
    assert await statuses(fastapi, *["/items"] * 3) == [200, 200, 429]
    assert scraper.new_decisions() == {
        (deco, "", "allowed"): 2,
        (deco, "", "denied"): 1,
        (dep, "", "allowed"): 2,
        (dep, "", "denied"): 1,
    }


async def test_a_storage_out_of_time_fails_open_and_counts_its_timeouts() -> None:
    scraper = Scraper()
    rule = unique("nowhere")
    # Nothing listens there: the pool never gives a connection, every decision runs out
    # of its 50 ms budget until the limiter's breaker stops asking.
    storage = ff.PostgresStorage(f"postgresql://127.0.0.1:{free_port()}/x", connect_timeout=1.0)
    await storage.open()
    limiter = ff.RateLimiter(storage, timeout=0.05, failure_threshold=2, recovery_time=60)
    app = ff.RateLimitMiddleware(
        echo_app, limiter=limiter, rules=[ff.Rule("/", quota="1/s", name=rule)]
    )
    try:
        assert await statuses(app, *["/"] * 5) == [200] * 5
        figures = storage.figures()
    finally:
        await storage.close()
    assert scraper.new_decisions() == {(rule, "", "failed_open"): 5}
    metrics = limiter.metrics()
    assert figures.batches.timeouts == metrics.storage_timeouts == 2
    assert figures.batches.round_trip.count == 0  # no answer ever came


async def test_a_storage_that_errs_fails_closed_and_counts_its_errors(
    pg_dsn: str, pg_schema: str
) -> None:
    scraper = Scraper()
    rule = unique("unmigrated")
    async with ff.PostgresStorage(pg_dsn, schema=pg_schema) as storage:  # never migrated
        limiter = ff.RateLimiter(
            storage, on_storage_error="deny", failure_threshold=2, recovery_time=60
        )
        app = ff.RateLimitMiddleware(
            echo_app, limiter=limiter, rules=[ff.Rule("/", quota="1/s", name=rule)]
        )
        assert await statuses(app, *["/"] * 4) == [503] * 4
        figures = storage.figures()
        text = scraper.text()
    assert scraper.new_decisions() == {(rule, "", "failed_closed"): 4}
    assert figures.batches.errors == limiter.metrics().storage_errors == 2
    assert figures.batches.timeouts == 0
    assert f'fineflow_postgres_pool_size{{pool="fineflow-{pg_schema}"}}' in text


async def test_a_dropped_middleware_leaves_the_export() -> None:
    rule = unique("dropped")
    app = ff.RateLimitMiddleware(
        echo_app, storage=ff.MemoryStorage(), rules=[ff.Rule("/", quota="5/s", name=rule)]
    )
    assert await statuses(app, "/") == [200]
    assert decision_counts()[rule, "", "allowed"] == 1
    del app
    gc.collect()
    assert not [key for key in decision_counts() if key[0] == rule]


async def test_a_route_limit_serving_two_apps_keeps_counting_under_each() -> None:
    """One ``@ff.limit`` endpoint mounted in two apps, each with its middleware's limiter:
    the counts of the first app survive the second app's requests (a drop would read as a
    counter reset)."""
    rule = unique("two-apps")

    @ff.limit("5/minute", name=rule)
    async def search(request: Request) -> Response:
        return PlainTextResponse("ok")

    def app() -> Starlette:
        other = [ff.Rule("/other", quota="100/minute")]  # (the middleware's own rules)
        middleware = Middleware(ff.RateLimitMiddleware, storage=ff.MemoryStorage(), rules=other)
        return Starlette(routes=[Route("/search", search)], middleware=[middleware])

    one, two = app(), app()
    assert await statuses(one, "/search", "/search") == [200, 200]
    assert decision_counts()[rule, "", "allowed"] == 2
    assert await statuses(two, "/search") == [200]
    assert await statuses(one, "/search") == [200]
    assert decision_counts()[rule, "", "allowed"] == 4


async def test_gates_sharing_their_counts_are_exported_once() -> None:
    """A route limit's gate replaced by one over another limiter keeps the same counts; if
    both are alive for a moment (a request still holds the old one), a scrape adds them
    once."""
    from fineflow._ratelimit.gate import Gate

    rule = unique("shared-counts")
    hits = [ff.Hit("k", ff.Quota.parse("5/minute"), 1, rule, "")]
    first = Gate(ff.RateLimiter(ff.MemoryStorage()))
    second = Gate(ff.RateLimiter(ff.MemoryStorage()), counts=first.counts)
    await first.decide(hits)
    await second.decide(hits)
    assert decision_counts()[rule, "", "allowed"] == 2
