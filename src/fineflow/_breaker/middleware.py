"""``CircuitBreakerMiddleware``: a circuit breaker around the routes of an ASGI app.

Flow of one HTTP request: find the breaker (one for the app, or one per key from a
registry); when it rejects, answer 503 (or run the fallback app) without calling the app;
else call the app and settle the permit when the response *ends* -- the last body chunk
(``more_body`` false) went out, or the app raised -- so a stream that breaks halfway is a
failure even though its 200 headers were already sent. A 5xx status is a failure, a 429
goes through the breaker's ``on_throttle`` policy, an exception raised by the downstream
``send`` (the client went away) is ignored, any other exception is classified like
``CircuitBreaker.call`` does and re-raised.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, Container

from .._asgi.problem import ProblemResponse, retry_after_header
from .._asgi.types import ASGIApp, Message, Receive, Scope, Send
from .._errors import ConfigurationError
from .breaker import CircuitBreaker, Permit
from .http import parse_retry_after
from .registry import BreakerRegistry

__all__ = ["CircuitBreakerMiddleware", "path_key", "service_unavailable"]

KeyFunc = Callable[[Scope], "str | Awaitable[str | None] | None"]

PROBLEM_TYPE = "urn:fineflow:problem:circuit-open"


def path_key(scope: Scope) -> str:
    """The default key: the request path (``root_path`` included), one breaker per path."""
    # An empty path is legal on the wire (``GET ?a HTTP/1.1``): key it as "/".
    return (str(scope.get("root_path", "")) + str(scope.get("path", ""))) or "/"


def service_unavailable(name: str, retry_after: float | None) -> ProblemResponse:
    """The answer to a rejected request: 503, ``Retry-After`` and problem+json (a websocket
    handshake without the denial-response extension is closed with 1013, try again later).

    Args:
        name: the breaker's name, reported in the body.
        retry_after: seconds until a retry may succeed (``None``: unknown, sent as 1).
    """
    if retry_after is None or not math.isfinite(retry_after):
        retry_after = 1.0
    header = retry_after_header(retry_after)
    body = json.dumps(
        {
            "type": PROBLEM_TYPE,
            "title": "Service Unavailable",
            "status": 503,
            "detail": f"circuit {name!r} is open; retry after {header[1].decode()}s",
            "circuit": name,
        }
    ).encode()
    return ProblemResponse(503, body, [header], "circuit open", close_code=1013)


class CircuitBreakerMiddleware:
    """Break the circuit around an ASGI app's routes (pure ASGI; http and websocket).

    Args:
        app: the ASGI app to protect.
        breaker: one breaker for every request. Exclusive with ``registry``/``key``.
        registry: where per-key breakers come from (default: a new ``BreakerRegistry``
            bounded by ``max_keys``).
        key: sync or async callable of the scope giving the breaker name; ``None`` from it
            lets the request through unguarded. Default ``path_key`` (the raw path; pass a
            route-template key for routes with ids).
        max_keys: bound of the default registry.
        failure_statuses: response statuses that count as failures (default 500-599).
        fallback: ASGI app that answers rejected requests instead of the 503.
        state_header: response header carrying the circuit state (e.g. ``"x-circuit-state"``),
            off by default.

    Raises:
        ConfigurationError: conflicting or invalid options.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        breaker: CircuitBreaker | None = None,
        registry: BreakerRegistry | None = None,
        key: KeyFunc | None = None,
        max_keys: int = 1000,
        failure_statuses: Container[int] = range(500, 600),
        fallback: ASGIApp | None = None,
        state_header: str | None = None,
    ) -> None:
        if breaker is not None and (registry is not None or key is not None):
            raise ConfigurationError(
                "pass breaker=... for one breaker, or registry=/key= for one per key, not both"
            )
        if breaker is None and registry is None:
            registry = BreakerRegistry(max_size=max_keys)
        self.app = app
        self.breaker = breaker
        self.registry = registry
        self.key: KeyFunc = key if key is not None else path_key
        self.failure_statuses = failure_statuses
        self.fallback = fallback
        self.state_header = state_header.lower().encode("latin-1") if state_header else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await self._websocket(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        breaker = self.breaker if self.breaker is not None else await self._keyed_breaker(scope)
        if breaker is None:
            await self.app(scope, receive, send)
            return
        permit = breaker.try_acquire()
        if permit is None:
            await self._reject(scope, receive, send, breaker)
            return
        responder = _Responder(self, permit, send, breaker)
        try:
            await self.app(scope, receive, responder.send)
        except BaseException as exc:
            if responder.send_failed:  # the client went away: says nothing of health
                permit.ignore()
            else:
                permit.exception(exc)
            if breaker.events_pending:
                await breaker.flush_events()
            raise
        # Returned without finishing a response: the server answers 500 (no start) or cuts
        # the stream, so it is a failure either way (no-op when the response ended).
        permit.failure()
        if breaker.events_pending:
            await breaker.flush_events()

    async def _keyed_breaker(self, scope: Scope) -> CircuitBreaker | None:
        """The registry's breaker for the request's key, ``None`` to let it through."""
        name = self.key(scope)
        if name is not None and not isinstance(name, str):
            name = await name
        if name is None or self.registry is None:
            return None
        return self.registry.get_or_create(name)

    def _stamped(self, send: Send, breaker: CircuitBreaker) -> Send:
        header = self.state_header
        if header is None:
            return send

        async def stamped(message: Message) -> None:
            if message["type"] in ("http.response.start", "websocket.http.response.start"):
                message = _with_state(message, header, breaker)
            await send(message)

        return stamped

    async def _reject(
        self, scope: Scope, receive: Receive, send: Send, breaker: CircuitBreaker
    ) -> None:
        if breaker.events_pending:
            await breaker.flush_events()
        app = self.fallback or service_unavailable(breaker.name, breaker.retry_after())
        await app(scope, receive, self._stamped(send, breaker))

    def _settle(self, permit: Permit, status: int, retry_after: str | None) -> None:
        if status in self.failure_statuses:
            permit.failure()
        elif status == 429:
            permit.throttled(parse_retry_after(retry_after))
        else:
            permit.success()

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        breaker = self.breaker if self.breaker is not None else await self._keyed_breaker(scope)
        if breaker is None:
            await self.app(scope, receive, send)
            return
        permit = breaker.try_acquire()
        if permit is None:
            if "websocket.http.response" in (scope.get("extensions") or {}):
                await self._reject(scope, receive, send, breaker)
            else:
                # 1013 Try Again Later; before accept the server turns this into a 403.
                await send({"type": "websocket.close", "code": 1013, "reason": "circuit open"})
            return
        downstream = self._stamped(send, breaker)

        async def guarded_send(message: Message) -> None:
            kind = message["type"]
            # A websocket's outcome is decided at the handshake: a long-lived connection
            # must not hold a half-open permit for its whole life.
            if kind == "websocket.accept":
                permit.success()
            elif kind == "websocket.http.response.start":
                self._settle(permit, message["status"], None)
            elif kind == "websocket.close":
                permit.ignore()  # the app turned the client away itself
            await downstream(message)

        try:
            await self.app(scope, receive, guarded_send)
        except BaseException as exc:
            permit.exception(exc)
            raise
        finally:
            permit.ignore()  # returned without a handshake: no verdict (no-op if settled)
            if breaker.events_pending:
                await breaker.flush_events()


def _with_state(message: Message, header: bytes, breaker: CircuitBreaker) -> Message:
    # A copy: the app may reuse its message and header list (Starlette's raw_headers).
    state = breaker.state.value.encode()
    return {**message, "headers": [*message.get("headers", ()), (header, state)]}


class _Responder:
    """The per-request state of one admitted HTTP request; ``send`` wraps the server's.

    It settles the request's permit when the response ends: the last body chunk went out
    (success, or failure for a failure status, or the throttle policy for a 429). The
    middleware settles it when the app raises or returns without finishing the response.
    """

    __slots__ = ("breaker", "downstream", "mw", "permit", "retry_after", "send_failed", "status")

    def __init__(
        self,
        mw: CircuitBreakerMiddleware,
        permit: Permit,
        downstream: Send,
        breaker: CircuitBreaker,
    ) -> None:
        self.mw = mw
        self.permit = permit
        self.downstream = downstream
        self.breaker = breaker
        self.status = 0  # of the response, 0 before its start
        self.retry_after: str | None = None  # with a 429 status
        self.send_failed = False  # the server's send raised: the client went away

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = message["status"]
            if self.status == 429:
                self.retry_after = _retry_after(message)
            header = self.mw.state_header
            if header is not None:
                message = _with_state(message, header, self.breaker)
        try:
            await self.downstream(message)
        except BaseException:
            self.send_failed = True
            raise
        ended = (kind == "http.response.body" and not message.get("more_body")) or (
            kind == "http.response.pathsend"
        )
        if ended:
            self.mw._settle(self.permit, self.status, self.retry_after)


def _retry_after(message: Message) -> str | None:
    for name, value in message.get("headers", ()):
        if name.lower() == b"retry-after":
            return str(value.decode("latin-1"))
    return None
