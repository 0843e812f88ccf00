"""Starlette behind RateLimitMiddleware: tiers by API key, a per-route rule, CORS headers.

Run it with ``python examples/starlette_app.py`` (serves on http://127.0.0.1:8000), then::

    curl -i http://127.0.0.1:8000/api/users/1
    curl -i -H 'x-api-key: pro-key' http://127.0.0.1:8000/api/users/1

State lives in memory unless ``FINEFLOW_DSN`` names a PostgreSQL database.
"""

from __future__ import annotations

import os
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fineflow import MemoryStorage, RateLimitMiddleware, Rule, Storage, keys

# Demo accounts: API key -> tier. A real app looks keys up in its user store.
API_KEYS = {"free-key": "free", "pro-key": "pro", "enterprise-key": "enterprise"}
TIERS = {"free": "10/minute", "pro": "100/minute", "enterprise": "1000/minute"}
_api_key = keys.header("x-api-key")
_client_ip = keys.client_ip()


def caller(scope: Any) -> str | None:
    """Known API keys are limited per key; everyone else per client address.

    Unknown keys must not get a bucket of their own, or a client could send a fresh
    made-up key with every request and never be limited.
    """
    key = _api_key(scope)
    return f"key:{key}" if key in API_KEYS else f"ip:{_client_ip(scope)}"


def tier(scope: Any) -> str | None:
    """The caller's tier (``None``: the default tier, ``free``)."""
    return API_KEYS.get(_api_key(scope) or "")


RULES = [
    Rule("/api/{path:path}", tiers=TIERS, key=caller, name="api"),
    Rule("/api/search", quota="2/second", key=caller, name="search"),
]


def default_storage() -> Storage:
    """PostgreSQL when ``FINEFLOW_DSN`` is set, else memory (one process)."""
    if os.environ.get("FINEFLOW_DSN"):
        from fineflow import PostgresStorage

        return PostgresStorage(os.environ["FINEFLOW_DSN"])
    return MemoryStorage()


async def user(request: Request) -> Response:
    decisions = request.state.fineflow
    return JSONResponse({"user": request.path_params["id"], "remaining": decisions[0].remaining})


async def search(request: Request) -> Response:
    return JSONResponse({"results": [], "q": request.query_params.get("q", "")})


async def health(request: Request) -> Response:
    return JSONResponse({"ok": True})


def create_app(storage: Storage | None = None, **options: Any) -> Starlette:
    """The example app; ``options`` go to :class:`fineflow.RateLimitMiddleware`."""
    return Starlette(
        routes=[
            Route("/api/users/{id}", user),
            Route("/api/search", search),
            Route("/health", health),
        ],
        middleware=[
            Middleware(
                CORSMiddleware,
                allow_origins=["*"],
                expose_headers=["RateLimit", "RateLimit-Policy", "Retry-After"],
            ),
            Middleware(
                RateLimitMiddleware,
                storage=storage if storage is not None else default_storage(),
                rules=RULES,
                tier=tier,
                default_tier="free",
                **options,
            ),
        ],
    )


app = create_app()

if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
