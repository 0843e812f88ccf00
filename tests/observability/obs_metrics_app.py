"""The app the observability tests scrape: a ``CircuitBreakerMiddleware`` around routes that
succeed (``/ok``) or fail (``/fail``, 500), and ``/metrics`` beside it (not guarded).

With ``PROMETHEUS_MULTIPROC_DIR`` set (several uvicorn workers), ``/metrics`` serves what every
worker copied into that directory (``fineflow.prometheus.start_multiprocess``); else the
scrape-time collector of this process (``fineflow.prometheus.register``).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, make_asgi_app

import fineflow as ff
import fineflow.prometheus

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

NAME = "obs-upstream"
FAILURES_TO_OPEN = 3


async def upstream(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    status = 500 if scope["path"] == "/fail" else 200
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b"ok" if status == 200 else b"boom"})


def metrics_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client.multiprocess import MultiProcessCollector

        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        fineflow.prometheus.start_multiprocess(interval=0.1)
    else:
        fineflow.prometheus.register(registry)
    return registry


def create_app(name: str = NAME, registry: CollectorRegistry | None = None) -> ASGIApp:
    breaker = ff.CircuitBreaker(name, failure_threshold=FAILURES_TO_OPEN, reset_timeout=3600)
    guarded = ff.CircuitBreakerMiddleware(upstream, breaker=breaker)
    metrics = make_asgi_app(metrics_registry() if registry is None else registry)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        elif scope.get("path") == "/metrics":
            await metrics(scope, receive, send)
        else:
            await guarded(scope, receive, send)

    app.breaker = breaker  # type: ignore[attr-defined]  # kept alive with the app
    return app
