"""Rate limits declared on FastAPI routes and routers (``pip install 'fineflow[fastapi]'``).

::

    from fastapi import Depends, FastAPI
    from fineflow.fastapi import RateLimit, install

    app = FastAPI()
    install(app)  # denials as application/problem+json (else FastAPI's {"detail": ...})

    @app.get("/search", dependencies=[Depends(RateLimit("5/minute"))])
    async def search(q: str) -> list[str]: ...

A :class:`RateLimit` decides through the same code as :class:`fineflow.RateLimitMiddleware`
(the rules' collecting, the limiter, the headers and the problem responses are shared). It
uses, in order: its ``limiter=``; the limiter of a ``RateLimitMiddleware`` wrapping the app,
which the middleware publishes in ``scope["state"]["fineflow.limiter"]`` on every request;
the default storage of ``FINEFLOW_STORAGE_URL`` or ``FINEFLOW_DSN`` (opened on first use).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.routing import APIRoute

from ._asgi.problem import ProblemResponse
from ._errors import ConfigurationError
from ._ratelimit.environment import default_storage, limits_enabled
from ._ratelimit.gate import LIMITER_STATE, Gate
from ._ratelimit.limiter import Decisions, RateLimiter
from ._ratelimit.rules import CostFunc, QuotaFunc, QuotaSpec, Rule
from ._ratelimit.ruleset import RuleSet
from ._storage.lifespan import OwnedStorage
from .keys import client_ip

__all__ = ["RateLimit", "RateLimitExceeded", "install", "problem_response"]

_MAX_ROUTES = 10_000  # rule sets kept per dependency (one per route it guards)


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


def install(app: FastAPI) -> None:
    """Answer the app's :class:`RateLimitExceeded` with problem+json (one line, at setup)."""
    app.add_exception_handler(RateLimitExceeded, problem_response)


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
            middleware's, else one over the default storage.
        enabled: ``False`` (or ``FINEFLOW_ENABLED=0`` when the dependency is built) lets
            every request through undecided.

    Raises:
        ConfigurationError: for an invalid quota, key, tier or cost.
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
    ) -> None:
        self.enabled = limits_enabled(enabled)
        self._quota = quota
        self._cost = cost
        self._name = name
        self._key = key
        self._tier = tier
        self._limiter = limiter
        if tier is not None and not callable(tier):
            raise ConfigurationError("tier must be a callable of the ASGI scope")
        self._rulesets: dict[str, RuleSet] = {}
        self._ruleset(name or "RateLimit")  # validates the options now, not on a request
        self._rulesets.clear()
        self._gate: Gate | None = None
        self._default: Gate | None = None

    def _ruleset(self, name: str) -> RuleSet:
        ruleset = self._rulesets.get(name)
        if ruleset is None:
            quota = self._quota
            tiered = isinstance(quota, Mapping)
            rule = Rule(
                "/{path:path}",
                quota=None if tiered else quota,  # type: ignore[arg-type]
                tiers=quota if tiered else None,  # type: ignore[arg-type]
                cost=self._cost,
                name=name,
            )
            ruleset = RuleSet([rule], self._key or client_ip(), self._tier, None)
            if len(self._rulesets) < _MAX_ROUTES:
                self._rulesets[name] = ruleset
        return ruleset

    def _gate_for(self, scope: Any) -> Gate:
        limiter = self._limiter
        if limiter is None:
            limiter = (scope.get("state") or {}).get(LIMITER_STATE)
        if limiter is None:
            if self._default is None:
                storage = default_storage()
                owned = OwnedStorage(storage)
                self._default = Gate(RateLimiter(storage), owned=owned)
            return self._default
        gate = self._gate
        if gate is None or gate.limiter is not limiter:
            gate = self._gate = Gate(limiter)
        return gate

    async def __call__(self, request: Request, response: Response) -> Decisions | None:
        """Decide the request; raise :class:`RateLimitExceeded` when it is denied."""
        if not self.enabled:
            return None
        scope = request.scope
        method = scope.get("method") or "GET"
        ruleset = self._ruleset(self._name or _route_name(scope, method))
        hits, applied, _ = await ruleset.collect(scope, method, "/")
        if not hits:
            return None  # the key (or the quota function) exempted the request
        gate = self._gate_for(scope)
        decisions = gate.decide_nowait(hits)
        if decisions is None:
            decisions = await gate.decide(hits)
        if not decisions.allowed:
            raise RateLimitExceeded(gate.problem(scope, applied, decisions), decisions)
        headers = (
            None if decisions.storage_failed else gate.allowed_headers(scope, applied, decisions)
        )
        if headers:
            for name, value in headers:
                response.headers.append(name.decode("latin-1"), value.decode("latin-1"))
        return decisions


def _route_name(scope: Any, method: str) -> str:
    """The default name of a route's limit: its methods and path template."""
    route = scope.get("route")
    if isinstance(route, APIRoute):
        return f"{','.join(sorted(route.methods or (method,)))} {route.path}"
    raise ConfigurationError(
        "RateLimit(...) found no FastAPI route to name its limit after; pass name=..."
    )
