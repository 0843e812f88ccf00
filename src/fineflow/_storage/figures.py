"""What a networked storage reports to the exporters: errors, timeouts, round-trip times and
batch sizes (counted by the coalescing scheduler), and its connection pool's own figures.

Pure: no clock, no I/O. A :class:`Histogram` has fixed buckets, so recording is one bisect
and two additions, and histograms of several storages of one kind add up bucket by bucket.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Protocol, runtime_checkable

__all__ = [
    "BATCH_SIZE_BUCKETS",
    "POOL_FIGURES",
    "ROUND_TRIP_BUCKETS",
    "BatchFigures",
    "Histogram",
    "HistogramSnapshot",
    "MeasuredStorage",
    "PoolFigure",
    "StorageFigures",
    "le_label",
]

#: Upper bounds (seconds) of the round-trip histogram: a lone statement on a local server
#: takes a few hundred microseconds, a batch a few milliseconds, a sick server seconds.
ROUND_TRIP_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
#: Upper bounds of the batch-size histogram (requests per batch; the default ``max_batch``
#: is 512).
BATCH_SIZE_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0)


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    """A histogram at one instant.

    Attributes:
        bounds: the buckets' upper bounds, ascending (``+Inf`` implied after the last).
        counts: observations per bucket (not cumulative), ``len(bounds) + 1`` of them: the
            last counts those above every bound.
        total: the sum of the observed values.
    """

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    total: float

    @property
    def count(self) -> int:
        """How many values were observed."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= it)`` per bucket, ``inf`` last, as Prometheus
        lists them."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out

    def __add__(self, other: HistogramSnapshot) -> HistogramSnapshot:
        if other.bounds != self.bounds:
            raise ValueError("only histograms with the same buckets add up")
        counts = tuple(a + b for a, b in zip(self.counts, other.counts, strict=True))
        return HistogramSnapshot(self.bounds, counts, self.total + other.total)


def le_label(bound: float) -> str:
    """A bucket's ``le`` label, as Prometheus and the OpenTelemetry export write it:
    ``+Inf`` for the last."""
    return "+Inf" if bound == float("inf") else repr(bound)


class Histogram:
    """Observations counted in fixed buckets (Prometheus's ``le``: a value equal to a bound
    falls in that bound's bucket).

    Args:
        bounds: the upper bounds, strictly ascending.

    Raises:
        ValueError: for bounds that are empty or not strictly ascending.
    """

    __slots__ = ("_counts", "_total", "bounds")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        if not bounds or any(a >= b for a, b in pairwise(bounds)):
            raise ValueError(f"histogram bounds must be strictly ascending, got {bounds!r}")
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._total = 0.0

    def observe(self, value: float) -> None:
        """Count ``value`` in its bucket."""
        self._counts[bisect_left(self.bounds, value)] += 1
        self._total += value

    def snapshot(self) -> HistogramSnapshot:
        """The counts now."""
        return HistogramSnapshot(self.bounds, tuple(self._counts), self._total)


@dataclass(frozen=True, slots=True)
class BatchFigures:
    """What a coalescing scheduler counted.

    Attributes:
        errors: requests whose batch failed (the storage raised, or no connection came).
        timeouts: requests whose caller's time budget ran out before the answer.
        round_trip: seconds per batch sent (one statement, one pipeline), answers included.
        batch_size: requests per batch sent.
    """

    errors: int
    timeouts: int
    round_trip: HistogramSnapshot
    batch_size: HistogramSnapshot

    def __add__(self, other: BatchFigures) -> BatchFigures:
        return BatchFigures(
            self.errors + other.errors,
            self.timeouts + other.timeouts,
            self.round_trip + other.round_trip,
            self.batch_size + other.batch_size,
        )


@dataclass(frozen=True, slots=True)
class StorageFigures:
    """What a networked storage reports.

    Attributes:
        storage: its kind, the ``storage`` label: ``"postgres"``, ``"redis"``.
        batches: the scheduler's figures.
        pool: the connection pool's figures by name (psycopg_pool's ``get_stats()``), or
            empty where the storage has no pool of its own to report.
        pool_name: the pool's name, the ``pool`` label (``""`` without a pool).
    """

    storage: str
    batches: BatchFigures
    pool: Mapping[str, int] = field(default_factory=dict)
    pool_name: str = ""

    def __add__(self, other: StorageFigures) -> StorageFigures:
        """Two storages' figures summed (of one kind and pool name: the exporters' labels)."""
        pool = dict(self.pool)
        for name, value in other.pool.items():
            pool[name] = pool.get(name, 0) + value
        return StorageFigures(self.storage, self.batches + other.batches, pool, self.pool_name)


@runtime_checkable
class MeasuredStorage(Protocol):
    """A storage that reports figures (:class:`PostgresStorage`, :class:`RedisStorage`);
    others (``MemoryStorage``, your own) have none to export."""

    def figures(self) -> StorageFigures:
        """The storage's figures now."""
        ...


@dataclass(frozen=True, slots=True)
class PoolFigure:
    """How one of psycopg_pool's ``get_stats()`` figures is exported.

    Attributes:
        stat: its name in ``get_stats()``.
        name: the exported name after ``fineflow_postgres_pool_`` / ``fineflow.postgres.pool.``
            (Prometheus adds ``_total`` to counters).
        counter: a count since the pool opened (else a gauge, a level now).
        unit: the OpenTelemetry unit.
        scale: what the value is multiplied by (milliseconds become seconds).
        help: what it means.
    """

    stat: str
    name: str
    counter: bool
    unit: str
    scale: float
    help: str


#: psycopg_pool's figures (``AsyncConnectionPool.get_stats()``), as the exporters name them.
POOL_FIGURES = (
    PoolFigure("pool_min", "min", False, "{connection}", 1, "Connections kept open at least."),
    PoolFigure("pool_max", "max", False, "{connection}", 1, "Connections the pool may open."),
    PoolFigure("pool_size", "size", False, "{connection}", 1, "Connections open or opening now."),
    PoolFigure("pool_available", "available", False, "{connection}", 1, "Idle connections now."),
    PoolFigure(
        "requests_waiting", "requests_waiting", False, "{request}", 1, "Waiting for a connection."
    ),
    PoolFigure("requests_num", "requests", True, "{request}", 1, "Connections asked of the pool."),
    PoolFigure(
        "requests_queued", "requests_queued", True, "{request}", 1, "Requests that had to wait."
    ),
    PoolFigure(
        "requests_wait_ms", "requests_wait_seconds", True, "s", 0.001, "Time spent waiting."
    ),
    PoolFigure(
        "requests_errors", "requests_errors", True, "{request}", 1, "Requests given no connection."
    ),
    PoolFigure("returns_bad", "returns_bad", True, "{connection}", 1, "Returned in a bad state."),
    PoolFigure("connections_num", "connections", True, "{connection}", 1, "Connection attempts."),
    PoolFigure("connections_ms", "connections_seconds", True, "s", 0.001, "Time spent connecting."),
    PoolFigure(
        "connections_errors", "connections_errors", True, "{connection}", 1, "Failed attempts."
    ),
    PoolFigure(
        "connections_lost", "connections_lost", True, "{connection}", 1, "Found lost by a check."
    ),
    PoolFigure("usage_ms", "usage_seconds", True, "s", 0.001, "Time connections were in use."),
)
