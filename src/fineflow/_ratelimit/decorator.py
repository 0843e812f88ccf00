"""``limit``: a rate limit declared on a Starlette or Quart endpoint.

The decorated endpoint is decided by a :class:`~.route.RouteLimit` (the rules, limiter,
headers and problem responses of the middleware) before it runs; an admitted request's
response is sent with the rate-limit headers added (the body is never touched), a denied
request gets the middleware's 429 (or 503) problem+json.

Which framework called is told by how it called: Starlette calls an endpoint with the
request as its one positional argument; Quart calls a view with keyword arguments only (its
path parameters) and keeps the request in a context (:mod:`.quart_view`).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ParamSpec, Protocol, cast

from .._asgi.types import ASGIApp, Receive, Scope, Send
from .appdefault import app_default, app_of
from .deniedlog import DeniedLog
from .gate import Headers, adding_headers
from .limiter import RateLimiter
from .route import RouteLimit
from .rules import CostFunc, QuotaFunc, QuotaSpec

__all__ = ["limit"]


class HasScope(Protocol):
    """What the decorated endpoint's argument offers: its ASGI scope (Starlette's
    ``Request`` and ``WebSocket`` do)."""

    @property
    def scope(self) -> Scope: ...


P = ParamSpec("P")
Endpoint = Callable[P, Awaitable[Any]]


def limit(
    quota: QuotaSpec | QuotaFunc | Mapping[str, QuotaSpec],
    *,
    name: str | None = None,
    key: Callable[[Scope], Any] | None = None,
    tier: Callable[[Scope], Any] | None = None,
    cost: int | CostFunc = 1,
    limiter: RateLimiter | None = None,
    enabled: bool = True,
    log_denied: bool | DeniedLog = False,
) -> Callable[[Endpoint[P]], Endpoint[P]]:
    """Limit a Starlette endpoint (``async def endpoint(request) -> Response``) or a Quart
    view (``async def view(**path_params)``, below ``@app.route``).

    ::

        @ff.limit("5/minute")
        async def search(request): ...  # Starlette

        @app.route("/search")
        @ff.limit("5/minute")
        async def search(): ...  # Quart

    Args: as :class:`fineflow.fastapi.RateLimit`'s; ``name`` defaults to the endpoint's
    module and qualified name. Without ``limiter=`` or a middleware, the app's default
    storage decides (one per app; :func:`fineflow.install` closes it with the app). The
    decisions are in ``request.state.fineflow_route`` (Starlette) or
    ``request.scope["state"]["fineflow_route"]`` (Quart).

    Raises:
        ConfigurationError: for an invalid quota, key, tier or cost (at decoration).
    """
    route = RouteLimit(
        quota,
        key=key,
        tier=tier,
        cost=cost,
        limiter=limiter,
        enabled=enabled,
        log_denied=log_denied,
    )

    def decorate(endpoint: Endpoint[P]) -> Endpoint[P]:
        limit_name = name or f"{endpoint.__module__}.{endpoint.__qualname__}"
        if not route.enabled:
            return endpoint

        @functools.wraps(endpoint)
        async def limited(*args: P.args, **kwargs: P.kwargs) -> Any:
            if not args:  # Quart: view(**path_params), the request in Quart's context
                from .quart_view import limited_view  # (quart: only where Quart calls)

                return await limited_view(route, limit_name, endpoint, kwargs)
            request = cast(HasScope, args[0])
            scope = request.scope
            app = app_of(scope)  # (one default storage per app)
            default = None if app is None else lambda: app_default(app)
            outcome = await route.decide(scope, limit_name, default=default)
            if outcome is None:
                return await endpoint(*args, **kwargs)
            scope.setdefault("state", {})["fineflow_route"] = outcome.decisions
            if outcome.denial is not None:
                return outcome.denial
            response = await endpoint(*args, **kwargs)
            return _WithHeaders(response, outcome.headers) if outcome.headers else response

        return limited

    return decorate


class _WithHeaders:
    """An endpoint's response (an ASGI app) sent with extra headers."""

    __slots__ = ("headers", "response")

    def __init__(self, response: ASGIApp, headers: Headers) -> None:
        self.response = response
        self.headers = headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.response(scope, receive, adding_headers(self.headers, send))
