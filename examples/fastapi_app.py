"""FastAPI behind RateLimitMiddleware: router routes are limited like any other path.

Run it with ``python examples/fastapi_app.py`` (serves on http://127.0.0.1:8000)::

    curl -i -X POST -H 'x-api-key: pro-key' 'http://127.0.0.1:8000/v1/chat?tokens=40'

The chat rule charges a cost per request (the tokens asked for) from a per-tier budget.
State lives in memory unless ``FINEFLOW_DSN`` names a PostgreSQL database.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, FastAPI, Request

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


def tokens(scope: Any) -> int:
    """The cost of a chat request: the tokens asked for (1..100)."""
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    try:
        return min(max(int(query.get("tokens", ["1"])[0]), 1), 100)
    except ValueError:
        return 1


RULES = [
    Rule(
        "/v1/{path:path}",
        tiers={"free": "30/minute", "pro": "300/minute", "enterprise": "3000/minute"},
        key=caller,
        name="v1",
    ),
    Rule(
        "/v1/chat",
        ["POST"],
        tiers={"free": "100/hour", "pro": "1000/hour", "enterprise": "10000/hour"},
        key=caller,
        cost=tokens,
        name="chat-tokens",
    ),
]


def default_storage() -> Storage:
    """PostgreSQL when ``FINEFLOW_DSN`` is set, else memory (one process)."""
    if os.environ.get("FINEFLOW_DSN"):
        from fineflow import PostgresStorage

        return PostgresStorage(os.environ["FINEFLOW_DSN"])
    return MemoryStorage()


router = APIRouter(prefix="/v1")


@router.get("/items/{item_id}")
async def item(item_id: int) -> dict[str, int]:
    return {"item": item_id}


@router.post("/chat")
async def chat(request: Request, tokens: int = 1) -> dict[str, Any]:
    decisions = request.state.fineflow
    return {"tokens": tokens, "remaining": min(d.remaining for d in decisions)}


def create_app(storage: Storage | None = None, **options: Any) -> FastAPI:
    """The example app; ``options`` go to :class:`fineflow.RateLimitMiddleware`."""
    app = FastAPI(title="fineflow FastAPI example")
    app.include_router(router)
    app.add_middleware(
        RateLimitMiddleware,
        storage=storage if storage is not None else default_storage(),
        rules=RULES,
        tier=tier,
        default_tier="free",
        **options,
    )
    return app


app = create_app()

if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
