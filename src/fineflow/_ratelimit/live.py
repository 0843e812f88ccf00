"""Every live rate-limit :class:`~.gate.Gate` of the process (the decision unit of each
middleware, FastAPI dependency and ``@ff.limit``), for exporters that read them at scrape
time.

Each gate adds itself here when it is made; the set holds it weakly, so a gate that is
dropped disappears from the exports with it. Storages are reached through the gates'
limiters (``Gate.limiter``, ``RateLimiter.storage``), each once.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from .._storage.base import Storage
from .._storage.figures import MeasuredStorage, StorageFigures
from .counters import DecisionKey

if TYPE_CHECKING:
    from .gate import Gate

__all__ = ["decision_counts", "gates", "storage_figures", "storages", "track"]

_LIVE: weakref.WeakSet[Gate] = weakref.WeakSet()


def track(gate: Gate) -> None:
    """Remember ``gate`` for as long as something else keeps it alive."""
    _LIVE.add(gate)


def gates() -> list[Gate]:
    """The gates alive now."""
    for _ in range(3):
        try:
            return list(_LIVE)
        except RuntimeError:  # another thread made or dropped a gate meanwhile
            continue
    return []


def decision_counts() -> dict[DecisionKey, int]:
    """Decisions by ``(rule, tier, outcome)``, summed over the live gates (a count shared
    by two gates, one replacing the other, once)."""
    total: dict[DecisionKey, int] = {}
    counted: set[int] = set()
    for gate in gates():
        if id(gate.counts) in counted:
            continue
        counted.add(id(gate.counts))
        for key, n in gate.decision_counts().items():
            total[key] = total.get(key, 0) + n
    return dict(sorted(total.items()))


def storages() -> list[Storage]:
    """The storages of the live gates' limiters, each once."""
    found: dict[int, Storage] = {}
    for gate in gates():
        storage = gate.limiter.storage
        found.setdefault(id(storage), storage)
    return list(found.values())


def storage_figures() -> list[StorageFigures]:
    """The figures of those storages that report some, summed by ``(storage, pool_name)``."""
    by_kind: dict[tuple[str, str], StorageFigures] = {}
    for storage in storages():
        if not isinstance(storage, MeasuredStorage):
            continue  # MemoryStorage, a storage of your own: nothing to report
        fig = storage.figures()
        key = (fig.storage, fig.pool_name)
        seen = by_kind.get(key)
        by_kind[key] = fig if seen is None else seen + fig
    return [by_kind[key] for key in sorted(by_kind)]
