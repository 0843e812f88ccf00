"""What the HTTP client adapters (``fineflow.aiohttp``, ``fineflow.httpx``) share.

Which breaker guards a request (one per upstream ``host:port`` from a registry by default, or
one given breaker), how a rejection becomes the client library's error, and how a response's
status settles its permit: a failure status at once, a 429 through the breaker's
``on_throttle`` policy with the response's ``Retry-After``; any other status leaves the
permit to the adapter, which settles it when the body has arrived or failed.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from typing import Generic, TypeVar

from .._errors import CircuitOpenError, ConfigurationError
from .breaker import CircuitBreaker, Permit
from .http import parse_retry_after
from .registry import BreakerRegistry

__all__ = ["ClientGuard"]

RequestT = TypeVar("RequestT")


class ClientGuard(Generic[RequestT]):
    """The breaker policy of one client adapter instance.

    Args:
        registry: where per-key breakers come from (default: a new
            ``BreakerRegistry(max_size=max_hosts)``).
        breaker: one breaker for every request instead (exclusive with registry/key).
        key: the breaker name of a request (``None``: ``default_key``).
        default_key: the adapter's default, usually the upstream's ``host:port``.
        failure_statuses: statuses that count as failures.
        max_hosts: bound of the default registry.

    Raises:
        ConfigurationError: conflicting options.
    """

    __slots__ = ("_breaker", "_failure_statuses", "_get_or_create", "_key")

    def __init__(
        self,
        registry: BreakerRegistry | None,
        *,
        breaker: CircuitBreaker | None,
        key: Callable[[RequestT], str] | None,
        default_key: Callable[[RequestT], str],
        failure_statuses: Container[int],
        max_hosts: int,
    ) -> None:
        if breaker is not None and (registry is not None or key is not None):
            raise ConfigurationError("pass breaker=... or registry=/key=, not both")
        if registry is None:
            registry = BreakerRegistry(max_size=max_hosts)
        self._breaker = breaker
        self._get_or_create = registry.get_or_create
        self._key = key if key is not None else default_key
        self._failure_statuses = failure_statuses

    def breaker_for(self, request: RequestT) -> CircuitBreaker:
        """The breaker that guards ``request``."""
        if self._breaker is not None:
            return self._breaker
        return self._get_or_create(self._key(request))

    async def acquire(
        self, breaker: CircuitBreaker, rejected: Callable[[str, float | None], CircuitOpenError]
    ) -> Permit:
        """A permit from ``breaker``, else raise ``rejected(name, retry_after)``."""
        permit = breaker.try_acquire()
        if permit is None:
            if breaker.events_pending:
                await breaker.flush_events()
            raise rejected(breaker.name, breaker.retry_after())
        return permit

    def settle_status(self, permit: Permit, status: int, retry_after: str | None) -> bool:
        """Settle ``permit`` from a response status when the status decides it.

        Args:
            permit: the request's permit.
            status: the response status.
            retry_after: the response's ``Retry-After`` header, if any.

        Returns:
            ``True`` when settled (a failure status, or 429); ``False`` when the body decides.
        """
        if status in self._failure_statuses:
            permit.failure()
            return True
        if status == 429:
            permit.throttled(parse_retry_after(retry_after))
            return True
        return False
