"""The values a breaker hands out: ``BreakerResult`` and the hand-settled ``Permit``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Generic, TypeVar

from ._breaker_config import CircuitState

if TYPE_CHECKING:
    from ._breaker import CircuitBreaker

__all__ = ["BreakerResult", "Permit"]

T = TypeVar("T")

_SUCCESS, _FAILURE, _IGNORED = 0, 1, 2


class BreakerResult(Generic[T]):
    """What ``CircuitBreaker.execute`` returns: the value and where it came from.

    Attributes:
        value: the call's result, or the fallback's when the breaker rejected the call.
        state: the breaker's state once the call was decided.
        from_fallback: ``True`` when ``value`` came from the fallback.
    """

    # A frozen value, hand-written rather than a frozen dataclass: construction sits on the
    # open path, and the dataclass's object.__setattr__ per field triples its cost.
    __slots__ = ("from_fallback", "state", "value")
    __match_args__ = ("value", "state", "from_fallback")

    value: T
    state: CircuitState
    from_fallback: bool

    def __init__(self, value: T, state: CircuitState, from_fallback: bool) -> None:
        _set(self, "value", value)
        _set(self, "state", state)
        _set(self, "from_fallback", from_fallback)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"BreakerResult is immutable (cannot set {name!r})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BreakerResult):
            return NotImplemented
        return (self.value, self.state, self.from_fallback) == (
            other.value,
            other.state,
            other.from_fallback,
        )

    def __hash__(self) -> int:
        return hash((self.value, self.state, self.from_fallback))

    def __repr__(self) -> str:
        return (
            f"BreakerResult(value={self.value!r}, state={self.state}, "
            f"from_fallback={self.from_fallback})"
        )


_set = object.__setattr__


class Permit:
    """One admitted call, to be settled exactly once (later settlements are ignored).

    Returned by ``CircuitBreaker.try_acquire`` for code that cannot wrap the call in
    ``call``/``async with`` (the ASGI and aiohttp middlewares use it).
    """

    __slots__ = ("_breaker", "_start", "_token", "done")

    def __init__(self, breaker: CircuitBreaker, token: int, start: float) -> None:
        self._breaker = breaker
        self._token = token
        self._start = start
        self.done = False

    def success(self) -> None:
        """The call succeeded."""
        if not self.done:
            self.done = True
            self._breaker._settle(_SUCCESS, self._token, self._start, None)

    def failure(self, exc: BaseException | None = None) -> None:
        """The call failed (``exc`` is passed on to failure listeners)."""
        if not self.done:
            self.done = True
            self._breaker._settle(_FAILURE, self._token, self._start, exc)

    def ignore(self) -> None:
        """The call was cancelled or its outcome says nothing about health."""
        if not self.done:
            self.done = True
            self._breaker._settle(_IGNORED, self._token, self._start, None)

    def throttled(self, retry_after: float | None) -> None:
        """The upstream answered 429; apply the breaker's ``on_throttle`` policy."""
        if not self.done:
            self.done = True
            self._breaker._settle_throttled(self._token, self._start, retry_after, None)

    def exception(self, exc: BaseException) -> None:
        """Settle by classifying ``exc`` as ``call`` does (cancellation is ignored)."""
        if not self.done:
            self.done = True
            self._breaker._on_exception(self._token, self._start, exc)

    def result(self, value: object) -> None:
        """Settle by classifying a result as ``call`` does (``failure_if``, ``throttle``)."""
        if not self.done:
            self.done = True
            self._breaker._on_result(self._token, self._start, value)
