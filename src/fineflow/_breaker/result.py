"""``BreakerResult``: what ``CircuitBreaker.execute`` returns (a value, no behaviour)."""

from __future__ import annotations

from typing import Generic, NamedTuple, TypeVar

from .config import CircuitState

__all__ = ["BreakerResult"]

T = TypeVar("T")


class BreakerResult(NamedTuple, Generic[T]):
    """What ``CircuitBreaker.execute`` returns: the value and where it came from.

    An immutable named tuple (``value, state, from_fallback = await breaker.execute(...)``
    works).

    Attributes:
        value: the call's result, or the fallback's when the breaker rejected the call.
        state: the breaker's state once the call was decided.
        from_fallback: ``True`` when ``value`` came from the fallback.
    """

    value: T
    state: CircuitState
    from_fallback: bool
