"""A Quart app whose views carry ``@ff.limit``: driven by Quart's test client and served by
uvicorn in test_limit_decorator.py (``uvicorn --factory quart_limited_app:create_app``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from quart import Quart, request, websocket

import fineflow as ff


def create_app(limiter: ff.RateLimiter | None = None) -> Quart:
    """The app; its limits use ``limiter``, else the one of a middleware around the app,
    else the default storage (``FINEFLOW_STORAGE_URL``)."""
    app = Quart(__name__)

    @app.route("/search")
    @ff.limit("2/minute", name="search", limiter=limiter)
    async def search() -> dict[str, Any]:
        decisions = request.scope["state"]["fineflow_route"]
        return {"remaining": decisions[0].remaining}

    @app.route("/users/<int:user_id>")
    @ff.limit("1/minute", name="users", limiter=limiter)
    async def user(user_id: int) -> dict[str, Any]:
        return {"id": user_id}

    @app.route("/stream")
    @ff.limit("1/minute", limiter=limiter)
    async def stream() -> tuple[AsyncIterator[bytes], int, dict[str, str]]:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"a"
            yield b"b"

        return chunks(), 200, {"content-type": "text/plain"}

    @app.route("/free")
    @ff.limit("1/minute", limiter=limiter, enabled=False)
    async def free() -> str:
        return "free"

    @app.websocket("/ws")
    @ff.limit("1/minute", name="ws", limiter=limiter)
    async def echo() -> None:
        await websocket.accept()
        await websocket.send(await websocket.receive())

    return app
