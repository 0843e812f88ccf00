"""``@ff.limit``: a limit declared on a Starlette endpoint."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

import fineflow as ff
from asgi_helpers import sf
from fineflow.testing import FakeClock

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
