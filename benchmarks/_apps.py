"""The apps under test: one Starlette app, bare or behind each contender's middleware.

Used in-process by :mod:`benchmarks.asgi` and, through :func:`http_app` (a uvicorn
``--factory``), by :mod:`benchmarks.http`. fineflow names that are still being written are
imported defensively: a missing one makes its contender ``None`` (skipped with a note).
"""

from __future__ import annotations

import importlib
import inspect
import os
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

__all__ = [
    "ALLOW_QUOTA",
    "DENY_QUOTA",
    "SCRAPE_EVERY",
    "SCRAPE_INTERVAL",
    "Passthrough",
    "build",
    "fineflow_name",
    "http_app",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Seconds between two scrapes of the ``-export`` variants under uvicorn (Prometheus's own
#: default is 15 s to 1 min: this is pessimistic).
SCRAPE_INTERVAL = 1.0
#: Requests between two scrapes of the ``-export`` variants in the instruction counts.
SCRAPE_EVERY = 1_000

#: A quota no benchmark can exhaust (the allowed path) and one exhausted at once (429 path).
ALLOW_QUOTA = "1000000/second"
DENY_QUOTA = "1/hour"

_CANDIDATES = {
    "RateLimitMiddleware": ("fineflow", "fineflow._ratelimit.middleware"),
    "Rule": ("fineflow", "fineflow._ratelimit.rules"),
    "CircuitBreaker": ("fineflow", "fineflow._breaker.breaker"),
    "CircuitBreakerMiddleware": (
        "fineflow",
        "fineflow._breaker_asgi",
        "fineflow._breaker.middleware",
        "fineflow._breaker.http",
        "fineflow._middleware_breaker",
        "fineflow.breaker",
    ),
}


def fineflow_name(name: str) -> Any:
    """A fineflow public name, wherever it lives today, or ``None`` if it is not written yet."""
    for module in _CANDIDATES.get(name, ("fineflow",)):
        try:
            value = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if value is not None:
            return value
    return None


class Passthrough:
    """The floor: a pure ASGI middleware that does nothing but call the app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


async def hello(request: Request) -> Response:
    """The endpoint every contender protects."""
    return PlainTextResponse("hello")


async def _authenticate(scope: Scope) -> tuple[str, str]:
    # asgi-ratelimit's own ``client_ip`` refuses non-global addresses (127.0.0.1); this is
    # the cheapest equivalent: the peer address, one group.
    client = scope.get("client") or ("unknown", 0)
    return str(client[0]), "default"


def _tier_of_caller(scope: Scope) -> str:
    # Where a real app would read the caller's plan (a header, a token, the session).
    return "pro"


def _fineflow_middleware(**kwargs: Any) -> Middleware | None:
    cls, rule = fineflow_name("RateLimitMiddleware"), fineflow_name("Rule")
    if cls is None or rule is None:
        return None
    quota = kwargs.pop("quota", ALLOW_QUOTA)
    return Middleware(cls, rules=[rule("/{path:path}", quota=quota)], **kwargs)


def _breaker_middleware() -> Middleware | None:
    cls, breaker = fineflow_name("CircuitBreakerMiddleware"), fineflow_name("CircuitBreaker")
    if cls is None or breaker is None:
        return None
    params = inspect.signature(cls).parameters
    if "breaker" in params:
        return Middleware(cls, breaker=breaker("bench"))
    if "registry" in params:
        registry = fineflow_name("BreakerRegistry")
        return Middleware(cls, registry=registry())
    return Middleware(cls)


def build(variant: str, **options: Any) -> Starlette | None:
    """The Starlette app for ``variant`` (``None`` when that contender is unavailable).

    Variants: ``bare``, ``passthrough``, ``floor`` (the least middleware with fineflow's
    contract: :class:`benchmarks._floors.MinimalRateLimit`), ``fineflow-memory``,
    ``fineflow-memory-429``, ``fineflow-memory-export`` (``fineflow-memory`` with
    ``fineflow.prometheus.register`` into ``app.state.metrics_registry``, scraped every
    ``SCRAPE_INTERVAL`` s under uvicorn), ``fineflow-tiers`` (three tiers, a tier function),
    ``fineflow-postgres`` (``limiter=`` or ``dsn=``/``schema=``), ``fineflow-redis``
    (``redis_url=``/``prefix=``), ``asgi-ratelimit``,
    ``slowapi`` (decorator + ``SlowAPIMiddleware``), ``slowapi-decorator``, ``breaker``.
    """
    endpoint: Callable[..., Any] = hello
    middleware: list[Middleware] = []
    exception_handlers: dict[Any, Any] = {}
    state: dict[str, Any] = {}
    if variant == "bare":
        pass
    elif variant == "passthrough":
        middleware.append(Middleware(Passthrough))
    elif variant == "floor":
        from ._floors import MinimalRateLimit

        middleware.append(Middleware(MinimalRateLimit, quota=ALLOW_QUOTA))
    elif variant == "fineflow-tiers":
        from fineflow import MemoryStorage

        cls, rule = fineflow_name("RateLimitMiddleware"), fineflow_name("Rule")
        if cls is None or rule is None:
            return None
        tiers = {"free": "100/minute", "pro": ALLOW_QUOTA, "enterprise": ALLOW_QUOTA}
        middleware.append(
            Middleware(
                cls,
                storage=MemoryStorage(),
                rules=[rule("/{path:path}", tiers=tiers)],
                tier=_tier_of_caller,
            )
        )
    elif variant in ("fineflow-memory", "fineflow-memory-429", "fineflow-memory-export"):
        from fineflow import MemoryStorage

        quota = DENY_QUOTA if variant.endswith("429") else ALLOW_QUOTA
        mw = _fineflow_middleware(storage=MemoryStorage(), quota=quota)
        if mw is None:
            return None
        middleware.append(mw)
        if variant.endswith("export"):
            state["metrics_registry"] = _exported()
    elif variant == "fineflow-postgres":
        if "limiter" in options:
            mw = _fineflow_middleware(limiter=options["limiter"])
        else:
            from fineflow import PostgresStorage

            storage = PostgresStorage(options["dsn"], schema=options.get("schema", "bench_http"))
            mw = _fineflow_middleware(storage=storage)
        if mw is None:
            return None
        middleware.append(mw)
    elif variant == "fineflow-redis":
        from fineflow import RedisStorage

        redis_storage = RedisStorage(options["redis_url"], prefix=options.get("prefix", "bench"))
        mw = _fineflow_middleware(storage=redis_storage)
        if mw is None:
            return None
        middleware.append(mw)
    elif variant == "asgi-ratelimit":
        from ratelimit import RateLimitMiddleware as PeerMiddleware
        from ratelimit import Rule as PeerRule
        from ratelimit.backends.simple import MemoryBackend

        middleware.append(
            Middleware(
                PeerMiddleware,
                authenticate=_authenticate,
                backend=MemoryBackend(),
                config={r"^/": [PeerRule(second=1_000_000)]},
            )
        )
    elif variant in ("slowapi", "slowapi-decorator"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # starlette.Config: ".env" not found
            from slowapi import Limiter, _rate_limit_exceeded_handler
            from slowapi.errors import RateLimitExceeded
            from slowapi.middleware import SlowAPIMiddleware
            from slowapi.util import get_remote_address

            limiter = Limiter(key_func=get_remote_address, storage_uri="memory://")
        endpoint = limiter.limit(ALLOW_QUOTA)(_slowapi_hello())
        exception_handlers[RateLimitExceeded] = _rate_limit_exceeded_handler
        state["limiter"] = limiter
        if variant == "slowapi":
            middleware.append(Middleware(SlowAPIMiddleware))
    elif variant == "breaker":
        mw = _breaker_middleware()
        if mw is None:
            return None
        middleware.append(mw)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    app = Starlette(
        routes=[Route("/", endpoint)],
        middleware=middleware,
        exception_handlers=exception_handlers,
    )
    for key, value in state.items():
        setattr(app.state, key, value)
    return app


def _exported() -> Any:
    """A prometheus_client registry with fineflow's collector registered in it."""
    from prometheus_client import CollectorRegistry

    import fineflow.prometheus

    registry = CollectorRegistry()
    fineflow.prometheus.register(registry)
    return registry


def _scrape_every(registry: Any, seconds: float) -> None:
    """Scrape ``registry`` every ``seconds`` on a daemon thread, as a Prometheus server
    polling ``/metrics`` would make the process do (prometheus_client's own HTTP server
    scrapes on a thread too)."""
    from prometheus_client import generate_latest

    def scrape() -> None:
        while True:
            time.sleep(seconds)
            generate_latest(registry)

    threading.Thread(target=scrape, name="bench-scrape", daemon=True).start()


def _slowapi_hello() -> Callable[[Request], Awaitable[Response]]:
    # A distinct function per app: slowapi registers limits by the endpoint's name.
    async def hello(request: Request) -> Response:
        return PlainTextResponse("hello")

    return hello


def http_app() -> Starlette:
    """uvicorn ``--factory`` entry point: the variant named by ``BENCH_VARIANT``."""
    variant = os.environ["BENCH_VARIANT"]
    app = build(
        variant,
        dsn=os.environ.get("BENCH_DSN", ""),
        schema=os.environ.get("BENCH_SCHEMA", "bench_http"),
        redis_url=os.environ.get("BENCH_REDIS_URL", ""),
        prefix=os.environ.get("BENCH_REDIS_PREFIX", "bench"),
    )
    if app is None:
        raise SystemExit(f"benchmark variant {variant!r} is not available")
    registry = getattr(app.state, "metrics_registry", None)
    if registry is not None:
        _scrape_every(registry, SCRAPE_INTERVAL)
    return app
