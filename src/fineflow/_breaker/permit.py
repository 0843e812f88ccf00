"""The values a breaker hands out: ``BreakerResult`` and the hand-settled ``Permit``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Generic, NamedTuple, TypeVar

from .config import CircuitState

if TYPE_CHECKING:
    from .breaker import CircuitBreaker

__all__ = ["BreakerResult", "Permit"]

T = TypeVar("T")

_SUCCESS, _FAILURE, _IGNORED = 0, 1, 2


class BreakerResult(NamedTuple, Generic[T]):
    """What ``CircuitBreaker.execute`` returns: the value and where it came from.

    An immutable named tuple (``value, state, from_fallback = await breaker.execute(...)``
    works): construction sits on both the closed and the open path, and a tuple is the
    cheapest frozen value Python builds.

    Attributes:
        value: the call's result, or the fallback's when the breaker rejected the call.
        state: the breaker's state once the call was decided.
        from_fallback: ``True`` when ``value`` came from the fallback.
    """

    value: T
    state: CircuitState
    from_fallback: bool


#: ``BreakerResult`` without the Python-level ``__new__``: ``_result(BreakerResult, (v, s, f))``.
_result = tuple.__new__


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
