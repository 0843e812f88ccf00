"""The one decide / headers / denial path of every rate-limit front end.

:class:`Gate` is what the middleware, the FastAPI dependency and the ``limit`` decorator
share once a request's hits are collected (by :class:`~.ruleset.RuleSet`): decide them all
at once (without awaiting when the storage is in-process and open), render the rate-limit
headers of an admitted request, and build the ASGI app answering a denied one (the
problem+json 429, the fail-closed 503, or the user's ``deny_app``). Every decision it
returns is counted once per rule (:class:`~.counters.DecisionCounts`), for the exporters.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from .._asgi.problem import ProblemResponse
from .._asgi.types import ASGIApp, Message, Scope, Send
from .._storage.base import Hit
from .._storage.lifespan import OwnedStorage
from . import live
from .counters import DecisionCounts, DecisionKey
from .deniedlog import DeniedLog
from .headers import AppliedPolicy, HeaderStyle, render_headers
from .limiter import STORAGE_UNAVAILABLE, Decisions, RateLimiter
from .problems import quota_exceeded, storage_unavailable

__all__ = ["LIMITER_STATE", "Gate", "Headers", "adding_headers"]

LIMITER_STATE = "fineflow.limiter"
"""The ``scope["state"]`` entry where a :class:`RateLimitMiddleware` publishes its limiter
for the dependencies and decorators of the app it wraps."""

Headers = Sequence[tuple[bytes, bytes]]


class Gate:
    """Decisions, headers and denials for one limiter.

    Args:
        limiter: the limiter deciding.
        owned: the storage to open before deciding when nothing else opens it, or ``None``.
        style: the header style (already validated), ``None`` for no headers.
        headers_for: whether a response to ``scope`` carries rate-limit headers.
        shadow: decide, never deny, send no headers.
        deny_app: the ASGI app answering denials instead of the built-in responses.
        denied_log: where denied requests are logged (:meth:`log_denial`), or ``None``.
        counts: the decision counts to add to (default: the gate's own); a gate that
            replaces another passes the old one's, so the exported totals never drop.
    """

    __slots__ = (
        "__weakref__",
        "_counts",
        "denied_log",
        "deny_app",
        "headers_for",
        "limiter",
        "owned",
        "shadow",
        "style",
    )

    def __init__(
        self,
        limiter: RateLimiter,
        *,
        owned: OwnedStorage | None = None,
        style: HeaderStyle | None = "ietf",
        headers_for: Callable[[Scope], bool] | None = None,
        shadow: bool = False,
        deny_app: ASGIApp | None = None,
        denied_log: DeniedLog | None = None,
        counts: DecisionCounts | None = None,
    ) -> None:
        self.limiter = limiter
        self.owned = owned
        self.style = style
        self.headers_for = headers_for
        self.shadow = shadow
        self.deny_app = deny_app
        self.denied_log = denied_log
        self._counts = DecisionCounts(STORAGE_UNAVAILABLE) if counts is None else counts
        live.track(self)

    @property
    def counts(self) -> DecisionCounts:
        """The decision counts this gate adds to (shared with a gate it replaced)."""
        return self._counts

    def decision_counts(self) -> dict[DecisionKey, int]:
        """The decisions this gate made, by ``(rule, tier, outcome)``."""
        return self._counts.snapshot()

    def decide_nowait(self, hits: Sequence[Hit]) -> Decisions | None:
        """The decisions without awaiting, when the storage is in-process and open; else
        ``None`` (then :meth:`decide`)."""
        owned = self.owned
        if owned is not None and not owned.opened:
            return None
        decisions = self.limiter.decide_nowait(hits)
        return None if decisions is None else self._checked(decisions, hits)

    async def decide(self, hits: Sequence[Hit]) -> Decisions:
        """The decisions of ``hits``, all or nothing (the owned storage opened if need be)."""
        owned = self.owned
        if owned is not None and not owned.opened:
            await owned.ensure_open()
            ready = self.decide_nowait(hits)
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
        self._counts.count(hits, decisions, self.shadow)
        return decisions

    def allowed_headers(
        self, scope: Scope, applied: Sequence[AppliedPolicy], decisions: Decisions
    ) -> Headers | None:
        """The rate-limit headers of an admitted request, or ``None`` for none. (Callers send
        none for decisions with ``storage_failed``: there are no numbers to show; they test
        it anyway, to count it.)"""
        style = self.style
        if style is None or self.shadow or scope["type"] != "http":
            return None
        if self.headers_for is not None and not self.headers_for(scope):
            return None
        return render_headers(style, applied, decisions)

    def log_denial(
        self,
        scope: Scope,
        hits: Sequence[Hit],
        applied: Sequence[AppliedPolicy],
        decisions: Decisions,
    ) -> None:
        """Log a denied request (shadow mode: one it would deny) through ``denied_log``;
        callers test ``denied_log is not None`` first, so no log costs one check."""
        if self.denied_log is not None:
            self.denied_log.record(scope, hits, applied, decisions, shadow=self.shadow)

    def denial(
        self, scope: Scope, applied: Sequence[AppliedPolicy], decisions: Decisions
    ) -> ASGIApp:
        """The ASGI app answering a denied request: ``deny_app``, else :meth:`problem`."""
        deny_app = self.deny_app
        if deny_app is not None and (
            scope["type"] == "http" or "websocket.http.response" in (scope.get("extensions") or {})
        ):
            return deny_app
        return self.problem(scope, applied, decisions)

    def problem(
        self, scope: Scope, applied: Sequence[AppliedPolicy], decisions: Decisions
    ) -> ProblemResponse:
        """The problem+json response of a denied request: 503 when the storage failed (and
        the policy denies), else 429 naming the violated policies, with ``Retry-After``."""
        if decisions.storage_failed:
            return storage_unavailable(decisions.retry_after)
        style = self.style
        show = style is not None and (self.headers_for is None or self.headers_for(scope))
        headers = render_headers(style, applied, decisions) if style and show else ()
        violated = []
        for policy, decision in zip(applied, decisions, strict=True):
            if not decision.allowed:
                violated.append(policy)
        return quota_exceeded(violated, decisions.retry_after, headers)


def adding_headers(headers: Headers, send: Send) -> Send:
    """``send``, adding ``headers`` to ``http.response.start`` (bodies pass untouched)."""

    def send_with_headers(message: Message) -> Awaitable[None]:
        # Returns send's awaitable rather than awaiting it: one coroutine less per message
        # (the app awaits it all the same).
        if message["type"] == "http.response.start":
            # A copy: the app may reuse its message dicts. (Copied, then assigned:
            # ``{**message, "headers": ...}`` builds a second dict on the way.)
            message = {**message}
            message["headers"] = [*message.get("headers", ()), *headers]
        return send(message)

    return send_with_headers
