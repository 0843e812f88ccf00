"""A limit declared on a route (the FastAPI dependency, the ``limit`` decorator).

:class:`RouteLimit` is one :class:`~.rules.Rule` matching every path, collected by the
:class:`~.ruleset.RuleSet` and decided by the :class:`~.gate.Gate` the middleware uses. Its
limiter is, in order: the one given; the one a :class:`RateLimitMiddleware` wrapping the
app publishes in ``scope["state"]["fineflow.limiter"]``; one over the default storage
(``FINEFLOW_STORAGE_URL`` / ``FINEFLOW_DSN``), opened on first use by a :class:`DefaultGate`:
the caller's (``fineflow.fastapi.install`` gives each app one, closed with the app's
lifespan), else the route limit's own, which lives as long as the process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .._asgi.problem import ProblemResponse
from .._asgi.types import Scope
from .._errors import ConfigurationError, StorageError
from .._logfields import error_text, log_extra
from .._storage.base import Storage
from .._storage.lifespan import OwnedStorage
from ..keys import client_ip
from .deniedlog import DeniedLog, denied_log_of
from .environment import default_storage, limits_enabled
from .gate import LIMITER_STATE, Gate, Headers
from .limiter import Decisions, RateLimiter
from .rules import CostFunc, QuotaFunc, QuotaSpec, Rule
from .ruleset import RuleSet

__all__ = ["DefaultGate", "RouteLimit", "RouteOutcome"]

logger = logging.getLogger("fineflow.middleware")

_MAX_NAMES = 10_000  # rule sets kept per route limit (one per route it guards)


@dataclass(frozen=True, slots=True)
class RouteOutcome:
    """What a route limit decided for one request.

    Attributes:
        decisions: the decisions.
        headers: the rate-limit headers of an admitted request (``()`` for none).
        denial: the problem response of a denied request, ``None`` when admitted.
    """

    decisions: Decisions
    headers: Headers
    denial: ProblemResponse | None


class DefaultGate:
    """The gate over the default storage: built on first use, its storage opened then (and
    migrated), closed by :meth:`aclose` (after which a later use builds a new one).

    Args:
        storage: what builds the storage (default :func:`~.environment.default_storage`, the
            environment's); it may raise :class:`ConfigurationError` to refuse.
    """

    __slots__ = ("_gate", "_storage")

    def __init__(self, storage: Callable[[], Storage] = default_storage) -> None:
        self._storage = storage
        self._gate: Gate | None = None

    def get(self) -> Gate:
        """The gate (built on the first call; its storage opens on its first decision)."""
        gate = self._gate
        if gate is None:
            storage = self._storage()
            gate = self._gate = Gate(RateLimiter(storage), owned=OwnedStorage(storage))
        return gate

    async def aclose(self) -> None:
        """Close the storage if one was built (a pool is never left open); an error while
        closing is logged, not raised (the app is shutting down)."""
        gate, self._gate = self._gate, None
        if gate is not None and gate.owned is not None:
            try:
                await gate.owned.storage.close()
            except (StorageError, OSError) as exc:
                logger.warning(
                    "error closing the default rate-limit storage: %s",
                    error_text(exc),
                    extra=log_extra("storage_close_failed", error=error_text(exc)),
                )


class RouteLimit:
    """The options of a route-level limit, checked once, and its per-request decision.

    Args: as :class:`fineflow.fastapi.RateLimit`'s.

    Raises:
        ConfigurationError: for an invalid quota, key, tier or cost.
    """

    def __init__(
        self,
        quota: QuotaSpec | QuotaFunc | Mapping[str, QuotaSpec],
        *,
        key: Callable[[Scope], Any] | None = None,
        tier: Callable[[Scope], Any] | None = None,
        cost: int | CostFunc = 1,
        limiter: RateLimiter | None = None,
        enabled: bool = True,
        log_denied: bool | DeniedLog = False,
    ) -> None:
        self.enabled = limits_enabled(enabled)
        self._denied_log = denied_log_of(log_denied)
        if tier is not None and not callable(tier):
            raise ConfigurationError("tier must be a callable of the ASGI scope")
        if key is not None and not callable(key):
            raise ConfigurationError("key must be a callable of the ASGI scope")
        self._quota = quota
        self._cost = cost
        self._key = key or client_ip()
        self._tier = tier
        self._limiter = limiter
        self._rulesets: dict[str, RuleSet] = {}
        self._ruleset("route")  # validates the options now, not on a request
        self._rulesets.clear()
        # The gate over the limiter last decided under; a gate over another limiter (another
        # app's middleware) replaces it but keeps adding to the same decision counts, so the
        # exported totals never drop, and no dropped app's limiter is kept alive.
        self._gate: Gate | None = None
        self._default = DefaultGate()

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
            ruleset = RuleSet([rule], self._key, self._tier, None)
            if len(self._rulesets) < _MAX_NAMES:
                self._rulesets[name] = ruleset
        return ruleset

    def _gate_for(self, scope: Scope, default: Callable[[], DefaultGate] | None) -> Gate:
        limiter = self._limiter
        if limiter is None:
            limiter = (scope.get("state") or {}).get(LIMITER_STATE)
        if limiter is None:
            return (self._default if default is None else default()).get()
        gate = self._gate
        if gate is None:
            gate = self._gate = Gate(limiter)
        elif gate.limiter is not limiter:
            gate = self._gate = Gate(limiter, counts=gate.counts)
        return gate

    async def decide(
        self, scope: Scope, name: str, *, default: Callable[[], DefaultGate] | None = None
    ) -> RouteOutcome | None:
        """Decide the request under the limit named ``name``; ``None`` when limits are off
        or the key (or the quota function) exempts it. ``default``: gives the gate over the
        default storage, asked only when neither ``limiter=`` nor a middleware gives a
        limiter (else the route limit's own)."""
        if not self.enabled:
            return None
        method = scope.get("method") or "GET"
        hits, applied, _ = await self._ruleset(name).collect(scope, method, "/")
        if not hits:
            return None
        gate = self._gate_for(scope, default)
        decisions = gate.decide_nowait(hits)
        if decisions is None:
            decisions = await gate.decide(hits)
        if not decisions.allowed:
            if self._denied_log is not None:
                self._denied_log.record(scope, hits, applied, decisions, shadow=False)
            return RouteOutcome(decisions, (), gate.problem(scope, applied, decisions))
        if decisions.storage_failed:
            return RouteOutcome(decisions, (), None)
        return RouteOutcome(decisions, gate.allowed_headers(scope, applied, decisions) or (), None)
