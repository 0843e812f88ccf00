"""fineflow.fastapi.RateLimit: a limit declared on FastAPI routes and routers."""

from __future__ import annotations

import logging
import secrets
from typing import Any

import httpx
import psycopg
import pytest
from asgi_lifespan import LifespanManager
from fastapi import APIRouter, Depends, FastAPI
from starlette.middleware import Middleware

from asgi_helpers import sf
from fineflow import (
    ConfigurationError,
    Decisions,
    MemoryStorage,
    RateLimiter,
    RateLimitMiddleware,
    Rule,
)
from fineflow import install as ff_install
from fineflow.fastapi import RateLimit, RateLimitExceeded, install, problem_response
from fineflow.testing import FakeClock
from pg_connections import connections, connections_left

pytestmark = pytest.mark.anyio


def create_app(limiter: RateLimiter | None = None, *, problems: bool = True, **mw: Any) -> FastAPI:
    app = FastAPI(middleware=[Middleware(RateLimitMiddleware, **mw)] if mw else None)
    if problems:
        install(app)
    router = APIRouter(prefix="/r", dependencies=[Depends(RateLimit("1/minute", limiter=limiter))])

    @router.get("/a")
    async def a() -> dict[str, str]:
        return {"route": "a"}

    @router.get("/b")
    async def b() -> dict[str, str]:
        return {"route": "b"}

    @app.get(
        "/search", dependencies=[Depends(RateLimit("2/minute", name="search", limiter=limiter))]
    )
    async def search() -> list[str]:
        return ["x"]

    item_limit = RateLimit("3/minute", limiter=limiter)

    @app.get("/items/{item_id}")
    async def item(
        item_id: int,
        decisions: Decisions | None = Depends(item_limit),  # noqa: B008 (FastAPI's idiom)
    ) -> dict[str, Any]:
        assert decisions is not None
        return {"id": item_id, "remaining": decisions[0].remaining}

    app.include_router(router)
    return app


async def get_all(app: FastAPI, *paths: str) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return [await client.get(p) for p in paths]


async def test_a_route_dependency_sends_headers_then_problem_json() -> None:
    limiter = RateLimiter(MemoryStorage(clock=FakeClock().time_ns))
    ok, ok2, denied = await get_all(create_app(limiter), "/search", "/search", "/search")
    assert ok.status_code == ok2.status_code == 200
    assert ok.json() == ["x"]
    assert sf(ok.headers["ratelimit-policy"].encode()) == [("search", {"q": 2, "w": 60})]
    assert sf(ok.headers["ratelimit"].encode()) == [("search", {"r": 1, "t": 30})]
    assert "retry-after" not in ok.headers
    assert denied.status_code == 429
    assert denied.headers["content-type"] == "application/problem+json"
    assert denied.headers["retry-after"] == "30"
    assert sf(denied.headers["ratelimit"].encode()) == [("search", {"r": 0, "t": 60})]
    assert denied.json()["violated-policies"] == ["search"]


async def test_without_the_handler_fastapi_answers_json_with_the_headers() -> None:
    limiter = RateLimiter(MemoryStorage())
    app = create_app(limiter, problems=False)
    *_, denied = await get_all(app, "/search", "/search", "/search")
    assert denied.status_code == 429
    assert denied.json() == {"detail": "Too Many Requests"}
    assert denied.headers["retry-after"] == "30"
    assert "ratelimit" in denied.headers


async def test_a_router_dependency_limits_each_route_apart_by_template() -> None:
    limiter = RateLimiter(MemoryStorage())
    responses = await get_all(create_app(limiter), "/r/a", "/r/b", "/r/a", "/r/b")
    assert [r.status_code for r in responses] == [200, 200, 429, 429]
    assert sf(responses[0].headers["ratelimit-policy"].encode())[0][0] == "GET /r/a"
    items = await get_all(create_app(limiter), "/items/1", "/items/2", "/items/3", "/items/4")
    assert [r.status_code for r in items] == [200, 200, 200, 429]  # one limit per template
    assert items[0].json() == {"id": 1, "remaining": 2}


async def test_it_uses_the_limiter_of_the_middleware_in_the_stack() -> None:
    storage = MemoryStorage()
    app = create_app(storage=storage, rules=[Rule("/other", quota="1/second")])
    responses = await get_all(app, "/search", "/search", "/search")
    assert [r.status_code for r in responses] == [200, 200, 429]
    # The decisions were stored in the middleware's storage (seen through its limiter).
    status = await storage.status("127.0.0.1")
    assert [(s.endpoint, s.allowed_total, s.denied_total) for s in status] == [("search", 2, 1)]


async def test_without_middleware_or_limiter_it_takes_the_default_storage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("FINEFLOW_DSN", raising=False)
    monkeypatch.setenv("FINEFLOW_STORAGE_URL", "memory://")
    responses = await get_all(create_app(), "/search", "/search", "/search")
    assert [r.status_code for r in responses] == [200, 200, 429]
    monkeypatch.delenv("FINEFLOW_STORAGE_URL")
    with pytest.raises(ConfigurationError, match="FINEFLOW_STORAGE_URL"):
        await get_all(create_app(), "/search")


