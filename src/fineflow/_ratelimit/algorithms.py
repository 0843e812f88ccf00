"""The reference rate-limit algorithms: pure functions, no I/O, no clock.

Theory of operation
-------------------
Every algorithm is one function ``step(state, now, quota, cost) -> (Decision, new_state)``.
Time is an ``int`` of nanoseconds since the Unix epoch and every computation is integer
arithmetic, so a backend that repeats the same formulas (the PostgreSQL functions do, on
``bigint``/``numeric``) gets bit-for-bit the same decisions; floats appear only in the
``Decision`` handed to callers (seconds).

Rules shared by all three algorithms:

* ``cost`` is a non-negative integer. ``cost == 0`` *peeks*: it reports the state as it
  is, ``allowed`` is ``True`` and the state comes back unchanged (missing stays missing).
* A denied request consumes nothing: the state returned is the state given.
* A cost that can never fit (``cost > capacity``) is denied with ``retry_after=None`` and
  ``reason="cost exceeds capacity"``.
* ``retry_after`` is 0 when allowed, else the seconds until this same request would fit if
  nothing else happened. ``reset_after`` is the seconds until the quota is entirely unused.

``gcra`` (default)
    Generic Cell Rate Algorithm. ``T = period_ns // limit`` (the emission interval, whole
    nanoseconds, rounded down), ``tau = capacity * T`` (the tolerance; capacity is
    ``burst`` or ``limit``). State ``t`` is the theoretical arrival time (TAT).
    ``tat = max(state.t, now)``; ``new_tat = tat + cost * T``; the request is admitted iff
    ``new_tat - tau <= now``. So a fresh key admits exactly ``capacity`` units back to back,
    then one per ``T``. ``remaining = (now + tau - new_tat) // T`` (floor),
    ``reset_after = new_tat - now``; when denied, ``retry_after = new_tat - tau - now``.
    The state expires (is equivalent to no state) at ``t``.

``fixed_window``
    Windows are aligned to the Unix epoch: ``start = now - now % period_ns``. State is
    ``(t=start, used)``. Admitted iff ``count + cost <= limit``; ``remaining = limit -
    count``; ``reset_after`` and (when denied) ``retry_after`` are the time to the window's
    end. Expires at ``start + period``.

``sliding_window``
    The weighted two-window counter. State ``(t=start, used, prev)`` where ``prev`` is the
    previous aligned window's count. With ``e = now - start`` the estimate is
    ``prev * (period - e) / period + count``; admitted iff
    ``prev * (period - e) + (count + cost) * period <= limit * period`` (exact integers).
    ``remaining`` is the floor of ``limit`` minus the estimate after the charge.
    ``retry_after`` is the earliest time, in this window or the next, when the weighted
    estimate leaves room for ``cost``. Expires at ``start + 2 * period``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

from .._errors import ConfigurationError
from .quota import Quota

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "BucketState",
    "Decision",
    "StepFunction",
    "expires_at",
    "fixed_window_step",
    "gcra_step",
    "new_record",
    "sliding_window_step",
    "step",
    "step_all",
    "validate_algorithm",
]

Algorithm = Literal["gcra", "fixed_window", "sliding_window"]
NS = 1_000_000_000
COST_TOO_HIGH = "cost exceeds capacity"


class BucketState(NamedTuple):
    """The stored state of one key under one quota.

    ``t`` is the TAT for ``gcra`` and the window start for the window algorithms
    (nanoseconds since the epoch); ``used`` (this window) and ``prev`` (the previous
    one) are the window counters.
    """

    t: int
    used: int = 0
    prev: int = 0


class Decision(NamedTuple):
    """The answer to "may this caller do this now?" for one quota.

    An immutable value. (A ``NamedTuple`` rather than a frozen dataclass: it is built on
    every request and a frozen dataclass costs four times as much to construct.)

    Attributes:
        allowed: whether the request was admitted (and charged).
        limit: the quota's limit per period.
        remaining: how much cost the quota still admits right now.
        reset_after: seconds until the quota is entirely unused again.
        retry_after: seconds until this request would fit (0.0 when allowed); ``None`` if it
            can never fit.
        policy: the quota's policy name.
        period: the quota's period in seconds.
        reason: why a request was denied when it is not simply "over the limit".
    """

    allowed: bool
    limit: int
    remaining: int
    reset_after: float
    retry_after: float | None
    policy: str
    period: float = 0.0
    reason: str | None = None


# The one helper for building the NamedTuples made on every request (decisions, states,
# hits): ``new_record(Decision, (allowed, limit, ...))`` takes every field, in field order.
# A NamedTuple's generated ``__new__`` is a Python-level call that costs more than the tuple
# itself (CPython 3.11, callgrind: 3.5k instructions per ``Decision(...)``, 1.4k this way).
new_record = tuple.__new__


def _decision(
    allowed: bool,
    quota: Quota,
    remaining: int,
    reset_ns: int,
    retry_ns: int | None,
    reason: str | None = None,
) -> Decision:
    return new_record(
        Decision,
        (
            allowed,
            quota.limit,
            max(remaining, 0),
            max(reset_ns, 0) / NS,
            None if retry_ns is None else (retry_ns / NS if retry_ns > 0 else 0.0),
            quota.policy,
            quota.period,
            reason,
        ),
    )


def gcra_step(
    state: BucketState | None, now: int, quota: Quota, cost: int
) -> tuple[Decision, BucketState | None]:
    """One GCRA decision (see the module docstring for the exact semantics).

    Computed on how far the TAT runs ahead of ``now`` (``ahead = tat - now``, ``after =
    new_tat - now``): the same integers as the formulas above, but small ones, where TATs
    (about 1.7e18 ns) are multi-digit ints that cost more per operation.
    """
    interval = quota.emission_interval_ns
    tau = quota.tolerance_ns
    ahead = 0 if state is None or state.t <= now else state.t - now
    if cost > quota.capacity:
        remaining = (tau - ahead) // interval
        return _decision(False, quota, remaining, ahead, None, COST_TOO_HIGH), state
    after = ahead + cost * interval
    if after <= tau:  # new_tat - tau <= now: admitted
        new_state = state if cost == 0 else new_record(BucketState, (now + after, 0, 0))
        decision = new_record(
            Decision,
            (
                True,  # allowed
                quota.limit,
                (tau - after) // interval,  # remaining
                after / NS,  # reset_after
                0.0,  # retry_after
                quota.policy,
                quota.period,
                None,  # reason
            ),
        )
        return decision, new_state
    remaining = (tau - ahead) // interval
    return _decision(False, quota, remaining, ahead, after - tau), state


def fixed_window_step(
    state: BucketState | None, now: int, quota: Quota, cost: int
) -> tuple[Decision, BucketState | None]:
    """One fixed-window decision (see the module docstring)."""
    period = quota.period_ns
    start = now - now % period
    count = state.used if state is not None and state.t == start else 0
    reset = start + period - now
    if cost > quota.limit:
        return _decision(False, quota, quota.limit - count, reset, None, COST_TOO_HIGH), state
    if count + cost <= quota.limit:
        new_state = state if cost == 0 else BucketState(start, count + cost)
        used = count + cost
        return _decision(True, quota, quota.limit - used, reset if used else 0, 0), new_state
    return _decision(False, quota, quota.limit - count, reset, reset), state


def _sliding_counts(state: BucketState | None, start: int, period: int) -> tuple[int, int]:
    if state is None:
        return 0, 0
    if state.t == start:
        return state.used, state.prev
    if state.t == start - period:
        return 0, state.used
    return 0, 0


def sliding_window_step(
    state: BucketState | None, now: int, quota: Quota, cost: int
) -> tuple[Decision, BucketState | None]:
    """One sliding-window decision (see the module docstring)."""
    period = quota.period_ns
    limit = quota.limit
    start = now - now % period
    elapsed = now - start
    count, prev = _sliding_counts(state, start, period)
    weighted_prev = prev * (period - elapsed)
    if cost <= limit and weighted_prev + (count + cost) * period <= limit * period:
        used = count + cost
        remaining = (limit * period - weighted_prev - used * period) // period
        if used > 0:
            reset = start + 2 * period - now
        elif prev > 0:
            reset = start + period - now
        else:
            reset = 0
        new_state = state if cost == 0 else BucketState(start, used, prev)
        return _decision(True, quota, remaining, reset, 0), new_state
    remaining = (limit * period - weighted_prev - count * period) // period
    reset = start + (2 if count > 0 else 1) * period - now
    if cost > limit:
        return _decision(False, quota, remaining, reset, None, COST_TOO_HIGH), state
    # Earliest fit in this window: prev * (period - e) <= (limit - count - cost) * period.
    room = limit - count - cost
    if room >= 0 and prev > 0:
        need = period - (room * period) // prev
        if need < period:
            return _decision(False, quota, remaining, reset, start + need - now), state
    # Else in the next window, where prev' = count and count' = 0.
    need = 0 if count == 0 else max(period - ((limit - cost) * period) // count, 0)
    return _decision(False, quota, remaining, reset, start + period + need - now), state


StepFunction = Callable[[BucketState | None, int, Quota, int], tuple[Decision, BucketState | None]]

ALGORITHMS: dict[str, StepFunction] = {
    "gcra": gcra_step,
    "fixed_window": fixed_window_step,
    "sliding_window": sliding_window_step,
}


def validate_algorithm(name: object) -> Algorithm:
    """Return ``name`` if it is a known algorithm, else raise ``ConfigurationError``."""
    if name not in ALGORITHMS:
        known = ", ".join(repr(a) for a in ALGORITHMS)
        raise ConfigurationError(f"unknown algorithm {name!r}; choose one of {known}")
    return name  # type: ignore[return-value]


def step(
    algorithm: str, state: BucketState | None, now: int, quota: Quota, cost: int
) -> tuple[Decision, BucketState | None]:
    """Dispatch one decision to the named reference algorithm."""
    return ALGORITHMS[algorithm](state, now, quota, cost)


def step_all(
    algorithm: str,
    states: Sequence[BucketState | None],
    now: int,
    quotas: Sequence[Quota],
    cost: int,
) -> tuple[list[Decision], list[BucketState | None]]:
    """Decide several quotas for one request, all or nothing.

    If every quota admits the request, all are charged. Otherwise none is: the states come
    back unchanged, denying quotas report their denial, and admitting ones report their
    state as a peek (``allowed=True``, nothing charged).
    """
    fn = ALGORITHMS[algorithm]
    results = [fn(s, now, q, cost) for s, q in zip(states, quotas, strict=True)]
    if all(d.allowed for d, _ in results):
        return [d for d, _ in results], [s for _, s in results]
    decisions = [
        d if not d.allowed else fn(s, now, q, 0)[0]
        for (d, _), s, q in zip(results, states, quotas, strict=True)
    ]
    return decisions, list(states)


def expires_at(algorithm: str, state: BucketState, quota: Quota) -> int:
    """The time (ns) from which ``state`` is equivalent to no state at all."""
    if algorithm == "gcra":
        return state.t
    if algorithm == "fixed_window":
        return state.t + quota.period_ns
    return state.t + 2 * quota.period_ns
