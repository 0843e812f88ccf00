"""Circuit-breaker configuration, states, metrics snapshot and sliding windows (pure values).

Nothing here reads a clock or does I/O: the state machine in ``machine`` and the async
breaker in ``breaker`` build on these values.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass
from typing import Literal

from .._errors import ConfigurationError

__all__ = [
    "BreakerConfig",
    "BreakerMetrics",
    "CircuitState",
    "CountWindow",
    "ThrottlePolicy",
    "TimeWindow",
    "WindowType",
]

ThrottlePolicy = Literal["ignore", "failure", "hold"]
WindowType = Literal["count", "time"]


class CircuitState(enum.Enum):
    """The state of a circuit breaker."""

    CLOSED = "closed"
    """Calls flow; their outcomes feed the trip policies."""
    OPEN = "open"
    """Calls are rejected until the reset deadline; then the next caller moves it to
    ``HALF_OPEN``."""
    HALF_OPEN = "half_open"
    """A budget of trial calls (permits) probes recovery; everyone else is rejected at once."""
    DISABLED = "disabled"
    """Set by hand: every call is admitted and counted, nothing can trip the breaker."""
    FORCED_OPEN = "forced_open"
    """Set by hand: every call is rejected until ``reset()`` or another manual state."""
    METRICS_ONLY = "metrics_only"
    """Set by hand: every call is admitted; windows and counters are kept but never trip it."""


def _fail(message: str) -> None:
    raise ConfigurationError(message)


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """The policies of one circuit breaker (a validated value).

    Each configured trip policy trips the breaker on its own: consecutive failures
    (``failure_threshold``), failure rate and slow-call rate over a sliding window.

    Attributes:
        failure_threshold: consecutive failures that open the breaker (``None``: no such
            policy).
        failure_rate_threshold: the failure rate in (0, 1] over the window that opens it
            (``None``: no such policy).
        slow_call_duration: seconds from which a call counts as slow (``None``: no
            slow-call policy).
        slow_call_rate_threshold: the share of slow calls in the window that opens it.
        window_type: ``"count"`` (the last ``window_size`` calls) or ``"time"`` (the calls
            of the last ``window_size`` seconds).
        window_size: calls or seconds, by ``window_type``.
        minimum_calls: calls the window must hold before a rate policy may trip.
        reset_timeout: seconds an opened breaker rejects calls before it probes.
        backoff_multiplier: each consecutive open multiplies the reset timeout by this.
        max_reset_timeout: the cap of the backed-off reset timeout (``None``: no cap).
        jitter: fraction by which a reset timeout is randomly shortened (0.0: off).
        half_open_max_calls: trial calls admitted at once while half-open.
        success_threshold: successful trials that close it (``None``:
            ``half_open_max_calls``).
        half_open_max_wait: seconds after which half-open without a verdict reopens
            (``None``: no limit).
        on_throttle: what an upstream's 429 is: ``"ignore"``, ``"failure"`` or ``"hold"``.
        max_hold: the most seconds a ``"hold"`` rejects calls for, whatever Retry-After says.

    Raises:
        ConfigurationError: an option is out of range; the message says the fix.
    """

    failure_threshold: int | None = 5
    failure_rate_threshold: float | None = None
    slow_call_duration: float | None = None
    slow_call_rate_threshold: float = 1.0
    window_type: WindowType = "count"
    window_size: float = 100
    minimum_calls: int = 10
    reset_timeout: float = 30.0
    backoff_multiplier: float = 1.0
    max_reset_timeout: float | None = None
    jitter: float = 0.0
    half_open_max_calls: int = 3
    success_threshold: int | None = None
    half_open_max_wait: float | None = 120.0
    on_throttle: ThrottlePolicy = "ignore"
    max_hold: float = 60.0

    def __post_init__(self) -> None:
        ft = self.failure_threshold
        if ft is not None and (type(ft) is not int or ft < 1):
            _fail(f"failure_threshold must be an int >= 1 or None (got {ft!r}); e.g. 5")
        frt = self.failure_rate_threshold
        if frt is not None and not 0.0 < frt <= 1.0:
            _fail(f"failure_rate_threshold is a fraction in (0, 1] (got {frt!r}); 0.5 = 50%")
        if ft is None and frt is None and self.slow_call_duration is None:
            _fail(
                "no trip policy: set failure_threshold (e.g. 5), failure_rate_threshold "
                "(e.g. 0.5) or slow_call_duration"
            )
        scd = self.slow_call_duration
        if scd is not None and not (scd > 0 and math.isfinite(scd)):
            _fail(f"slow_call_duration must be > 0 seconds or None (got {scd!r})")
        if not 0.0 < self.slow_call_rate_threshold <= 1.0:
            _fail(
                f"slow_call_rate_threshold is a fraction in (0, 1] "
                f"(got {self.slow_call_rate_threshold!r}); 1.0 = every call slow"
            )
        if self.window_type not in ("count", "time"):
            _fail(f"window_type must be 'count' or 'time' (got {self.window_type!r})")
        ws = self.window_size
        if self.window_type == "count" and (int(ws) != ws or ws < 1):
            _fail(f"a count window_size is a number of calls >= 1 (got {ws!r}); e.g. 100")
        if self.window_type == "time" and not (ws > 0 and math.isfinite(ws)):
            _fail(f"a time window_size is seconds > 0 (got {ws!r}); e.g. 60.0")
        if type(self.minimum_calls) is not int or self.minimum_calls < 1:
            _fail(f"minimum_calls must be an int >= 1 (got {self.minimum_calls!r})")
        if not (self.reset_timeout >= 0 and math.isfinite(self.reset_timeout)):
            _fail(f"reset_timeout must be finite seconds >= 0 (got {self.reset_timeout!r})")
        if not self.backoff_multiplier >= 1.0:
            _fail(
                f"backoff_multiplier must be >= 1.0 (got {self.backoff_multiplier!r}); "
                "1.0 turns backoff off, 2.0 doubles the timeout on each repeated open"
            )
        mrt = self.max_reset_timeout
        if mrt is not None and not mrt >= self.reset_timeout:
            _fail(
                f"max_reset_timeout ({self.max_reset_timeout!r}) must be >= reset_timeout "
                f"({self.reset_timeout!r})"
            )
        if not 0.0 <= self.jitter <= 1.0:
            _fail(f"jitter is a fraction in [0, 1] (got {self.jitter!r}); e.g. 0.1 = up to -10%")
        hm = self.half_open_max_calls
        if type(hm) is not int or hm < 1:
            _fail(f"half_open_max_calls must be an int >= 1 (got {hm!r}); e.g. 3")
        st = self.success_threshold
        if st is not None and (type(st) is not int or not 1 <= st <= hm):
            _fail(
                f"success_threshold must be an int in [1, half_open_max_calls={hm}] "
                f"(got {st!r}); lower it or raise half_open_max_calls"
            )
        hw = self.half_open_max_wait
        if hw is not None and not hw > 0:
            _fail(f"half_open_max_wait must be seconds > 0 or None (got {hw!r})")
        if self.on_throttle not in ("ignore", "failure", "hold"):
            _fail(f"on_throttle must be 'ignore', 'failure' or 'hold' (got {self.on_throttle!r})")
        if not (self.max_hold >= 0 and math.isfinite(self.max_hold)):
            _fail(f"max_hold must be finite seconds >= 0 (got {self.max_hold!r})")

    @property
    def successes_to_close(self) -> int:
        """Trial successes needed in half-open to close (``success_threshold`` or the budget)."""
        return (
            self.half_open_max_calls if self.success_threshold is None else self.success_threshold
        )

    @property
    def reset_timeout_cap(self) -> float:
        """``max_reset_timeout``, by default 10 minutes (or ``reset_timeout`` if longer)."""
        mrt = self.max_reset_timeout
        return max(600.0, self.reset_timeout) if mrt is None else mrt

    @property
    def uses_window(self) -> bool:
        """Whether a rate policy (failure rate or slow-call rate) needs the sliding window."""
        return self.failure_rate_threshold is not None or self.slow_call_duration is not None


@dataclass(frozen=True, slots=True)
class BreakerMetrics:
    """A snapshot of one breaker's state and counters.

    Times are readings of the breaker's clock (``time.monotonic`` by default), ``None``
    until the event first happens. ``total_calls`` counts every attempt, so
    ``total_calls == total_successes + total_failures + total_ignored + total_rejections
    + in_flight``.

    Attributes:
        name: the breaker's name.
        state: its state when the snapshot was taken.
        consecutive_failures: failures since the last success.
        consecutive_successes: successes since the last failure.
        last_failure_time: when the last failure was recorded.
        last_success_time: when the last success was recorded.
        total_calls: every call attempted, rejected ones included.
        total_successes: calls that succeeded.
        total_failures: calls that failed.
        total_ignored: calls whose outcome counts neither way (ignored exceptions,
            cancellations, throttling under ``on_throttle="ignore"``).
        total_rejections: calls turned away without running.
        total_fallbacks: rejected calls answered by a fallback.
        in_flight: calls admitted and not yet settled.
        times_opened: how often the breaker opened.
        last_state_change: when the state last changed.
        failure_rate: the failure rate over the window (``None`` without a rate policy or
            before ``minimum_calls``).
        slow_call_rate: the slow-call rate likewise.
        last_failure_at: ``last_failure_time`` as wall-clock epoch seconds.
        last_success_at: ``last_success_time`` as wall-clock epoch seconds.
        last_state_change_at: ``last_state_change`` as wall-clock epoch seconds.

    The three ``*_at`` fields convert the monotonic readings with the offset between the
    breaker's wall clock and its monotonic clock *when the snapshot is taken* (a call reads
    no clock for them). They are therefore in the terms of the wall clock at snapshot time:
    if the wall clock was stepped (NTP, by hand) since the event, they move with it.
    """

    name: str
    state: CircuitState
    consecutive_failures: int
    consecutive_successes: int
    last_failure_time: float | None
    last_success_time: float | None
    total_calls: int
    total_successes: int
    total_failures: int
    total_ignored: int
    total_rejections: int
    total_fallbacks: int
    in_flight: int
    times_opened: int
    last_state_change: float | None
    failure_rate: float | None
    slow_call_rate: float | None
    last_failure_at: float | None = None
    last_success_at: float | None = None
    last_state_change_at: float | None = None


class CountWindow:
    """The outcomes of the last ``size`` calls, as running totals over a ring buffer."""

    __slots__ = ("_pos", "_ring", "calls", "failures", "slow")

    def __init__(self, size: int) -> None:
        self._ring = bytearray(size)  # bit 0: recorded, bit 1: failed, bit 2: slow
        self._pos = 0
        self.calls = self.failures = self.slow = 0

    def add(self, now: float, failed: bool, slow: bool) -> None:
        """Record one outcome, evicting the oldest when full."""
        ring = self._ring
        old = ring[self._pos]
        if old:
            self.calls -= 1
            self.failures -= (old >> 1) & 1
            self.slow -= (old >> 2) & 1
        ring[self._pos] = 1 | (failed << 1) | (slow << 2)
        self._pos = (self._pos + 1) % len(ring)
        self.calls += 1
        self.failures += failed
        self.slow += slow

    def expire(self, now: float) -> None:
        """Count windows never expire by time."""


class TimeWindow:
    """The outcomes of the last ``seconds``, in ten buckets (so exact to a tenth of it)."""

    __slots__ = ("_buckets", "_width", "calls", "failures", "slow")

    BUCKETS = 10

    def __init__(self, seconds: float) -> None:
        self._width = seconds / self.BUCKETS
        self._buckets: deque[list[int]] = deque()  # [bucket index, calls, failures, slow]
        self.calls = self.failures = self.slow = 0

    def expire(self, now: float) -> None:
        """Drop buckets that ended more than the window ago."""
        oldest = math.floor(now / self._width) - self.BUCKETS
        buckets = self._buckets
        while buckets and buckets[0][0] <= oldest:
            _, c, f, s = buckets.popleft()
            self.calls -= c
            self.failures -= f
            self.slow -= s

    def add(self, now: float, failed: bool, slow: bool) -> None:
        """Record one outcome at ``now``."""
        self.expire(now)
        index = math.floor(now / self._width)
        buckets = self._buckets
        if buckets and buckets[-1][0] >= index:
            bucket = buckets[-1]
        else:
            bucket = [index, 0, 0, 0]
            buckets.append(bucket)
        bucket[1] += 1
        bucket[2] += failed
        bucket[3] += slow
        self.calls += 1
        self.failures += failed
        self.slow += slow
