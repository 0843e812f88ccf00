"""The app the rate-limit observability tests scrape.

A ``RateLimitMiddleware`` with two rules (``tiered``: 3/minute for ``free``, 5/minute for
``pro`` callers on ``/tiered``; ``global``: 12/minute on every path, tier from the
``x-tier`` header), an inner shadow-mode middleware on ``/shadow`` (``shadow``: 2/minute),
and ``/metrics`` beside them (exempt). Each answer says what the limits decided, so the
client can tally them: ``{"failed": <the outer decision came from on_storage_error>,
"shadow_denied": <the shadow rule would have denied> or null}``.

The outer storage: ``OBS_DSN`` (with ``OBS_SCHEMA``) for a ``PostgresStorage``, else a
``MemoryStorage``. Metrics: as ``obs_metrics_app`` (multiprocess with
``PROMETHEUS_MULTIPROC_DIR``).
"""

from __future__ import annotations

import json
import os

from obs_metrics_app import ASGIApp, Receive, Scope, Send, metrics_registry
from prometheus_client import CollectorRegistry, make_asgi_app

import fineflow as ff

RULES = [
    ff.Rule("/tiered", tiers={"free": "3/minute", "pro": "5/minute"}, name="tiered"),
    ff.Rule("/{path:path}", quota="12/minute", name="global"),
]
SHADOW_RULE = ff.Rule("/shadow", quota="2/minute", name="shadow")


def tier_of(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"x-tier":
            return str(value.decode())
    return None


async def echo(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers with what the limits decided (see the module doc)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})  # startup / shutdown
            if message["type"] == "lifespan.shutdown":
                return
    state = scope["state"]
    shadow = state["fineflow"] if scope["path"] == "/shadow" else None
    body = {
        "failed": state["outer"].storage_failed,
        "shadow_denied": None if shadow is None else not shadow.allowed,
    }
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


def outer_storage() -> ff.MemoryStorage | ff.PostgresStorage:
    dsn = os.environ.get("OBS_DSN")
    if not dsn:
        return ff.MemoryStorage()
    return ff.PostgresStorage(dsn, schema=os.environ["OBS_SCHEMA"])


def create_app(
    registry: CollectorRegistry | None = None, storage: ff.PostgresStorage | None = None
) -> ASGIApp:
    shadowed = ff.RateLimitMiddleware(
        echo, storage=ff.MemoryStorage(), rules=[SHADOW_RULE], shadow=True
    )

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            scope["state"]["outer"] = scope["state"]["fineflow"]
        await shadowed(scope, receive, send)

    limited = ff.RateLimitMiddleware(
        inner,
        storage=outer_storage() if storage is None else storage,
        rules=RULES,
        tier=tier_of,
        exempt_paths=["/metrics"],
        timeout=2.0,  # a busy test machine: a slow answer is not what these tests look at
    )
    metrics = make_asgi_app(metrics_registry() if registry is None else registry)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/metrics":
            await metrics(scope, receive, send)
        else:
            await limited(scope, receive, send)

    return app
