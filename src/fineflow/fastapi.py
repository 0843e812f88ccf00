"""Rate limits declared on FastAPI routes and routers (``pip install 'fineflow[fastapi]'``).

::

    from fastapi import Depends, FastAPI
    from fineflow.fastapi import RateLimit, install

    app = FastAPI()
    install(app)  # problem+json denials; the default storage closed with the app

    @app.get("/search", dependencies=[Depends(RateLimit("5/minute"))])
    async def search(q: str) -> list[str]: ...

A :class:`RateLimit` decides through the same code as :class:`fineflow.RateLimitMiddleware`
(the rules' collecting, the limiter, the headers and the problem responses are shared). It
uses, in order: its ``limiter=``; the limiter of a ``RateLimitMiddleware`` wrapping the app,
which the middleware publishes in ``scope["state"]["fineflow.limiter"]`` on every request;
the app's default storage, from ``FINEFLOW_STORAGE_URL`` or ``FINEFLOW_DSN``: one storage,
one pool, for every dependency of the app, opened on first use. :func:`install` closes it
when the app's lifespan ends; without ``install`` it still works, but nothing closes it
(a warning says so once per app).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.routing import APIRoute

from ._asgi.problem import ProblemResponse
from ._errors import ConfigurationError
from ._ratelimit.appdefault import app_default, app_of
from ._ratelimit.appdefault import install as install_default
from ._ratelimit.deniedlog import DeniedLog
from ._ratelimit.limiter import Decisions, RateLimiter
from ._ratelimit.route import DefaultGate, RouteLimit
from ._ratelimit.rules import CostFunc, QuotaFunc, QuotaSpec

__all__ = ["RateLimit", "RateLimitExceeded", "install", "problem_response"]

logger = logging.getLogger("fineflow.middleware")


class RateLimitExceeded(HTTPException):
    """A request a :class:`RateLimit` denied: ``429`` (or ``503`` when the store is down
    and the policy denies) with ``Retry-After`` and the rate-limit headers.

    Without :func:`install`, FastAPI answers it as any ``HTTPException``:
    ``{"detail": "Too Many Requests"}`` with the same status and headers.

    Attributes:
        decisions: the :class:`fineflow.Decisions` of the request.
        problem: the ASGI app sending the problem+json response.
    """

    def __init__(self, problem: ProblemResponse, decisions: Decisions) -> None:
        headers = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in problem.headers
            if name not in (b"content-type", b"content-length")
        }
        detail = "Too Many Requests" if problem.status == 429 else "Service Unavailable"
        super().__init__(problem.status, detail, headers)
        self.problem = problem
        self.decisions = decisions


async def problem_response(request: Request, exc: Exception) -> Response:
    """The exception handler answering :class:`RateLimitExceeded` with fineflow's
    ``application/problem+json`` body (the middleware's): pass it to
    ``app.add_exception_handler(RateLimitExceeded, problem_response)``, or call
    :func:`install`."""
    if not isinstance(exc, RateLimitExceeded):  # (FastAPI passes what it was given)
        raise exc
    problem = exc.problem
    headers = {
        name.decode("latin-1"): value.decode("latin-1")
        for name, value in problem.headers
        if name != b"content-length"
    }
    return Response(problem.body, problem.status, headers)


_SET_UP: weakref.WeakSet[Any] = weakref.WeakSet()  # the apps install() set up


def install(app: FastAPI, *, problem_json: bool = True) -> None:
    """Set up fineflow on ``app`` (one line, before it serves; a second call does nothing).

    * Answer the app's :class:`RateLimitExceeded` with problem+json (``problem_json=False``
      keeps FastAPI's ``{"detail": ...}``).
    * Close the app's default storage when its lifespan ends (after the app's own
      shutdown), so no pool outlives the app (:func:`fineflow.install`). It serves the
      :class:`RateLimit` dependencies that have neither ``limiter=`` nor a
      ``RateLimitMiddleware`` around them: one per app, built from ``FINEFLOW_STORAGE_URL``
      / ``FINEFLOW_DSN``, opened on first use.
    """
    if app in _SET_UP:
        return
    install_default(app)  # (does nothing if fineflow.install(app) did it already)
    if problem_json:
        app.add_exception_handler(RateLimitExceeded, problem_response)
    _SET_UP.add(app)


def _default_gate(app: Any) -> DefaultGate:
    """The app's default gate (made on first use; with a warning if :func:`install` was not
    called: nothing closes its storage with the app)."""
    return app_default(app, install_hint="fineflow.fastapi.install(app)")


class RateLimit:
    """A FastAPI dependency limiting the route (or every route of a router) it guards.

    Use it as ``Depends(RateLimit("5/minute"))``: in ``dependencies=[...]`` of a route, a
    router or the app, or as a parameter, whose value is then the request's
    :class:`fineflow.Decisions` (``None`` when not limited). Allowed responses carry the
    rate-limit headers (through FastAPI's ``Response`` parameter: an endpoint returning its
    own ``Response`` object sends its own headers only); denied requests raise
    :class:`RateLimitExceeded`.

    Args:
        quota: as :class:`fineflow.Rule`'s: a quota string, a :class:`fineflow.Quota`, a
            list of them, a function of the scope returning them per request, or a mapping
            of tier names to quotas (with ``tier``).
        name: the name keying the state and naming the policy in headers; default each
            route's methods and path template, e.g. ``"GET /items/{id}"``, so a router-level
            dependency limits each of its routes apart.
        key: who is limited, a function of the scope (default the client address).
        tier: with tiered quotas: a function of the scope returning the caller's tier.
        cost: what a request costs, an int or a function of the scope.
        limiter: the :class:`fineflow.RateLimiter` to use (you open it); default the
            middleware's, else the app's default storage (see :func:`install`).
        enabled: ``False`` (or ``FINEFLOW_ENABLED=0`` when the dependency is built) lets
            every request through undecided.
        log_denied: ``True`` or a :class:`fineflow.DeniedLog` to log denied requests, at
            most 10 per limit name per minute by default (as the middleware's option).

    Raises:
        ConfigurationError: for an invalid quota, key, tier or cost; on a request, when no
            limiter is found and neither ``FINEFLOW_STORAGE_URL`` nor ``FINEFLOW_DSN`` is set.
    """

    def __init__(
        self,
        quota: QuotaSpec | QuotaFunc | Mapping[str, QuotaSpec],
        *,
        name: str | None = None,
        key: Callable[[Any], Any] | None = None,
        tier: Callable[[Any], Any] | None = None,
        cost: int | CostFunc = 1,
        limiter: RateLimiter | None = None,
        enabled: bool = True,
        log_denied: bool | DeniedLog = False,
    ) -> None:
        if name is not None and (not isinstance(name, str) or not name):
            raise ConfigurationError("name must be a non-empty string")
        self._name = name
        self._limit = RouteLimit(
            quota,
            key=key,
            tier=tier,
            cost=cost,
            limiter=limiter,
            enabled=enabled,
            log_denied=log_denied,
        )
        self.enabled = self._limit.enabled

    async def __call__(self, request: Request, response: Response) -> Decisions | None:
        """Decide the request; raise :class:`RateLimitExceeded` when it is denied."""
        if not self.enabled:
            return None
        scope = request.scope
        name = self._name or _route_name(scope, scope.get("method") or "GET")
        app = app_of(scope) or request.app
        outcome = await self._limit.decide(scope, name, default=lambda: _default_gate(app))
        if outcome is None:
            return None
        if outcome.denial is not None:
            raise RateLimitExceeded(outcome.denial, outcome.decisions)
        for name_, value in outcome.headers:
            response.headers.append(name_.decode("latin-1"), value.decode("latin-1"))
        return outcome.decisions


def _route_name(scope: Any, method: str) -> str:
    """The default name of a route's limit: its methods and path template."""
    route = scope.get("route")
    if isinstance(route, APIRoute):
        return f"{','.join(sorted(route.methods or (method,)))} {route.path}"
    raise ConfigurationError(
        "RateLimit(...) found no FastAPI route to name its limit after; pass name=..."
    )
