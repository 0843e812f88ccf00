"""RateLimitMiddleware: rate limits in front of any ASGI app (Starlette, FastAPI, Quart, raw).

Theory of operation
-------------------
Per ``http`` or ``websocket`` request: skip exempt methods and paths; collect every rule
matching the method and path; compute each rule's key (``None`` exempts the request from
that rule), the caller's tier and the cost; then decide all their quotas in **one** call
of the limiter, all or nothing (``decide_nowait`` when the storage is in-process, else
``decide``), through the :class:`~.gate.Gate` the route-level limits share. The
``Decisions`` go to ``scope["state"]["fineflow"]``, and the limiter, for those route-level
limits (``fineflow.fastapi.RateLimit``), to ``scope["state"]["fineflow.limiter"]``.
Allowed requests reach the app, with rate-limit headers added to ``http.response.start``
by a wrapped ``send`` (bodies are never touched, so streaming streams). Denied requests
get ``429`` (or ``503`` when the store is down and the policy is to deny) from a tiny ASGI
app, or from ``deny_app``. Websockets are decided
before the app can accept them. ``lifespan`` passes through; a storage the middleware owns
is opened (and migrated) on startup and closed on shutdown, or opened on the first request
when the server runs no lifespan.

A middleware built with ``enabled=False``, or while ``FINEFLOW_ENABLED=0`` is set, passes
every connection (lifespan included) to the app untouched: no decision, no header, no
storage opened (see :mod:`.environment` for why the variable is read once, when the
middleware is built). With neither ``storage`` nor ``limiter``, the middleware owns the
storage the environment names (``FINEFLOW_STORAGE_URL``, else ``FINEFLOW_DSN``).

Everything that does not depend on the request (path patterns, header names and policy
items) is compiled in ``__init__``; per-request state lives in locals. (The one thing kept
across requests, besides counters: each policy's rendered ``RateLimit`` values, keyed by the
numbers they show, in a cache cleared when full: see ``AppliedPolicy.ietf_headers``.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .._asgi.types import ASGIApp, Receive, Scope, Send
from .._errors import ConfigurationError
from .._storage.base import Storage
from .._storage.lifespan import OwnedStorage
from .._storage.memory import MemoryStorage
from ..keys import client_ip
from .deniedlog import DeniedLog, denied_log_of
from .environment import default_storage, limits_enabled
from .gate import LIMITER_STATE, Gate, adding_headers
from .headers import HeaderStyle, validate_style
from .limiter import RateLimiter
from .rules import PathPattern, Rule
from .ruleset import RuleSet

__all__ = ["MiddlewareMetrics", "RateLimitMiddleware"]


@dataclass(frozen=True, slots=True)
class MiddlewareMetrics:
    """A snapshot of a :class:`RateLimitMiddleware`'s counters.

    Attributes:
        requests: ``http`` and ``websocket`` requests seen.
        allowed: requests decided and admitted.
        limited: requests denied (429, or 503 when the store is down and the policy denies).
        shadow_limited: requests shadow mode would have denied (and let through).
        exempt: requests skipped by exempt methods or paths, or a key of ``None``.
        unmatched: requests no rule applies to.
        storage_failed: requests decided by ``on_storage_error`` because the store failed.
    """

    requests: int
    allowed: int
    limited: int
    shadow_limited: int
    exempt: int
    unmatched: int
    storage_failed: int


class RateLimitMiddleware:
    """Rate-limit an ASGI app by rules, keys and tiers (pure ASGI, no buffering).

    Use it as ``Middleware(RateLimitMiddleware, ...)`` in Starlette/FastAPI, as
    ``app.asgi_app = RateLimitMiddleware(app.asgi_app, ...)`` in Quart, or wrap any ASGI
    callable.

    Args:
        app: the ASGI app to protect.
        limiter: a :class:`RateLimiter` you own (open it yourself, e.g. in your lifespan).
        storage: instead of ``limiter``, a storage the middleware owns: it builds the
            limiter, opens the storage on lifespan startup (or the first request) and closes
            it on shutdown. With neither ``storage`` nor ``limiter``, the middleware owns
            the storage of ``FINEFLOW_STORAGE_URL`` (any URL
            :func:`fineflow.storage_from_url` takes), else a :class:`PostgresStorage` on
            ``FINEFLOW_DSN``.
        rules: the :class:`Rule` s; every rule matching a request applies, all or nothing.
        key: the default key function (rules may override it); default
            :func:`fineflow.keys.client_ip` with no trusted proxies.
        tier: a function of the scope returning the caller's tier name (sync or async).
        default_tier: the tier for callers whose tier is ``None`` or unknown to a rule
            (an unknown name is logged once); default: each rule's first tier.
        headers: ``"ietf"`` (default), ``"legacy"``, ``"x"`` or ``None``.
        headers_for: a function of the scope deciding whether a response carries
            rate-limit headers (e.g. only for authenticated callers); ``Retry-After`` is
            always sent on 429.
        shadow: decide, log and count, but never deny, and send no rate-limit headers. The
            requests it would deny are logged through a :class:`DeniedLog` (``log_denied``'s,
            else one with the defaults), so they cannot flood the log.
        log_denied: ``True`` or a :class:`DeniedLog` to log denied requests (at most 10 per
            rule per minute by default, then a count of those left out); default ``False``.
        exempt_paths: path templates never limited, e.g. ``["/health", "/static/*"]``.
        exempt_methods: methods never limited (default ``("OPTIONS",)``: CORS preflights).
        deny_app: an ASGI app answering denied requests instead of the built-in problem+json
            response; the decisions are in ``scope["state"]["fineflow"]``.
        algorithm: with ``storage``: ``"gcra"`` (default), ``"fixed_window"`` or
            ``"sliding_window"``.
        on_storage_error: with ``storage``: ``"allow"`` (default) or ``"deny"`` (503).
        timeout: with ``storage``: time budget per decision in seconds (default 0.05).
        migrate: with ``storage``: run ``storage.migrate()`` when opening it (default True).
        enabled: ``False`` passes every request through untouched (no decision, no
            headers, no storage opened), e.g. in tests or staging. ``FINEFLOW_ENABLED=0``
            in the environment when the middleware is built does the same, whatever
            ``enabled`` says (it is read once, not per request).

    Raises:
        ConfigurationError: for an invalid option, rule, or combination of them; with
            neither ``storage`` nor ``limiter``, when neither ``FINEFLOW_STORAGE_URL`` nor
            ``FINEFLOW_DSN`` is set (unless limits are off); for a ``FINEFLOW_ENABLED``
            that is neither on nor off.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        limiter: RateLimiter | None = None,
        storage: Storage | None = None,
        rules: Sequence[Rule],
        key: Callable[[Scope], Any] | None = None,
        tier: Callable[[Scope], Any] | None = None,
        default_tier: str | None = None,
        headers: HeaderStyle | None = "ietf",
        headers_for: Callable[[Scope], bool] | None = None,
        shadow: bool = False,
        log_denied: bool | DeniedLog = False,
        exempt_paths: Iterable[str] = (),
        exempt_methods: Iterable[str] = ("OPTIONS",),
        deny_app: ASGIApp | None = None,
        algorithm: str | None = None,
        on_storage_error: Literal["allow", "deny"] | None = None,
        timeout: float | None = 0.05,
        migrate: bool = True,
        enabled: bool = True,
    ) -> None:
        if not callable(app):
            raise ConfigurationError("app must be an ASGI callable")
        self.enabled = limits_enabled(enabled)
        if storage is None and limiter is None:
            # Limits off: a storage that is never opened, so tests need no environment.
            storage = default_storage() if self.enabled else MemoryStorage()
        limiter = _limiter(limiter, storage, algorithm, on_storage_error, timeout)
        _check_rules(rules, limiter.algorithm, default_tier)
        for what, fn in (("key", key), ("tier", tier), ("headers_for", headers_for)):
            if fn is not None and not callable(fn):
                raise ConfigurationError(f"{what} must be a callable of the ASGI scope")
        if deny_app is not None and not callable(deny_app):
            raise ConfigurationError("deny_app must be an ASGI app")
        if isinstance(exempt_paths, str) or isinstance(exempt_methods, str):
            raise ConfigurationError("exempt_paths and exempt_methods must be lists")

        self.app = app
        self.limiter = limiter
        self.rules = tuple(rules)
        self.shadow = bool(shadow)
        self._ruleset = RuleSet(self.rules, key or client_ip(), tier, default_tier)
        self._exempt_methods = frozenset(str(m).upper() for m in exempt_methods)
        self._exempt_paths = tuple(PathPattern(p) for p in exempt_paths)
        self._owned = (
            None
            if storage is None or not self.enabled
            else OwnedStorage(storage, migrate=bool(migrate))
        )
        # Deciding, headers and denials: the path shared with the dependency and decorator.
        self._gate = Gate(
            limiter,
            owned=self._owned,
            style=validate_style(headers),
            headers_for=headers_for,
            shadow=self.shadow,
            deny_app=deny_app,
            denied_log=denied_log_of(log_denied, shadow=self.shadow),
        )
        # The metrics counters: plain attributes, the cheapest to increment.
        self._n_requests = self._n_allowed = self._n_limited = self._n_shadow = 0
        self._n_exempt = self._n_unmatched = self._n_store = 0

    def metrics(self) -> MiddlewareMetrics:
        """A snapshot of the counters (see :class:`MiddlewareMetrics`)."""
        return MiddlewareMetrics(
            requests=self._n_requests,
            allowed=self._n_allowed,
            limited=self._n_limited,
            shadow_limited=self._n_shadow,
            exempt=self._n_exempt,
            unmatched=self._n_unmatched,
            storage_failed=self._n_store,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection."""
        if not self.enabled:
            await self.app(scope, receive, send)
            return
        kind = scope["type"]
        if kind == "http":
            method = scope.get("method") or "GET"
        elif kind == "websocket":
            method = "GET"  # the handshake is a GET
        elif kind == "lifespan" and self._owned is not None:
            await self._owned.lifespan(self.app, scope, receive, send)
            return
        else:
            await self.app(scope, receive, send)
            return
        self._n_requests += 1
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state[LIMITER_STATE] = self.limiter  # for fineflow.fastapi.RateLimit and ff.limit
        path = _route_path(scope)
        if self._exempt(method, path):
            self._n_exempt += 1
            await self.app(scope, receive, send)
            return
        hits, applied, matched = await self._ruleset.collect(scope, method, path)
        if not hits:
            if matched:
                self._n_exempt += 1  # every matching rule's key was None
            else:
                self._n_unmatched += 1
            await self.app(scope, receive, send)
            return
        gate = self._gate
        decisions = gate.decide_nowait(hits)
        if decisions is None:
            decisions = await gate.decide(hits)
        state["fineflow"] = decisions

        failed = decisions.storage_failed
        if failed:
            self._n_store += 1
        if decisions.allowed:
            self._n_allowed += 1
            headers = None if failed else gate.allowed_headers(scope, applied, decisions)
            if headers is not None:
                send = adding_headers(headers, send)
            await self.app(scope, receive, send)
        elif self.shadow:
            self._n_shadow += 1
            gate.log_denial(scope, hits, applied, decisions)
            await self.app(scope, receive, send)
        else:
            self._n_limited += 1
            if gate.denied_log is not None:
                gate.log_denial(scope, hits, applied, decisions)
            await gate.denial(scope, applied, decisions)(scope, receive, send)

    def _exempt(self, method: str, path: str) -> bool:
        """Whether the request is exempt by its method or path."""
        if method in self._exempt_methods:
            return True
        for pattern in self._exempt_paths:  # noqa: SIM110 - a loop: no generator per request
            if pattern.matches(path):
                return True
        return False


def _limiter(
    limiter: RateLimiter | None,
    storage: Storage | None,
    algorithm: str | None,
    on_storage_error: Literal["allow", "deny"] | None,
    timeout: float | None,
) -> RateLimiter:
    """The middleware's limiter: the one given, or one built over the storage it owns."""
    if limiter is not None and storage is None:
        if algorithm is not None or on_storage_error is not None:
            raise ConfigurationError(
                "algorithm and on_storage_error go to RateLimiter(...) when you pass limiter="
            )
        return limiter
    if storage is not None and limiter is None:
        return RateLimiter(
            storage,
            algorithm=algorithm or "gcra",
            on_storage_error=on_storage_error or "allow",
            timeout=timeout,
        )
    raise ConfigurationError(
        "give exactly one of storage=PostgresStorage(dsn) / MemoryStorage() (owned "
        "by the middleware) or limiter=RateLimiter(storage) (owned by you)"
    )


def _check_rules(rules: Sequence[Rule], algorithm: str, default_tier: str | None) -> None:
    if isinstance(rules, Rule) or not isinstance(rules, Sequence) or not rules:
        raise ConfigurationError(
            "rules must be a non-empty list of Rule, e.g. "
            "[Rule('/{path:path}', quota='100/minute')]"
        )
    names = [r.name for r in rules if isinstance(r, Rule)]
    if len(names) != len(rules):
        raise ConfigurationError("every entry of rules must be a fineflow.Rule")
    if len(set(names)) != len(names):
        raise ConfigurationError(
            f"rule names must be unique (they key the state), got {names}; pass name=..."
        )
    for rule in rules:
        rule.check(algorithm, default_tier)


def _route_path(scope: Scope) -> str:
    """The path rules match: ``scope["path"]`` without the ``root_path`` the app is under."""
    path: str = scope.get("path") or "/"
    root = scope.get("root_path")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path
