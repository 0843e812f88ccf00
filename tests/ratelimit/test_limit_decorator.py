"""``@ff.limit``: a limit declared on a Starlette endpoint or a Quart view (Quart's test
client and a real uvicorn)."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from asgi_lifespan import LifespanManager
from quart.testing.connections import WebsocketResponseError
from quart_limited_app import create_app as create_quart_app
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route

import fineflow as ff
from asgi_helpers import sf
from fineflow.testing import FakeClock, UvicornProcess
from pg_connections import connections, connections_left

pytestmark = pytest.mark.anyio


def create_app(limiter: ff.RateLimiter | None = None, **mw: object) -> Starlette:
    @ff.limit("2/minute", name="search", limiter=limiter)
    async def search(request: Request) -> Response:
        remaining = request.state.fineflow_route[0].remaining
        return JSONResponse({"remaining": remaining})

    @ff.limit("1/minute", limiter=limiter)
    async def stream(request: Request) -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"a"
            yield b"b"

        return StreamingResponse(chunks())

    @ff.limit("1/minute", limiter=limiter, enabled=False)
    async def free(request: Request) -> Response:
        return PlainTextResponse("free")

    return Starlette(
        routes=[Route("/search", search), Route("/stream", stream), Route("/free", free)],
        middleware=[Middleware(ff.RateLimitMiddleware, **mw)] if mw else None,  # type: ignore[arg-type]
    )


async def get_all(app: Starlette, *paths: str) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return [await client.get(p) for p in paths]


async def test_a_decorated_endpoint_sends_headers_then_the_problem_429() -> None:
    clock = FakeClock()
    limiter = ff.RateLimiter(ff.MemoryStorage(clock=clock.time_ns))
    ok, ok2, denied = await get_all(create_app(limiter), "/search", "/search", "/search")
    assert ok.json() == {"remaining": 1} and ok2.json() == {"remaining": 0}
    assert sf(ok.headers["ratelimit-policy"].encode()) == [("search", {"q": 2, "w": 60})]
    assert denied.status_code == 429
    assert denied.headers["content-type"] == "application/problem+json"
    assert denied.headers["retry-after"] == "30"
    assert denied.json()["violated-policies"] == ["search"]
    clock.advance(30)
    assert (await get_all(create_app(limiter), "/search"))[0].status_code == 200


async def test_streaming_responses_stream_with_headers_and_names_default_to_the_endpoint() -> None:
    limiter = ff.RateLimiter(ff.MemoryStorage())
    first, second = await get_all(create_app(limiter), "/stream", "/stream")
    assert first.text == "ab"
    name = sf(first.headers["ratelimit-policy"].encode())[0][0]
    assert str(name).endswith("create_app.<locals>.stream")
    assert second.status_code == 429


async def test_disabled_endpoints_and_the_middlewares_limiter() -> None:
    storage = ff.MemoryStorage()
    app = create_app(storage=storage, rules=[ff.Rule("/other", quota="1/second")])
    responses = await get_all(app, "/free", "/free", "/search", "/search", "/search")
    assert [r.status_code for r in responses] == [200, 200, 200, 200, 429]
    assert "ratelimit" not in responses[0].headers
    status = await storage.status("127.0.0.1")
    assert [(s.endpoint, s.allowed_total) for s in status] == [("search", 2)]


# -- Quart ------------------------------------------------------------------------------------


async def test_quart_views_send_headers_then_the_problem_429() -> None:
    clock = FakeClock()
    app = create_quart_app(ff.RateLimiter(ff.MemoryStorage(clock=clock.time_ns)))
    client = app.test_client()
    ok, ok2, denied = [await client.get("/search") for _ in range(3)]
    assert await ok.get_json() == {"remaining": 1} and await ok2.get_json() == {"remaining": 0}
    assert sf(ok.headers["ratelimit-policy"].encode()) == [("search", {"q": 2, "w": 60})]
    assert sf(ok.headers["ratelimit"].encode()) == [("search", {"r": 1, "t": 30})]
    assert denied.status_code == 429
    assert denied.headers["content-type"] == "application/problem+json"
    assert denied.headers["retry-after"] == "30"
    assert (await denied.get_json())["violated-policies"] == ["search"]
    assert "ratelimit" in denied.headers
    clock.advance(30)
    assert (await client.get("/search")).status_code == 200


async def test_quart_path_parameters_streams_and_disabled_views() -> None:
    app = create_quart_app(ff.RateLimiter(ff.MemoryStorage()))
    client = app.test_client()
    users = [await client.get(f"/users/{i}") for i in (1, 2)]
    assert await users[0].get_json() == {"id": 1}  # the path parameter reached the view
    assert [r.status_code for r in users] == [200, 429]  # one limit for every user id
    first, second = await client.get("/stream"), await client.get("/stream")
    assert await first.get_data() == b"ab" and "ratelimit" in first.headers
    assert str(sf(first.headers["ratelimit-policy"].encode())[0][0]).endswith(".stream")
    assert second.status_code == 429
    free = [await client.get("/free") for _ in range(3)]
    assert all(r.status_code == 200 and "ratelimit" not in r.headers for r in free)


async def test_quart_websocket_views_are_denied_at_the_handshake() -> None:
    client = create_quart_app(ff.RateLimiter(ff.MemoryStorage())).test_client()
    async with client.websocket("/ws") as ws:
        await ws.send("hi")
        assert await ws.receive() == "hi"
    with pytest.raises(WebsocketResponseError) as denied:
        async with client.websocket("/ws") as ws:
            await ws.send("again")
    assert denied.value.response.status_code == 429
    assert denied.value.response.headers["retry-after"] == "60"


async def test_quart_views_use_the_limiter_of_the_middleware_around_the_app() -> None:
    storage = ff.MemoryStorage()
    app = create_quart_app()
    app.asgi_app = ff.RateLimitMiddleware(  # type: ignore[assignment]
        app.asgi_app,  # type: ignore[arg-type]
        storage=storage,
        rules=[ff.Rule("/other", quota="1/second")],
    )
    client = app.test_client()
    assert [(await client.get("/search")).status_code for _ in range(3)] == [200, 200, 429]
    status = await storage.status("unknown")  # (Quart's test client sends no client address)
    assert [(s.endpoint, s.allowed_total, s.denied_total) for s in status] == [("search", 2, 1)]


@pytest.fixture
def quart_server() -> Iterator[UvicornProcess]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINEFLOW_")}
    env.update(FINEFLOW_STORAGE_URL="memory://", PYTHONUNBUFFERED="1")
    app_dir = Path(__file__).resolve().parent
    with UvicornProcess(
        "quart_limited_app:create_app", factory=True, app_dir=app_dir, env=env
    ) as process:
        process.wait_listening(60.0)
        yield process


def test_quart_views_under_a_real_uvicorn(quart_server: UvicornProcess) -> None:
    with httpx.Client(base_url=quart_server.url, timeout=10) as client:
        search = [client.get("/search") for _ in range(3)]
        assert [r.status_code for r in search] == [200, 200, 429]
        assert search[0].json() == {"remaining": 1}
        assert sf(search[0].headers["ratelimit-policy"].encode()) == [("search", {"q": 2, "w": 60})]
        assert search[2].headers["content-type"] == "application/problem+json"
        assert search[2].json()["violated-policies"] == ["search"]
        stream = client.get("/stream")
        assert stream.text == "ab" and "ratelimit" in stream.headers


# -- the app's default storage -------------------------------------------------------------


def shared_limit_app() -> Starlette:
    """Two endpoints under one limit name, without a limiter: the app's default storage."""

    @ff.limit("2/minute", name="shared")
    async def a(request: Request) -> Response:
        return PlainTextResponse("a")

    @ff.limit("2/minute", name="shared")
    async def b(request: Request) -> Response:
        return PlainTextResponse("b")

    return Starlette(routes=[Route("/a", a), Route("/b", b)])


