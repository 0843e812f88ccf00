"""Quart behind RateLimitMiddleware, wrapped around ``app.asgi_app``.

Run it with ``python examples/quart_app.py`` (serves on http://127.0.0.1:8000)::

    curl -i http://127.0.0.1:8000/hello/world

State lives in memory unless ``FINEFLOW_DSN`` names a PostgreSQL database.
"""

from __future__ import annotations

import os
from typing import Any

from quart import Quart, request

from fineflow import MemoryStorage, RateLimitMiddleware, Rule, Storage, keys

API_KEYS = {"free-key": "free", "pro-key": "pro", "enterprise-key": "enterprise"}
_api_key = keys.header("x-api-key")
_client_ip = keys.client_ip()


def caller(scope: Any) -> str | None:
    """Known API keys per key, everyone else per client address."""
    key = _api_key(scope)
    return f"key:{key}" if key in API_KEYS else f"ip:{_client_ip(scope)}"


def tier(scope: Any) -> str | None:
    """The caller's tier (``None``: the default tier)."""
    return API_KEYS.get(_api_key(scope) or "")


RULES = [
    Rule(
        "/hello/{name}",
        tiers={"free": "5/minute", "pro": "50/minute", "enterprise": "500/minute"},
        key=caller,
        name="hello",
    ),
]


def default_storage() -> Storage:
    """PostgreSQL when ``FINEFLOW_DSN`` is set, else memory (one process)."""
    if os.environ.get("FINEFLOW_DSN"):
        from fineflow import PostgresStorage

        return PostgresStorage(os.environ["FINEFLOW_DSN"])
    return MemoryStorage()


def create_app(storage: Storage | None = None, **options: Any) -> Quart:
    """The example app; ``options`` go to :class:`fineflow.RateLimitMiddleware`."""
    quart_app = Quart(__name__)

    @quart_app.route("/hello/<name>")
    async def hello(name: str) -> dict[str, Any]:
        decisions = request.scope["state"]["fineflow"]
        return {"hello": name, "remaining": decisions[0].remaining}

    @quart_app.route("/health")
    async def health() -> dict[str, bool]:
        return {"ok": True}

    quart_app.asgi_app = RateLimitMiddleware(  # type: ignore[assignment]
        quart_app.asgi_app,  # type: ignore[arg-type]
        storage=storage if storage is not None else default_storage(),
        rules=RULES,
        tier=tier,
        default_tier="free",
        **options,
    )
    return quart_app


app = create_app()

if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
