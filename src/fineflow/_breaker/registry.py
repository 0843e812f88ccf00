"""A registry of named circuit breakers sharing default options, and the process-wide one."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import anyio

from .._errors import ConfigurationError
from .breaker import CircuitBreaker, check_shared
from .config import BreakerMetrics, CircuitState
from .shared import SharesBreakers

__all__ = ["BreakerRegistry", "default_registry", "get_circuit_breaker"]


class BreakerRegistry:
    """Named breakers created on first use with shared defaults, optionally bounded.

    Args:
        max_size: most breakers kept (``None``: unbounded). When full, creating one evicts
            the least recently used breaker that is CLOSED with no call in flight, else the
            least recently used one; an evicted name starts afresh when used again.
        shared: a storage sharing the state of every breaker it creates with the other
            instances (``CircuitBreaker(shared=...)``); a breaker's own ``shared`` option
            overrides it.
        **defaults: ``CircuitBreaker`` options applied to every breaker it creates.

    Raises:
        ConfigurationError: ``max_size`` < 1 or a default is not a breaker option.
    """

    def __init__(
        self,
        *,
        max_size: int | None = None,
        shared: SharesBreakers | None = None,
        **defaults: Any,
    ) -> None:
        if max_size is not None and (type(max_size) is not int or max_size < 1):
            raise ConfigurationError(f"max_size must be an int >= 1 or None (got {max_size!r})")
        self.shared = check_shared(shared)
        if defaults.get("shared_failures") and self.shared is None:
            raise ConfigurationError(
                "shared_failures=True counts failures across instances through a shared "
                "storage; pass shared=storage to the registry too"
            )
        # Fail now, not at the first request (unshared: the check watches nothing).
        CircuitBreaker("defaults-check", **{**defaults, "shared": None, "shared_failures": False})
        self.max_size = max_size
        self.defaults = defaults
        self._breakers: OrderedDict[str, CircuitBreaker] = OrderedDict()
        self._configs: dict[str, dict[str, Any]] = {}
        # Creating is check-then-insert: two threads asking for a new name (the process-wide
        # registry is reachable from any thread) must get one breaker, not two.
        self._creating = threading.Lock()

    def get_or_create(self, name: str, **config: Any) -> CircuitBreaker:
        """The breaker called ``name``, created with ``defaults | config`` if missing.

        A name is configured once: later calls pass the same options or none, and get the
        same breaker.

        Raises:
            ConfigurationError: ``config`` is invalid, or differs from the options the
                existing breaker of that name was created with.
        """
        breakers = self._breakers
        breaker = breakers.get(name)
        if breaker is not None:
            if config and config != self._configs[name]:
                raise ConfigurationError(
                    f"breaker {name!r} already exists with options {self._configs[name]!r}; "
                    "pass the same options (or none), or use another name"
                )
            if self.max_size is not None:
                breakers.move_to_end(name)
            return breaker
        with self._creating:
            if name in breakers:  # another thread created it meanwhile
                return self.get_or_create(name, **config)
            return self._create(name, config)

    def _create(self, name: str, config: dict[str, Any]) -> CircuitBreaker:
        breakers = self._breakers
        breaker = CircuitBreaker(name, **{"shared": self.shared, **self.defaults, **config})
        if self.max_size is not None and len(breakers) >= self.max_size:
            self._evict()
        breakers[name] = breaker
        self._configs[name] = config
        return breaker

    def _evict(self) -> None:
        victim = next(
            (
                name
                for name, b in self._breakers.items()
                if b.state is CircuitState.CLOSED and b.metrics().in_flight == 0
            ),
            next(iter(self._breakers)),
        )
        evicted = self._breakers.pop(victim)
        del self._configs[victim]
        evicted.detach()

    def get(self, name: str) -> CircuitBreaker | None:
        """The breaker called ``name``, or ``None``."""
        return self._breakers.get(name)

    def metrics(self) -> dict[str, BreakerMetrics]:
        """A snapshot of every breaker, by name."""
        return {name: b.metrics() for name, b in self._breakers.items()}

    def reset_all(self) -> None:
        """``reset()`` every breaker."""
        for breaker in self._breakers.values():
            breaker.reset()

    async def sync(self) -> bool:
        """Read the shared state of every shared breaker now (see ``CircuitBreaker.sync``).

        Returns:
            ``True`` if every one was read, ``False`` if the store failed for any (logged;
            they go on locally). Never raises because of the store.
        """
        results: list[bool] = []

        async def sync(breaker: CircuitBreaker) -> None:
            results.append(await breaker.sync())

        async with anyio.create_task_group() as group:  # at once: each may wait its timeout
            for breaker in list(self._breakers.values()):
                group.start_soon(sync, breaker)
        return all(results)

    async def aclose(self) -> None:
        """Stop sharing the state of every breaker (``CircuitBreaker.aclose``); they stay
        usable with their local state."""
        for breaker in list(self._breakers.values()):
            await breaker.aclose()

    def __contains__(self, name: object) -> bool:
        return name in self._breakers

    def __iter__(self) -> Iterator[CircuitBreaker]:
        return iter(list(self._breakers.values()))

    def __len__(self) -> int:
        return len(self._breakers)

    def __repr__(self) -> str:
        return f"<BreakerRegistry {len(self._breakers)} breakers>"


default_registry = BreakerRegistry()
"""The process-wide registry behind ``get_circuit_breaker`` (unbounded, no defaults)."""


def get_circuit_breaker(name: str, **options: Any) -> CircuitBreaker:
    """The process-wide breaker called ``name``, created on first use.

    Shorthand for ``default_registry.get_or_create(name, **options)``: any module may ask
    for ``get_circuit_breaker("payments")`` and gets the one breaker of that name. Configure
    it once (typically where the dependency's client is set up); later calls pass the same
    options or none. Different options for an existing name raise instead of silently
    returning a breaker configured otherwise.

    Args:
        name: the breaker's name.
        **options: ``CircuitBreaker`` options, used when the breaker is created.

    Returns:
        The breaker.

    Raises:
        ConfigurationError: an option is invalid, or differs from the options the existing
            breaker of that name was created with.
    """
    return default_registry.get_or_create(name, **options)