async def test_every_endpoint_of_an_app_shares_its_default_storage_and_install_is_advised(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("FINEFLOW_STORAGE_URL", "memory://")
    app = shared_limit_app()
    with caplog.at_level(logging.WARNING, logger="fineflow.middleware"):
        statuses = [r.status_code for r in await get_all(app, "/a", "/a", "/b")]
        statuses += [r.status_code for r in await get_all(shared_limit_app(), "/b")]
    assert statuses == [200, 200, 429, 200]  # one storage per app (a new app: a new one)
    advice = [r.getMessage() for r in caplog.records if "fineflow.install(app)" in r.getMessage()]
    assert len(advice) == 2  # once per app
    caplog.clear()
    installed = shared_limit_app()
    ff.install(installed)
    ff.install(installed)  # (a second call does nothing)
    with caplog.at_level(logging.WARNING, logger="fineflow.middleware"):
        assert (await get_all(installed, "/a"))[0].status_code == 200
    assert not [r for r in caplog.records if "install(app)" in r.getMessage()]


async def test_install_closes_a_starlette_apps_default_storage_with_its_lifespan(
    monkeypatch: pytest.MonkeyPatch, pg_dsn: str
) -> None:
    name = f"ff_starlette_{secrets.token_hex(4)}"
    monkeypatch.delenv("FINEFLOW_STORAGE_URL", raising=False)
    dsn = psycopg.conninfo.make_conninfo(pg_dsn, application_name=name)
    monkeypatch.setenv("FINEFLOW_DSN", dsn)
    app = shared_limit_app()
    ff.install(app)
    for expected in ([200, 200, 429], [429, 429, 429]):  # a second lifespan: a new storage
        async with LifespanManager(app) as manager:
            assert await connections_left(pg_dsn, name) == 0  # nothing opened before needed
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                assert [(await client.get(p)).status_code for p in ("/a", "/b", "/a")] == expected
            assert connections(pg_dsn, name) >= 1
        assert await connections_left(pg_dsn, name) == 0


async def test_install_closes_a_quart_apps_default_storage_after_serving(
    monkeypatch: pytest.MonkeyPatch, pg_dsn: str
) -> None:
    name = f"ff_quart_{secrets.token_hex(4)}"
    monkeypatch.delenv("FINEFLOW_STORAGE_URL", raising=False)
    monkeypatch.setenv(
        "FINEFLOW_DSN", psycopg.conninfo.make_conninfo(pg_dsn, application_name=name)
    )
    app = create_quart_app()
    ff.install(app)
    async with app.test_app() as served:  # runs before_serving / after_serving
        client = served.test_client()
        statuses = [(await client.get(p)).status_code for p in ("/search", "/users/1", "/users/2")]
        assert statuses == [200, 200, 429]
        assert connections(pg_dsn, name) >= 1
    assert await connections_left(pg_dsn, name) == 0


def test_install_refuses_an_app_it_cannot_close_with() -> None:
    async def bare(scope: object, receive: object, send: object) -> None: ...

    with pytest.raises(ff.ConfigurationError, match="Starlette, FastAPI or Quart"):
        ff.install(bare)


async def test_a_mounted_apps_limits_use_the_installed_apps_default_storage(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("FINEFLOW_STORAGE_URL", "memory://")

    @ff.limit("2/minute", name="shared")
    async def inner(request: Request) -> Response:
        return PlainTextResponse("inner")

    sub = Starlette(routes=[Route("/b", inner)])
    main = shared_limit_app()
    main.router.routes.append(Mount("/sub", app=sub))
    ff.install(main)
    with caplog.at_level(logging.WARNING, logger="fineflow.middleware"):
        statuses = [r.status_code for r in await get_all(main, "/a", "/sub/b", "/sub/b")]
    assert statuses == [200, 200, 429]  # one storage: the installed app's
    assert not [r for r in caplog.records if "install(app)" in r.getMessage()]


async def test_install_after_the_app_started_says_to_call_it_at_setup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FINEFLOW_STORAGE_URL", "memory://")
    app = shared_limit_app()
    await get_all(app, "/a")  # (serving builds the middleware stack)
    with pytest.raises(ff.ConfigurationError, match="before the app starts"):
        ff.install(app)