async def test_disabled_lets_everything_through(monkeypatch: pytest.MonkeyPatch) -> None:
    limiter = RateLimiter(MemoryStorage())
    monkeypatch.setenv("FINEFLOW_ENABLED", "0")
    app = create_app(limiter)
    responses = await get_all(app, *["/search"] * 5)
    assert all(r.status_code == 200 and "ratelimit" not in r.headers for r in responses)
    assert not RateLimit("1/s", enabled=True).enabled


def test_bad_options_fail_when_the_dependency_is_built() -> None:
    with pytest.raises(ConfigurationError):
        RateLimit("ten per minute")
    with pytest.raises(ConfigurationError):
        RateLimit("1/s", cost=-1)


async def test_problem_response_reraises_other_exceptions() -> None:
    with pytest.raises(ValueError, match="boom"):
        await problem_response(None, ValueError("boom"))  # type: ignore[arg-type]
    assert issubclass(RateLimitExceeded, Exception)


async def test_per_request_quotas_and_tiers_in_the_dependency() -> None:
    limiter = RateLimiter(MemoryStorage())
    app = FastAPI()
    install(app)

    def plan(scope: Any) -> str | None:
        return None if dict(scope["headers"]).get(b"x-internal") else "1/minute"

    def tier(scope: Any) -> str:
        return str(dict(scope["headers"]).get(b"x-tier", b"free").decode())

    @app.get("/plan", dependencies=[Depends(RateLimit(plan, limiter=limiter))])
    async def by_plan() -> str:
        return "ok"

    tiered = RateLimit({"free": "1/minute", "pro": "3/minute"}, tier=tier, limiter=limiter)

    @app.get("/tiered", dependencies=[Depends(tiered)])
    async def by_tier() -> str:
        return "ok"

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert [(await client.get("/plan")).status_code for _ in range(2)] == [200, 429]
        internal = [await client.get("/plan", headers={"x-internal": "1"}) for _ in range(3)]
        assert all(r.status_code == 200 and "ratelimit" not in r.headers for r in internal)
        pro = [await client.get("/tiered", headers={"x-tier": "pro"}) for _ in range(4)]
        assert [r.status_code for r in pro] == [200, 200, 200, 429]
        assert sf(pro[0].headers["ratelimit-policy"].encode()) == [
            ("GET /tiered", {"q": 3, "w": 60})
        ]


async def test_the_default_storage_lives_and_dies_with_the_app_lifespan(
    monkeypatch: pytest.MonkeyPatch, pg_dsn: str
) -> None:
    """A real PostgreSQL pool, opened by the first request and closed when the lifespan
    ends: afterwards no connection of that application name is left on the server."""
    name = f"ff_lifespan_{secrets.token_hex(4)}"
    monkeypatch.delenv("FINEFLOW_STORAGE_URL", raising=False)
    monkeypatch.setenv(
        "FINEFLOW_DSN", psycopg.conninfo.make_conninfo(pg_dsn, application_name=name)
    )
    app = create_app()
    install(app)  # (a second call does nothing)
    for expected in ([200, 200, 429], [429, 429, 429]):  # a second lifespan: a new storage
        async with LifespanManager(app) as manager:
            assert await connections_left(pg_dsn, name) == 0  # nothing opened before needed
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                assert [(await client.get("/search")).status_code for _ in range(3)] == expected
                assert (await client.get("/r/a")).status_code in (200, 429)
            assert connections(pg_dsn, name) >= 1
        assert await connections_left(pg_dsn, name) == 0


async def test_without_install_the_default_storage_still_decides_and_says_install(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("FINEFLOW_STORAGE_URL", "memory://")
    app = create_app(problems=False)
    with caplog.at_level(logging.WARNING, logger="fineflow.middleware"):
        statuses = [r.status_code for r in await get_all(app, *["/search"] * 3)]
        statuses += [r.status_code for r in await get_all(app, "/search")]
    assert statuses == [200, 200, 429, 429]  # one storage for the app, kept between clients
    warnings = [r for r in caplog.records if "install(app)" in r.getMessage()]
    assert len(warnings) == 1  # once per app
    # Neither a limiter nor a storage in the environment: the error says what to set.
    monkeypatch.delenv("FINEFLOW_STORAGE_URL")
    monkeypatch.delenv("FINEFLOW_DSN", raising=False)
    with pytest.raises(ConfigurationError, match="FINEFLOW_STORAGE_URL"):
        await get_all(create_app(problems=False), "/search")
    # With a limiter, install() is only for problem+json, and nothing warns.
    caplog.clear()
    limiter = RateLimiter(MemoryStorage())
    with caplog.at_level(logging.WARNING, logger="fineflow.middleware"):
        *_, denied = await get_all(create_app(limiter, problems=False), *["/search"] * 3)
    assert denied.status_code == 429
    assert not [r for r in caplog.records if "install(app)" in r.getMessage()]


async def test_install_without_problem_json_keeps_fastapis_error_body(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FINEFLOW_STORAGE_URL", "memory://")
    app = create_app(problems=False)
    install(app, problem_json=False)
    *_, denied = await get_all(app, *["/search"] * 3)
    assert denied.status_code == 429 and denied.json() == {"detail": "Too Many Requests"}


async def test_fastapi_install_after_the_generic_one_still_answers_problem_json(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FINEFLOW_STORAGE_URL", "memory://")
    app = create_app(problems=False)
    ff_install(app)
    install(app)
    *_, denied = await get_all(app, *["/search"] * 3)
    assert denied.status_code == 429
    assert denied.headers["content-type"] == "application/problem+json"
