"""Every live ``CircuitBreaker`` of the process, for exporters that read them at scrape time.

Each breaker adds itself here in ``__init__``; the set holds it weakly, so a breaker that is
dropped (evicted from a registry, its limiter gone) disappears from the exports with it.
Adding costs one ``WeakSet.add`` per breaker made, never anything per call.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .config import CircuitState

if TYPE_CHECKING:
    from .breaker import CircuitBreaker

__all__ = ["CALL_KINDS", "BreakerFigures", "breakers", "figures", "track"]

#: The kinds of ``calls`` (Resilience4j's): settled successes and failures, ignored
#: outcomes, and calls the breaker turned away.
CALL_KINDS = ("successful", "failed", "ignored", "not_permitted")

_LIVE: weakref.WeakSet[CircuitBreaker] = weakref.WeakSet()


def track(breaker: CircuitBreaker) -> None:
    """Remember ``breaker`` for as long as something else keeps it alive."""
    _LIVE.add(breaker)


def breakers() -> list[CircuitBreaker]:
    """The breakers alive now, made directly, by a ``BreakerRegistry``, by
    ``get_circuit_breaker`` or inside a ``RateLimiter`` (its ``"fineflow-storage"`` one),
    sorted by name."""
    for _ in range(3):
        try:
            found = list(_LIVE)
        except RuntimeError:  # another thread made or dropped a breaker meanwhile
            continue
        return sorted(found, key=lambda b: b.name)
    return []


@dataclass
class BreakerFigures:
    """What the exporters report for one breaker name, summed over the live breakers of
    that name (a name is usually one breaker; every ``RateLimiter`` has its own
    ``"fineflow-storage"`` one).

    Attributes:
        name: the breakers' name.
        states: how many of them are in each state (every ``CircuitState``, 0 included).
        calls: their calls by kind (``CALL_KINDS``).
        transitions: their state changes by ``(from, to)`` value.
        failure_rate: the highest failure rate among those with a failure-rate policy
            (``None``: none has one, or none has seen a call in its window yet).
        slow_call_rate: the highest slow-call rate among those with a slow-call policy.
    """

    name: str
    states: dict[str, int] = field(default_factory=lambda: {s.value: 0 for s in CircuitState})
    calls: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CALL_KINDS, 0))
    transitions: dict[tuple[str, str], int] = field(default_factory=dict)
    failure_rate: float | None = None
    slow_call_rate: float | None = None


def _worst(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def figures() -> list[BreakerFigures]:
    """The figures of every live breaker, one entry per name, sorted by name: read from
    ``metrics()`` and ``transitions()`` now (nothing is kept between two reads)."""
    by_name: dict[str, BreakerFigures] = {}
    for breaker in breakers():
        m = breaker.metrics()
        fig = by_name.get(m.name)
        if fig is None:
            fig = by_name[m.name] = BreakerFigures(m.name)
        fig.states[m.state.value] += 1
        calls = fig.calls
        calls["successful"] += m.total_successes
        calls["failed"] += m.total_failures
        calls["ignored"] += m.total_ignored
        calls["not_permitted"] += m.total_rejections
        for (old, new), count in breaker.transitions().items():
            key = (old.value, new.value)
            fig.transitions[key] = fig.transitions.get(key, 0) + count
        # A rate is reported only by the policy that uses it (the window computes both).
        config = breaker.config
        if config.failure_rate_threshold is not None:
            fig.failure_rate = _worst(fig.failure_rate, m.failure_rate)
        if config.slow_call_duration is not None:
            fig.slow_call_rate = _worst(fig.slow_call_rate, m.slow_call_rate)
    return list(by_name.values())
