"""Circuit breaking for httpx clients: an ``httpx.AsyncBaseTransport`` that wraps another.

::

    import httpx
    from fineflow.httpx import CircuitBreakerTransport

    transport = CircuitBreakerTransport(httpx.AsyncHTTPTransport(retries=1))
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.get("https://api.example.com/v1/models")

    # The AI SDKs built on httpx take such a client:
    # openai.AsyncOpenAI(http_client=httpx.AsyncClient(transport=transport))

The policies are those of ``fineflow.aiohttp``: one breaker per upstream (``host:port``) by
default; connection errors, timeouts (``httpx.TimeoutException``) and 5xx responses are
failures; a 429 goes through the breaker's ``on_throttle`` policy with the response's
``Retry-After``. A rejected request raises ``CircuitOpenTransportError`` before the wrapped
transport is asked for anything.

When is a response's outcome recorded? A 5xx or 429 at once, from its status. Any other
response holds its permit until its body has arrived: success when the body stream ends;
failure when reading it fails (``httpx.ReadError``, ``httpx.ReadTimeout``, ...); ignored
(neither) when the response is closed before its body arrived (leaving a ``client.stream``
block early) or the reader is cancelled. httpx reads the body of every response not sent
with ``stream=True`` before returning it, so for plain ``client.get()`` the outcome is known
when the call returns.

The breaker is async: there is no wrapper for the synchronous ``httpx.Client``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Container

import httpx

from ._breaker.breaker import CircuitBreaker, Permit
from ._breaker.client import ClientGuard
from ._breaker.registry import BreakerRegistry
from ._errors import CircuitOpenError

__all__ = ["CircuitBreakerTransport", "CircuitOpenTransportError", "host_key"]

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


class CircuitOpenTransportError(CircuitOpenError, httpx.TransportError):
    """The breaker of an upstream rejected the request: a ``fineflow.CircuitOpenError``
    that httpx code catching ``httpx.TransportError`` (or ``httpx.RequestError``,
    ``httpx.HTTPError``) handles too.

    Attributes:
        name: the breaker's name (the upstream's ``host:port`` by default).
        retry_after: seconds until a trial request may go through, or ``None``.
    """


def host_key(request: httpx.Request) -> str:
    """The default key: the upstream's ``host:port`` (default ports spelled out)."""
    url = request.url
    port = url.port if url.port is not None else _DEFAULT_PORTS.get(url.scheme)
    return f"{url.host}:{port}"


class _SettlingStream(httpx.AsyncByteStream):
    """A response body that settles its request's permit when it ends, fails or closes.

    An iterator object rather than an async generator: one left unfinished (the reader
    stopped early) has nothing to finalize.
    """

    def __init__(self, stream: httpx.AsyncByteStream, permit: Permit, breaker: CircuitBreaker):
        self._stream = stream
        self._chunks = stream.__aiter__()  # (an async generator starts at the first read)
        self._permit = permit
        self._breaker = breaker

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            self._permit.success()
            if self._breaker.events_pending:
                await self._breaker.flush_events()
            raise
        except BaseException as exc:
            self._permit.exception(exc)  # a cancellation is ignored, never a failure
            if isinstance(exc, Exception) and self._breaker.events_pending:
                await self._breaker.flush_events()
            raise

    async def aclose(self) -> None:
        self._permit.ignore()  # closed before the body ended (no-op once settled)
        await self._stream.aclose()


class CircuitBreakerTransport(httpx.AsyncBaseTransport):
    """An httpx transport that guards the requests of another with circuit breakers.

    Args:
        transport: the transport that sends requests (default: a new
            ``httpx.AsyncHTTPTransport()``); closed with this one.
        registry: where per-upstream breakers come from (default: a new
            ``BreakerRegistry(max_size=max_hosts)``; give your own for breaker options).
        breaker: one breaker for every request instead (exclusive with registry/key).
        key: the breaker name of a request (default ``host_key``: ``host:port``).
        failure_statuses: statuses that count as failures (default 500-599).
        max_hosts: bound of the default registry.

    Raises:
        ConfigurationError: conflicting options.
    """

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        registry: BreakerRegistry | None = None,
        breaker: CircuitBreaker | None = None,
        key: Callable[[httpx.Request], str] | None = None,
        failure_statuses: Container[int] = range(500, 600),
        max_hosts: int = 1000,
    ) -> None:
        self._guard: ClientGuard[httpx.Request] = ClientGuard(
            registry,
            breaker=breaker,
            key=key,
            default_key=host_key,
            failure_statuses=failure_statuses,
            max_hosts=max_hosts,
        )
        self.transport = transport if transport is not None else httpx.AsyncHTTPTransport()

    def breaker_for(self, request: httpx.Request) -> CircuitBreaker:
        """The breaker that guards ``request`` (created on first use)."""
        return self._guard.breaker_for(request)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through the wrapped transport if its breaker admits it.

        Raises:
            CircuitOpenTransportError: the breaker rejected the request.
            httpx.TransportError: the wrapped transport failed (recorded first).
        """
        guard = self._guard
        breaker = guard.breaker_for(request)
        try:
            permit = await guard.acquire(breaker, CircuitOpenTransportError)
        except CircuitOpenTransportError as exc:
            exc.request = request
            raise
        try:
            response = await self.transport.handle_async_request(request)
        except BaseException as exc:
            permit.exception(exc)  # timeouts and connection errors are failures
            if isinstance(exc, Exception) and breaker.events_pending:
                await breaker.flush_events()
            raise
        if guard.settle_status(permit, response.status_code, response.headers.get("Retry-After")):
            if breaker.events_pending:
                await breaker.flush_events()
            return response
        stream = response.stream
        if not isinstance(stream, httpx.AsyncByteStream):  # a sync-only transport's answer
            permit.success()
            return response
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_SettlingStream(stream, permit, breaker),
            extensions=response.extensions,
            request=request,
        )

    async def aclose(self) -> None:
        """Close the wrapped transport."""
        await self.transport.aclose()
