"""The app served by uvicorn in ``test_e2e_uvicorn.py`` (``uvicorn --factory e2e_app:create_app``,
one copy per worker process).

Configured from the environment so several independent uvicorn processes share one schema:
``FINEFLOW_E2E_DSN`` (the session's database), ``FINEFLOW_E2E_SCHEMA`` (a unique schema) and
``FINEFLOW_E2E_QUOTA`` (default ``50/minute``). Every worker owns its own
``PostgresStorage`` pool, opened and migrated on lifespan startup by the middleware.
"""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from fineflow import PostgresStorage, RateLimitMiddleware, Rule, keys

__all__ = ["create_app"]


async def limited(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok", headers={"x-worker": str(os.getpid())})


async def ping(request: Request) -> PlainTextResponse:
    return PlainTextResponse("pong", headers={"x-worker": str(os.getpid())})


def create_app() -> Starlette:
    """The Starlette app behind ``RateLimitMiddleware`` with PostgreSQL storage."""
    storage = PostgresStorage(
        os.environ["FINEFLOW_E2E_DSN"],
        schema=os.environ["FINEFLOW_E2E_SCHEMA"],
        max_size=4,
    )
    return Starlette(
        routes=[Route("/limited", limited), Route("/ping", ping)],
        middleware=[
            Middleware(
                RateLimitMiddleware,
                storage=storage,
                rules=[Rule("/limited", quota=os.environ.get("FINEFLOW_E2E_QUOTA", "50/minute"))],
                key=keys.header("x-client", default="anonymous"),
                # Generous: a cold pool must not turn a decision into on_storage_error, and a
                # failure shows up as 503 (never as an extra 200) if it happens anyway.
                timeout=2.0,
                on_storage_error="deny",
            )
        ],
    )
