"""A raw ASGI app (no framework) behind RateLimitMiddleware.

Run it with ``python examples/raw_asgi.py`` (serves on http://127.0.0.1:8000)::

    curl -i http://127.0.0.1:8000/users/1

The app answers the lifespan protocol, so the middleware opens the storage it owns at
startup and closes it at shutdown. State lives in memory unless ``FINEFLOW_DSN`` names a
PostgreSQL database.
"""

from __future__ import annotations

import json
import os
from typing import Any

from fineflow import MemoryStorage, RateLimitMiddleware, Rule, Storage, keys

RULES = [
    Rule("/users/{id}", quota="10/minute", name="users"),
    Rule("/{path:path}", quota=["5/second", "1000/day"], name="global"),
]


def default_storage() -> Storage:
    """PostgreSQL when ``FINEFLOW_DSN`` is set, else memory (one process)."""
    if os.environ.get("FINEFLOW_DSN"):
        from fineflow import PostgresStorage

        return PostgresStorage(os.environ["FINEFLOW_DSN"])
    return MemoryStorage()


async def inner_app(scope: Any, receive: Any, send: Any) -> None:
    """A minimal ASGI app: JSON for every path, and the lifespan protocol."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    decisions = scope.get("state", {}).get("fineflow")
    remaining = None if decisions is None else min(d.remaining for d in decisions)
    body = json.dumps({"path": scope["path"], "remaining": remaining}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


def create_app(storage: Storage | None = None, **options: Any) -> RateLimitMiddleware:
    """The example app; ``options`` go to :class:`fineflow.RateLimitMiddleware`."""
    options.setdefault("key", keys.client_ip())
    return RateLimitMiddleware(
        inner_app,
        storage=storage if storage is not None else default_storage(),
        rules=RULES,
        exempt_paths=["/health"],
        **options,
    )


app = create_app()

if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
