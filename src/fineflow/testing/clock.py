"""A fake clock for tests: time moves only when the test moves it.

fineflow never reads a clock of its own in its pure cores; every part that needs the time
takes a clock function, so a test can hand it this one instead of the real time::

    from fineflow.testing import FakeClock

    clock = FakeClock()
    storage = ff.MemoryStorage(clock=clock.time_ns)     # nanoseconds since the epoch
    limiter = ff.RateLimiter(storage, clock=clock)      # float seconds
    breaker = ff.CircuitBreaker("upstream", clock=clock)
    ...
    clock.advance(30)                                   # half a minute later, at once

The time is kept in integer nanoseconds, so ``time_ns()`` moves by exactly what was
advanced, and the float seconds are derived from it.
"""

from __future__ import annotations

__all__ = ["FakeClock"]

_NS = 1_000_000_000


class FakeClock:
    """A clock that stands still until ``advance()`` or ``now = ...`` moves it.

    Calling it returns float seconds (what :class:`fineflow.CircuitBreaker` and
    :class:`fineflow.RateLimiter` take as ``clock=``); :meth:`time_ns` returns integer
    nanoseconds (what :class:`fineflow.MemoryStorage` takes as ``clock=``).

    Args:
        start: the time it shows first, in seconds (default 1,700,000,000: November 2023,
            so it also passes for wall-clock time).
    """

    __slots__ = ("_ns",)

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._ns = _to_ns(start)

    def __call__(self) -> float:
        """The current fake time in seconds."""
        return self._ns / _NS

    def time_ns(self) -> int:
        """The current fake time in integer nanoseconds."""
        return self._ns

    @property
    def now(self) -> float:
        """The current fake time in seconds; assign to jump to a given time."""
        return self._ns / _NS

    @now.setter
    def now(self, seconds: float) -> None:
        self._ns = _to_ns(seconds)

    def advance(self, seconds: float) -> None:
        """Move the time forward by ``seconds`` (not backwards: clocks here are monotonic).

        Raises:
            ValueError: ``seconds`` is negative.
        """
        if seconds < 0:
            raise ValueError(f"a clock only moves forward; got advance({seconds!r})")
        self._ns += _to_ns(seconds)

    def advance_ns(self, nanoseconds: int) -> None:
        """Move the time forward by exactly ``nanoseconds``.

        Raises:
            ValueError: ``nanoseconds`` is negative.
        """
        if nanoseconds < 0:
            raise ValueError(f"a clock only moves forward; got advance_ns({nanoseconds!r})")
        self._ns += nanoseconds

    def __repr__(self) -> str:
        return f"FakeClock(now={self.now!r})"


def _to_ns(seconds: float) -> int:
    return round(seconds * _NS)
