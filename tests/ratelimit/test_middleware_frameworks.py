"""RateLimitMiddleware inside real frameworks: Starlette, FastAPI and Quart."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from quart import Quart
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from asgi_helpers import (
    RecordingStorage,
    TestClient,
    WebSocketDenialResponse,
    sf,
)
from fineflow import MemoryStorage, RateLimitMiddleware, Rule


async def user(request: Request) -> Response:
    remaining = request.state.fineflow[0].remaining
    return JSONResponse({"id": request.path_params["id"], "remaining": remaining})


async def stream(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(3):
            yield b"chunk%d\n" % i

    return StreamingResponse(chunks(), media_type="text/plain")


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    text = await websocket.receive_text()
    await websocket.send_text(text.upper())
    await websocket.close()


def starlette_app(storage: MemoryStorage | RecordingStorage, **options: Any) -> Starlette:
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        events.append("app startup")
        yield
        events.append("app shutdown")

    app = Starlette(
        routes=[
            Route("/users/{id}", user),
            Route("/stream", stream),
            WebSocketRoute("/ws", echo),
        ],
        middleware=[
            Middleware(
                CORSMiddleware,
                allow_origins=["*"],
                expose_headers=["RateLimit", "RateLimit-Policy", "Retry-After"],
            ),
            Middleware(
                RateLimitMiddleware,
                storage=storage,
                rules=[
                    Rule("/users/{id}", quota="2/minute", name="users"),
                    Rule("/stream", quota="5/minute", name="stream"),
                    Rule("/ws", quota="1/minute", name="ws"),
                ],
                **options,
            ),
        ],
        lifespan=lifespan,
    )
    app.state.events = events
    return app


@pytest.mark.anyio
async def test_starlette_through_httpx_asgi_transport() -> None:
    app = starlette_app(MemoryStorage())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        first = await client.get("/users/1", headers={"origin": "http://a.example"})
        assert first.status_code == 200
        assert first.json() == {"id": "1", "remaining": 1}
        assert "ratelimit" in first.headers["access-control-expose-headers"].lower()
        assert sf(first.headers["ratelimit"].encode()) == [("users", {"r": 1, "t": 30})]
        assert (await client.get("/users/2")).status_code == 200  # same template
        denied = await client.get("/users/3")
        assert denied.status_code == 429
        assert denied.headers["content-type"] == "application/problem+json"
        assert denied.headers["retry-after"] == "30"
        assert denied.json()["violated-policies"] == ["users"]
        streamed = await client.get("/stream")
        assert streamed.text == "chunk0\nchunk1\nchunk2\n"
        assert "ratelimit" in streamed.headers


def test_starlette_test_client_lifespan_opens_and_closes_the_owned_storage() -> None:
    storage = RecordingStorage()
    app = starlette_app(storage)
    with TestClient(app) as client:
        assert storage.calls == ["open", "migrate"]
        assert app.state.events == ["app startup"]  # the storage opened before the app
        assert client.get("/users/7").status_code == 200
        with client.stream("GET", "/stream") as response:
            assert list(response.iter_lines()) == ["chunk0", "chunk1", "chunk2"]
    assert storage.calls == ["open", "migrate", "close"]
    assert app.state.events == ["app startup", "app shutdown"]


def test_starlette_websockets_pass_through_then_are_denied_with_a_response() -> None:
    app = starlette_app(MemoryStorage())
    with TestClient(app) as client:
        with client.websocket_connect("/ws") as ws:
            ws.send_text("hello")
            assert ws.receive_text() == "HELLO"
        with pytest.raises(WebSocketDenialResponse) as denied, client.websocket_connect("/ws"):
            pass  # pragma: no cover - the handshake is refused
    response = denied.value
    assert response.status_code == 429
    assert response.headers["retry-after"] == "60"
    assert response.json()["violated-policies"] == ["ws"]


def test_starlette_migrate_false_only_opens() -> None:
    storage = RecordingStorage()
    with TestClient(starlette_app(storage, migrate=False)):
        pass
    assert storage.calls == ["open", "close"]


@pytest.mark.anyio
async def test_fastapi_router_routes_are_limited() -> None:
    router = APIRouter(prefix="/v1")

    @router.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"item": item_id}

    app = FastAPI()
    app.include_router(router)
    app.add_middleware(
        RateLimitMiddleware,
        storage=MemoryStorage(),
        rules=[Rule("/v1/items/{item_id:int}", quota="1/minute", name="items")],
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        ok = await client.get("/v1/items/1")
        assert ok.json() == {"item": 1}
        assert "ratelimit-policy" in ok.headers
        denied = await client.get("/v1/items/2")
        assert denied.status_code == 429
        assert denied.json()["violated-policies"] == ["items"]


def test_fastapi_with_test_client() -> None:
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> PlainTextResponse:
        return PlainTextResponse("pong")

    app.add_middleware(
        RateLimitMiddleware, storage=MemoryStorage(), rules=[Rule("/ping", quota="1/minute")]
    )
    with TestClient(app) as client:
        assert client.get("/ping").text == "pong"
        assert client.get("/ping").status_code == 429


@pytest.mark.anyio
async def test_quart_test_client() -> None:
    app = Quart(__name__)

    @app.route("/hello/<name>")
    async def hello(name: str) -> str:
        return f"hello {name}"

    app.asgi_app = RateLimitMiddleware(  # type: ignore[assignment]
        app.asgi_app,  # type: ignore[arg-type]
        storage=MemoryStorage(),
        rules=[Rule("/hello/{name}", quota="2/minute", name="hello")],
    )
    client = app.test_client()
    first = await client.get("/hello/a")
    assert first.status_code == 200
    assert await first.get_data(as_text=True) == "hello a"
    assert sf(first.headers["RateLimit"].encode()) == [("hello", {"r": 1, "t": 30})]
    assert (await client.get("/hello/b")).status_code == 200
    denied = await client.get("/hello/c")
    assert denied.status_code == 429
    assert denied.headers["Retry-After"] == "30"
    assert (await denied.get_json())["violated-policies"] == ["hello"]
