"""RateLimitMiddleware: rate limits in front of any ASGI app (Starlette, FastAPI, Quart, raw).

Theory of operation
-------------------
Per ``http`` or ``websocket`` request: skip exempt methods and paths; collect every rule
matching the method and path; compute each rule's key (``None`` exempts the request from
that rule), the caller's tier and the cost; then decide all their quotas in **one**
``limiter.decide`` call, all or nothing. The ``Decisions`` go to
``scope["state"]["fineflow"]``. Allowed requests reach the app, with rate-limit headers
added to ``http.response.start`` by a wrapped ``send`` (bodies are never touched, so
streaming streams). Denied requests get ``429`` (or ``503`` when the store is down and the
policy is to deny) from a tiny ASGI app, or from ``deny_app``. Websockets are decided
before the app can accept them. ``lifespan`` passes through; a storage the middleware owns
is opened (and migrated) on startup and closed on shutdown, or opened on the first request
when the server runs no lifespan.

Everything that does not depend on the request (path regexes, header names and policy
items) is compiled in ``__init__``; per-request state lives in locals. (The one thing kept
across requests, besides counters: each policy's rendered ``RateLimit`` values, keyed by the
numbers they show, in a cache cleared when full.)
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from math import ceil
from typing import Any, Literal

from .._asgi.types import ASGIApp, Message, Receive, Scope, Send
from .._errors import ConfigurationError, StorageError
from .._storage.base import Hit, Storage
from .._storage.lifespan import OwnedStorage
from ..keys import ClientIP, client_ip
from .algorithms import Decision
from .headers import RATELIMIT, AppliedPolicy, HeaderStyle, render_headers, validate_style
from .limiter import STORAGE_UNAVAILABLE, Decisions, RateLimiter
from .problems import quota_exceeded, storage_unavailable
from .rules import PathPattern, Rule
from .ruleset import MAX_CACHED_RATES, RuleSet, finish_key

__all__ = ["MiddlewareMetrics", "RateLimitMiddleware"]

# Build a Hit without NamedTuple's Python-level __new__.
_new_hit = tuple.__new__

logger = logging.getLogger("fineflow.middleware")

# Stands in for the one decision when a request has several: not admitted, so the
# one-decision outcomes are skipped and the general ones decide on all of them.
_SEVERAL = Decision(False, 0, 0, 0.0, None, "")


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
            it on shutdown.
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
        shadow: decide, log and count, but never deny, and send no rate-limit headers.
        exempt_paths: path templates never limited, e.g. ``["/health", "/static/*"]``.
        exempt_methods: methods never limited (default ``("OPTIONS",)``: CORS preflights).
        deny_app: an ASGI app answering denied requests instead of the built-in problem+json
            response; the decisions are in ``scope["state"]["fineflow"]``.
        algorithm: with ``storage``: ``"gcra"`` (default), ``"fixed_window"`` or
            ``"sliding_window"``.
        on_storage_error: with ``storage``: ``"allow"`` (default) or ``"deny"`` (503).
        timeout: with ``storage``: time budget per decision in seconds (default 0.05).
        migrate: with ``storage``: run ``storage.migrate()`` when opening it (default True).

    Raises:
        ConfigurationError: for an invalid option, rule, or combination of them.
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
        exempt_paths: Iterable[str] = (),
        exempt_methods: Iterable[str] = ("OPTIONS",),
        deny_app: ASGIApp | None = None,
        algorithm: str | None = None,
        on_storage_error: Literal["allow", "deny"] | None = None,
        timeout: float | None = 0.05,
        migrate: bool = True,
    ) -> None:
        if not callable(app):
            raise ConfigurationError("app must be an ASGI callable")
        if limiter is not None and storage is None:
            if algorithm is not None or on_storage_error is not None:
                raise ConfigurationError(
                    "algorithm and on_storage_error go to RateLimiter(...) when you pass limiter="
                )
        elif storage is not None and limiter is None:
            limiter = RateLimiter(
                storage,
                algorithm=algorithm or "gcra",
                on_storage_error=on_storage_error or "allow",
                timeout=timeout,
            )
        else:
            raise ConfigurationError(
                "give exactly one of storage=PostgresStorage(dsn) / MemoryStorage() (owned "
                "by the middleware) or limiter=RateLimiter(storage) (owned by you)"
            )
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
            rule.check(limiter.algorithm, default_tier)
        for what, fn in (("key", key), ("tier", tier), ("headers_for", headers_for)):
            if fn is not None and not callable(fn):
                raise ConfigurationError(f"{what} must be a callable of the ASGI scope")
        if deny_app is not None and not callable(deny_app):
            raise ConfigurationError("deny_app must be an ASGI app")
        if isinstance(exempt_paths, str) or isinstance(exempt_methods, str):
            raise ConfigurationError("exempt_paths and exempt_methods must be lists")
        exempt = [PathPattern(p) for p in exempt_paths]

        self.app = app
        self.limiter = limiter
        self.rules = tuple(rules)
        self.shadow = bool(shadow)
        self._style = validate_style(headers)
        self._headers_for = headers_for
        self._key: Callable[[Scope], Any] = key if key is not None else client_ip()
        # The default key needs no call in the usual case: scope["client"][0].
        peer_key = isinstance(self._key, ClientIP) and self._key.peer_only
        self._tier = tier
        self._deny_app = deny_app
        self._ruleset = RuleSet(self.rules, self._key, tier, default_tier)
        self._compiled = self._ruleset.compiled
        self._exempt_methods = frozenset(str(m).upper() for m in exempt_methods)
        self._exempt_literal = frozenset(p.template for p in exempt if p.regex is None)
        self._exempt_regex = tuple(p.regex for p in exempt if p.regex is not None)
        self._owned = None if storage is None else OwnedStorage(storage, migrate=bool(migrate))
        # The in-process one-quota decision, or None; not when a RateLimiter subclass
        # overrides how decisions are made (it is called through its methods then).
        cls = type(limiter)
        plain = cls.decide_nowait is RateLimiter.decide_nowait and cls.decide is RateLimiter.decide
        self._local_one = limiter._local_one if plain else None
        # decide_nowait answers for in-process storages without calling decide: not when a
        # subclass overrides decide alone.
        self._nowait = cls.decide_nowait is not RateLimiter.decide_nowait or (
            cls.decide is RateLimiter.decide
        )
        # The metrics counters: plain attributes, the cheapest to increment.
        self._n_requests = self._n_allowed = self._n_limited = self._n_shadow = 0
        self._n_exempt = self._n_unmatched = self._n_store = 0
        # One rule of the single shape and no tier function: skip the general loop.
        only = self._compiled[0]
        self._single = only if len(self._compiled) == 1 and only.single and tier is None else None
        self._single_peer = self._single is not None and only.key is None and peer_key
        # Whether allowed responses can carry headers without asking anything per request.
        self._plain = self._style is None or self.shadow
        self._ietf_always = self._style == "ietf" and not self.shadow and headers_for is None

    def metrics(self) -> MiddlewareMetrics:
        """A snapshot of the counters (see :class:`MiddlewareMetrics`)."""
        return MiddlewareMetrics(
            self._n_requests,
            self._n_allowed,
            self._n_limited,
            self._n_shadow,
            self._n_exempt,
            self._n_unmatched,
            self._n_store,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection."""
        kind = scope["type"]
        if kind == "http":
            method = scope.get("method") or "GET"
        elif kind == "websocket":
            method = "GET"  # the handshake is a GET
        else:
            if kind == "lifespan" and self._owned is not None:
                await self._owned.lifespan(self.app, scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        self._n_requests += 1
        path = scope.get("path") or "/"
        root = scope.get("root_path")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        if method in self._exempt_methods or path in self._exempt_literal:
            self._n_exempt += 1
            await self.app(scope, receive, send)
            return
        if self._exempt_regex:  # (no loop, no iterator, when there are none)
            for regex in self._exempt_regex:
                if regex.fullmatch(path):
                    self._n_exempt += 1
                    await self.app(scope, receive, send)
                    return
        hits: Sequence[Hit] | None = None  # (not built on the in-process single-rule path)
        applied: Sequence[AppliedPolicy]
        extra: Sequence[tuple[bytes, bytes]]
        c = self._single
        if c is not None:
            # One rule, one fixed quota and cost, no tiers: the same steps as the loop
            # below, for exactly one hit.
            if (c.methods is not None and method not in c.methods) or (
                not path.startswith(c.prefix)
                if c.prefix is not None
                else c.regex.fullmatch(path) is None
                if c.regex is not None
                else path != c.literal
            ):
                self._n_unmatched += 1
                await self.app(scope, receive, send)
                return
            owned = self._owned
            if owned is not None and not owned.opened:
                await owned.ensure_open()
            value: Any = None
            if self._single_peer:  # the default key: the peer address, no call needed
                client = scope.get("client")
                if client.__class__ is tuple and client:
                    value = client[0]
            if value.__class__ is not str or not value:
                value = (self._key if c.key is None else c.key)(scope)
                if value is not None and value.__class__ is not str:
                    value = await finish_key(value)
                if value is None:
                    self._n_exempt += 1
                    await self.app(scope, receive, send)
                    return
            quota, applied = c.single  # type: ignore[misc]
            local = self._local_one
            if local is not None:
                # An in-process storage: decided here, no awaits, no Hit to build.
                try:
                    d = local(value, quota, c.cost, c.name, "")  # type: ignore[arg-type]
                    decisions = Decisions((d,))
                except StorageError as exc:
                    fallback_hits = (Hit(value, quota, c.cost, c.name, ""),)  # type: ignore[arg-type]
                    decisions = self.limiter._local_failure(fallback_hits, exc)
                    d = decisions[0]
            else:
                hits = (_new_hit(Hit, (value, quota, c.cost, c.name, "")),)
        else:
            hits, applied, matched = await self._ruleset.collect(scope, method, path)
            if not hits:
                if matched:
                    self._n_exempt += 1
                else:
                    self._n_unmatched += 1
                await self.app(scope, receive, send)
                return
        if hits is not None:  # (not decided in-process above)
            ready = self._decide_now(hits)
            decisions = ready if ready is not None else (await self._decide(hits))
            # One decision: the usual outcomes below apply as on the single-rule path.
            d = decisions[0] if len(decisions) == 1 else _SEVERAL
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state["fineflow"] = decisions
        # The usual outcomes of one decision: admitted by the storage.
        # (Indexes, not field names: allowed, remaining, reset_after, reason.)
        if d[0] and d[7] is None:
            if self._ietf_always and kind == "http":
                self._n_allowed += 1
                # Decisions never carry a negative reset_after, so ceil alone is enough.
                t = ceil(d[3])
                remaining = d[2]
                a = applied[0]
                rates = a.rates
                cached = rates.get(remaining)
                if cached is not None and cached[0] == t:
                    extra = cached[1]
                else:
                    extra = (a.policy_header, (RATELIMIT, a.rate_template % (remaining, t)))
                    if len(rates) >= MAX_CACHED_RATES:
                        rates.clear()
                    rates[remaining] = (t, extra)

                def send_with_ietf(message: Message) -> Awaitable[None]:
                    # As send_with_headers below.
                    if message["type"] == "http.response.start":
                        message = {**message}
                        message["headers"] = [*message.get("headers", ()), *extra]
                    return send(message)

                await self.app(scope, receive, send_with_ietf)
                return
            if self._plain or kind == "websocket":
                self._n_allowed += 1
                await self.app(scope, receive, send)
                return
        allowed = True
        failed = False
        for d in decisions:
            if not d.allowed:
                allowed = False
            if d.reason is not None and d.reason == STORAGE_UNAVAILABLE:
                failed = True
        if failed:
            self._n_store += 1
        if allowed:
            self._n_allowed += 1
            if (
                self._plain
                or kind == "websocket"
                or failed
                or (self._headers_for is not None and not self._headers_for(scope))
            ):
                await self.app(scope, receive, send)
                return
            if len(applied) == 1 and self._style == "ietf":
                a = applied[0]
                d = decisions[0]
                # Decisions never carry a negative reset_after, so ceil alone is enough.
                extra = (
                    a.policy_header,
                    (RATELIMIT, a.rate_template % (d.remaining, ceil(d.reset_after))),
                )
            else:
                extra = render_headers(self._style, applied, decisions)  # type: ignore[arg-type]

            def send_with_headers(message: Message) -> Awaitable[None]:
                # Returns send's awaitable rather than awaiting it: one coroutine less per
                # message (the app awaits it all the same).
                if message["type"] == "http.response.start":
                    # A copy: the app may reuse its message dicts. (Copied, then assigned:
                    # ``{**message, "headers": ...}`` builds a second dict on the way.)
                    message = {**message}
                    message["headers"] = [*message.get("headers", ()), *extra]
                return send(message)

            await self.app(scope, receive, send_with_headers)
            return
        if self.shadow:
            self._n_shadow += 1
            denied = [i for i, d in enumerate(decisions) if not d.allowed]
            logger.info(
                "shadow mode: would deny %s %s for key %r (policies %s)",
                method,
                path[:200],
                (value if hits is None else hits[denied[0]].key)[:200],
                [applied[i].name for i in denied],
            )
            await self.app(scope, receive, send)
            return

        self._n_limited += 1
        deny_app = self._deny_app
        if deny_app is not None and (
            kind == "http" or "websocket.http.response" in (scope.get("extensions") or {})
        ):
            await deny_app(scope, receive, send)
        elif failed:
            await storage_unavailable(decisions.retry_after)(scope, receive, send)
        else:
            style = self._style
            show = self._headers_for is None or self._headers_for(scope)
            extra_list = render_headers(style, applied, decisions) if style and show else []
            violated = [a for a, d in zip(applied, decisions, strict=True) if not d.allowed]
            await quota_exceeded(violated, decisions.retry_after, extra_list)(scope, receive, send)

    def _decide_now(self, hits: Sequence[Hit]) -> Decisions | None:
        """The decisions without awaiting, when the storage is in-process and open; else
        ``None`` (then :meth:`_decide`)."""
        owned = self._owned
        if not self._nowait or (owned is not None and not owned.opened):
            return None
        decisions = self.limiter.decide_nowait(hits)
        return None if decisions is None else self._checked(decisions, hits)

    async def _decide(self, hits: Sequence[Hit]) -> Decisions:
        """The decisions ``_decide_now`` could not give: the storage opened if need be."""
        owned = self._owned
        if owned is not None and not owned.opened:
            await owned.ensure_open()
            ready = self._decide_now(hits)
            if ready is not None:
                return ready
        return self._checked(await self.limiter.decide(hits), hits)

    def _checked(self, decisions: Decisions, hits: Sequence[Hit]) -> Decisions:
        if len(decisions) != len(hits):
            # (A RateLimiter subclass breaking its contract: say so, not IndexError later.)
            raise TypeError(
                f"{type(self.limiter).__name__} returned {len(decisions)} decisions for "
                f"{len(hits)} hits; decide() and decide_nowait() return one per hit"
            )
        return decisions
