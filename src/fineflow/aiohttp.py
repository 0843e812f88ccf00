"""Circuit breaking for aiohttp clients: ``ClientSession(middlewares=[...])`` (aiohttp >= 3.12).

::

    from fineflow.aiohttp import circuit_breaker_middleware

    async with aiohttp.ClientSession(middlewares=[circuit_breaker_middleware()]) as session:
        async with session.get("https://api.example.com/v1/chat") as response:
            ...

One breaker per upstream (``host:port``) by default. Connection errors, timeouts and 5xx
responses are failures; a 429 goes through the breaker's ``on_throttle`` policy with the
response's ``Retry-After``. A rejected request raises ``CircuitOpenClientError`` before any
connection is made.

When is a response's outcome recorded? A 5xx or 429 at once, from its status. Any other
response holds its permit until its body has arrived: success when the body is complete
(the payload stream reached EOF); failure when the body fails (connection dropped, read
timeout) -- seen when aiohttp closes or releases the response after the failed read; ignored
(neither) when the caller releases the response before the body arrived, or is cancelled
while reading. A response whose body is never read nor released keeps its permit; the
breaker's ``half_open_max_wait`` ensures such a lost permit cannot wedge it.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Container
from typing import Any

import aiohttp
from aiohttp import ClientHandlerType, ClientMiddlewareType, ClientRequest, ClientResponse

from ._breaker.breaker import CircuitBreaker, Permit
from ._breaker.client import ClientGuard
from ._breaker.registry import BreakerRegistry
from ._errors import CircuitOpenError

__all__ = ["CircuitOpenClientError", "circuit_breaker_middleware", "host_key"]


class CircuitOpenClientError(CircuitOpenError, aiohttp.ClientError):
    """The breaker of an upstream rejected the request: a ``fineflow.CircuitOpenError``
    that aiohttp code catching ``aiohttp.ClientError`` handles too.

    Attributes:
        name: the breaker's name (the upstream's ``host:port`` by default).
        retry_after: seconds until a trial request may go through, or ``None``.
    """


def host_key(request: ClientRequest) -> str:
    """The default key: the upstream's ``host:port``."""
    url = request.url
    return f"{url.host}:{url.port}"


def _timed_out(request: ClientRequest) -> bool:
    # aiohttp's total timeout cancels the task and turns the CancelledError into a
    # TimeoutError only outside the middleware chain, so inside it a timeout looks like a
    # cancellation. The request's timer knows which it was (aiohttp internals, read in this
    # one place; if they change, a timeout degrades to "ignored", never to a crash).
    return getattr(getattr(request, "_timer", None), "_cancelled", False) is True


def _settle_exception(permit: Permit, request: ClientRequest, exc: BaseException) -> None:
    if isinstance(exc, asyncio.CancelledError) and _timed_out(request):
        permit.failure(TimeoutError("aiohttp total timeout"))
    else:
        permit.exception(exc)


def _settle_on_body(response: ClientResponse, permit: Permit, request: ClientRequest) -> None:
    content = response.content
    content.on_eof(permit.success)  # runs at once if the body is already complete
    if permit.done:
        return
    release, close = response.release, response.close

    def settle() -> None:
        if permit.done:
            return
        failed = content.exception()
        if failed is not None:
            permit.failure(failed)
            return
        handling = sys.exc_info()[1]  # read() closes the response while handling its error
        if handling is not None:
            _settle_exception(permit, request, handling)
        else:
            permit.ignore()

    def released() -> object:
        settle()
        return release()

    def closed() -> None:
        settle()
        close()

    # Wrapped on this one response object (``Any``: mypy forbids assigning to a method).
    patched: Any = response
    patched.release = released
    patched.close = closed


def circuit_breaker_middleware(
    registry: BreakerRegistry | None = None,
    *,
    breaker: CircuitBreaker | None = None,
    key: Callable[[ClientRequest], str] | None = None,
    failure_statuses: Container[int] = range(500, 600),
    max_hosts: int = 1000,
) -> ClientMiddlewareType:
    """Build an aiohttp client middleware that guards requests with circuit breakers.

    Args:
        registry: where per-upstream breakers come from (default: a new
            ``BreakerRegistry(max_size=max_hosts)``; give your own for breaker options).
        breaker: one breaker for every request instead (exclusive with registry/key).
        key: the breaker name of a request (default ``host_key``: ``host:port``).
        failure_statuses: statuses that count as failures (default 500-599).
        max_hosts: bound of the default registry.

    Returns:
        ``async def middleware(request, handler) -> ClientResponse``.

    Raises:
        ConfigurationError: conflicting options.
    """
    guard: ClientGuard[ClientRequest] = ClientGuard(
        registry,
        breaker=breaker,
        key=key,
        default_key=host_key,
        failure_statuses=failure_statuses,
        max_hosts=max_hosts,
    )

    async def middleware(request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        breaker = guard.breaker_for(request)
        permit = await guard.acquire(breaker, CircuitOpenClientError)
        try:
            response = await handler(request)
        except BaseException as exc:
            _settle_exception(permit, request, exc)
            # not while a cancellation unwinds
            if isinstance(exc, Exception) and breaker.events_pending:
                await breaker.flush_events()
            raise
        if not guard.settle_status(permit, response.status, response.headers.get("Retry-After")):
            _settle_on_body(response, permit, request)
        if breaker.events_pending:
            await breaker.flush_events()
        return response

    return middleware
