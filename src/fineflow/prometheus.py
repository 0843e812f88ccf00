"""Prometheus export of fineflow's figures (``pip install 'fineflow[prometheus]'``).

One process (one server worker)::

    import fineflow.prometheus
    fineflow.prometheus.register()            # into prometheus_client's default REGISTRY
    app.mount("/metrics", prometheus_client.make_asgi_app())

``register`` adds a collector that reads every live fineflow object *when Prometheus
scrapes*: a guarded call or a rate-limit decision pays only its own counter increment.
Several worker processes (``uvicorn --workers N``) cannot read each other's objects, so each
worker copies its figures into prometheus_client's multiprocess directory every ``interval``
seconds instead: ``start_multiprocess()``; see ``docs/observability.md``.

The collector is a list of family builders (``FAMILIES``), each a function giving a list of
metric families: the circuit breakers', the rate-limit decisions', the storages'.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing.util
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

from prometheus_client import Counter, Gauge, values
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.multiprocess import mark_process_dead
from prometheus_client.registry import REGISTRY, CollectorRegistry

from ._breaker.config import CircuitState
from ._breaker.live import CALL_KINDS, BreakerFigures, figures
from ._logfields import error_text, log_extra
from ._ratelimit.live import decision_counts, storage_figures
from ._storage.figures import POOL_FIGURES, HistogramSnapshot, StorageFigures, le_label

__all__ = [
    "FAMILIES",
    "FamilyBuilder",
    "FineflowCollector",
    "MultiprocessExport",
    "breaker_families",
    "ratelimit_families",
    "register",
    "start_multiprocess",
    "storage_families",
]

logger = logging.getLogger("fineflow.prometheus")

#: A function giving metric families read from live objects at the time it is called.
FamilyBuilder = Callable[[], Iterable[Metric]]

_STATE = "fineflow_circuitbreaker_state"
_CALLS = "fineflow_circuitbreaker_calls"  # prometheus_client adds ``_total``
_TRANSITIONS = "fineflow_circuitbreaker_transitions"
_FAILURE_RATE = "fineflow_circuitbreaker_failure_rate"
_SLOW_CALL_RATE = "fineflow_circuitbreaker_slow_call_rate"
_DECISIONS = "fineflow_ratelimit_decisions"
_ERRORS = "fineflow_storage_errors"
_TIMEOUTS = "fineflow_storage_timeouts"
_ROUND_TRIP = "fineflow_storage_round_trip_seconds"
_BATCH_SIZE = "fineflow_storage_batch_size"
_POOL = "fineflow_postgres_pool_"

_HELP = {
    _STATE: "Circuit breakers of this name in this state (1 for the current state, 0 else).",
    _CALLS: "Calls through circuit breakers by kind: successful, failed, ignored, not_permitted.",
    _TRANSITIONS: "Circuit breaker state changes by from and to state.",
    _FAILURE_RATE: "Failure rate over the breaker's sliding window (where a policy computes it).",
    _SLOW_CALL_RATE: "Slow-call rate over the breaker's sliding window (where computed).",
    _DECISIONS: "Rate-limit decisions per rule, by tier and outcome: allowed, denied, "
    "failed_open, failed_closed, shadow_denied.",
    _ERRORS: "Rate-limit decisions whose storage round trip failed.",
    _TIMEOUTS: "Rate-limit decisions that ran out of their time budget waiting for the storage.",
    _ROUND_TRIP: "Seconds per storage round trip (one statement or pipeline, one batch).",
    _BATCH_SIZE: "Rate-limit decisions per storage round trip (coalesced batch size).",
    **{_POOL + f.name: f"psycopg_pool {f.stat}: {f.help}" for f in POOL_FIGURES},
}
_DECISION_LABELS = ["rule", "tier", "outcome"]


def breaker_families() -> list[Metric]:
    """The circuit-breaker families, read from every live ``CircuitBreaker`` now."""
    state = GaugeMetricFamily(_STATE, _HELP[_STATE], labels=["name", "state"])
    calls = CounterMetricFamily(_CALLS, _HELP[_CALLS], labels=["name", "kind"])
    moves = CounterMetricFamily(_TRANSITIONS, _HELP[_TRANSITIONS], labels=["name", "from", "to"])
    failure_rate = GaugeMetricFamily(_FAILURE_RATE, _HELP[_FAILURE_RATE], labels=["name"])
    slow_rate = GaugeMetricFamily(_SLOW_CALL_RATE, _HELP[_SLOW_CALL_RATE], labels=["name"])
    for fig in figures():
        for value, count in fig.states.items():
            state.add_metric([fig.name, value], count)
        for kind, count in fig.calls.items():
            calls.add_metric([fig.name, kind], count)
        for (old, new), count in sorted(fig.transitions.items()):
            moves.add_metric([fig.name, old, new], count)
        if fig.failure_rate is not None:
            failure_rate.add_metric([fig.name], fig.failure_rate)
        if fig.slow_call_rate is not None:
            slow_rate.add_metric([fig.name], fig.slow_call_rate)
    return [state, calls, moves, failure_rate, slow_rate]


def ratelimit_families() -> list[Metric]:
    """``fineflow_ratelimit_decisions_total``, summed over every live rate-limit front end
    (middleware, FastAPI dependency, ``@ff.limit``) now."""
    decisions = CounterMetricFamily(_DECISIONS, _HELP[_DECISIONS], labels=_DECISION_LABELS)
    for (rule, tier, outcome), count in decision_counts().items():
        decisions.add_metric([rule, tier, outcome], count)
    return [decisions]


def _histogram(family: HistogramMetricFamily, labels: list[str], h: HistogramSnapshot) -> None:
    buckets = [(le_label(bound), n) for bound, n in h.cumulative()]
    family.add_metric(labels, buckets, h.total)


def storage_families() -> list[Metric]:
    """The storages' errors, timeouts, round-trip times and batch sizes, and the PostgreSQL
    pools' figures, read from the storages of every live rate-limit front end now."""
    errors = CounterMetricFamily(_ERRORS, _HELP[_ERRORS], labels=["storage"])
    timeouts = CounterMetricFamily(_TIMEOUTS, _HELP[_TIMEOUTS], labels=["storage"])
    trips = HistogramMetricFamily(_ROUND_TRIP, _HELP[_ROUND_TRIP], labels=["storage"])
    sizes = HistogramMetricFamily(_BATCH_SIZE, _HELP[_BATCH_SIZE], labels=["storage"])
    pool: list[CounterMetricFamily | GaugeMetricFamily] = []
    for f in POOL_FIGURES:
        kind = CounterMetricFamily if f.counter else GaugeMetricFamily
        pool.append(kind(_POOL + f.name, _HELP[_POOL + f.name], labels=["pool"]))
    for fig in storage_figures():
        label = [fig.storage]
        errors.add_metric(label, fig.batches.errors)
        timeouts.add_metric(label, fig.batches.timeouts)
        _histogram(trips, label, fig.batches.round_trip)
        _histogram(sizes, label, fig.batches.batch_size)
        if fig.pool:
            for f, family in zip(POOL_FIGURES, pool, strict=True):
                family.add_metric([fig.pool_name], fig.pool.get(f.stat, 0) * f.scale)
    return [errors, timeouts, trips, sizes, *pool]


#: The builders ``register`` uses by default.
FAMILIES: tuple[FamilyBuilder, ...] = (breaker_families, ratelimit_families, storage_families)


class FineflowCollector:
    """A prometheus_client collector of fineflow's figures, read at scrape time.

    Args:
        families: the builders to call on each scrape (default ``FAMILIES``).
    """

    def __init__(self, families: Sequence[FamilyBuilder] = FAMILIES) -> None:
        self.families = tuple(families)

    def collect(self) -> Iterator[Metric]:
        """Every family of every builder, read now."""
        for build in self.families:
            yield from build()

    def describe(self) -> list[Metric]:
        """The families (read once, at registration, for their names)."""
        return list(self.collect())


def register(registry: CollectorRegistry | None = None) -> FineflowCollector:
    """Export every live fineflow breaker, rate-limit front end and storage through
    ``registry``, read at scrape time.

    Args:
        registry: where to register (default: prometheus_client's ``REGISTRY``).

    Returns:
        The collector (``registry.unregister(collector)`` removes it).

    Raises:
        ValueError: the registry already holds these metric names (registered twice).
    """
    collector = FineflowCollector()
    (REGISTRY if registry is None else registry).register(collector)
    return collector


_Mode = Literal["livesum", "livemax"]


class _MultiprocessHistogram:
    """A histogram in prometheus_client's multiprocess files, written bucket by bucket.

    prometheus_client's ``Histogram`` observes one value at a time; a flush brings many
    observations at once. So each bucket and the sum is a ``values.ValueClass``, what
    ``Histogram`` itself writes through, incremented by what is new; ``MultiProcessCollector``
    adds the buckets up over the workers and makes them cumulative.
    """

    def __init__(self, name: str, labelnames: tuple[str, ...]) -> None:
        self._name = name
        self._labelnames = labelnames
        self._values: dict[tuple[str, ...], values.ValueClass] = {}

    def _value(self, sample: str, labelnames: tuple[str, ...], labels: tuple[str, ...]) -> Any:
        key = (sample, *labels)
        value = self._values.get(key)
        if value is None:
            value = self._values[key] = values.ValueClass(
                "histogram", self._name, sample, labelnames, labels, _HELP[self._name]
            )
        return value

    def inc_bucket(self, labels: tuple[str, ...], bound: float, amount: float) -> None:
        """Add ``amount`` observations to the bucket of upper bound ``bound``."""
        le = (*labels, le_label(bound))
        self._value(self._name + "_bucket", (*self._labelnames, "le"), le).inc(amount)

    def inc_sum(self, labels: tuple[str, ...], amount: float) -> None:
        """Add ``amount`` to the sum of the observed values."""
        self._value(self._name + "_sum", self._labelnames, labels).inc(amount)


class MultiprocessExport:
    """Copies this process's figures into prometheus_client's multiprocess directory
    (``PROMETHEUS_MULTIPROC_DIR``), where any worker's ``MultiProcessCollector`` sums them
    over the workers. Made by ``start_multiprocess``.

    Counters and histograms (breaker calls and transitions, rate-limit decisions, storage
    errors, timeouts, round trips and batch sizes, pool counts) count on after an object is
    dropped (a dead worker's counts still count); the breaker state gauge and the pool's
    levels sum over live workers (``livesum``), the breaker rates take the highest value over
    live workers (``livemax``).
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        counters = (
            (_CALLS, ("name", "kind")),
            (_TRANSITIONS, ("name", "from", "to")),
            (_DECISIONS, tuple(_DECISION_LABELS)),
            (_ERRORS, ("storage",)),
            (_TIMEOUTS, ("storage",)),
            *((_POOL + f.name, ("pool",)) for f in POOL_FIGURES if f.counter),
        )
        self._counters = {
            name: Counter(name, _HELP[name], labels, registry=None) for name, labels in counters
        }
        gauges: tuple[tuple[str, tuple[str, ...], _Mode], ...] = (
            (_STATE, ("name", "state"), "livesum"),
            (_FAILURE_RATE, ("name",), "livemax"),
            (_SLOW_CALL_RATE, ("name",), "livemax"),
            *((_POOL + f.name, ("pool",), "livesum") for f in POOL_FIGURES if not f.counter),
        )
        self._gauges = {
            name: Gauge(name, _HELP[name], labels, registry=None, multiprocess_mode=mode)
            for name, labels, mode in gauges
        }
        self._histograms = {
            name: _MultiprocessHistogram(name, ("storage",)) for name in (_ROUND_TRIP, _BATCH_SIZE)
        }
        # What was last written, to add only the difference to the counters.
        self._written: dict[tuple[str, ...], float] = {}
        self._names: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fineflow-prometheus", daemon=True)

    def flush(self) -> None:
        """Write the figures of this process's live breakers, rate-limit front ends and
        storages now."""
        with self._lock:
            current = figures()
            for fig in current:
                self._write(fig)
            for gone in self._names - {fig.name for fig in current}:
                for state in CircuitState:
                    self._gauges[_STATE].labels(gone, state.value).set(0)
            self._names = {fig.name for fig in current}
            for labels, count in decision_counts().items():
                self._add(_DECISIONS, labels, count)
            for storage in storage_figures():
                self._write_storage(storage)

    def _write(self, fig: BreakerFigures) -> None:
        for value, count in fig.states.items():
            self._gauges[_STATE].labels(fig.name, value).set(count)
        for kind in CALL_KINDS:
            self._add(_CALLS, (fig.name, kind), fig.calls[kind])
        for (old, new), count in fig.transitions.items():
            self._add(_TRANSITIONS, (fig.name, old, new), count)
        rates = ((_FAILURE_RATE, fig.failure_rate), (_SLOW_CALL_RATE, fig.slow_call_rate))
        for name, rate in rates:
            if rate is not None:
                self._gauges[name].labels(fig.name).set(rate)

    def _write_storage(self, fig: StorageFigures) -> None:
        label = (fig.storage,)
        self._add(_ERRORS, label, fig.batches.errors)
        self._add(_TIMEOUTS, label, fig.batches.timeouts)
        for name, h in (
            (_ROUND_TRIP, fig.batches.round_trip),
            (_BATCH_SIZE, fig.batches.batch_size),
        ):
            histogram = self._histograms[name]
            for bound, n in zip((*h.bounds, float("inf")), h.counts, strict=True):
                new = self._new((name, fig.storage, str(bound)), n)
                if new:
                    histogram.inc_bucket(label, bound, new)
            new_sum = self._new((name, fig.storage, "sum"), h.total)
            if new_sum:
                histogram.inc_sum(label, new_sum)
        if not fig.pool:
            return
        for f in POOL_FIGURES:
            value = fig.pool.get(f.stat, 0) * f.scale
            if f.counter:
                self._add(_POOL + f.name, (fig.pool_name,), value)
            else:
                self._gauges[_POOL + f.name].labels(fig.pool_name).set(value)

    def _add(self, name: str, labels: tuple[str, ...], total: float) -> None:
        new = self._new((name, *labels), total)
        if new:
            self._counters[name].labels(*labels).inc(new)

    def _new(self, key: tuple[str, ...], total: float) -> float:
        """What ``total`` adds to the last one written under ``key`` (0 for nothing)."""
        last = self._written.get(key, 0)
        self._written[key] = total
        # A total below the last one: an object of those labels was dropped; what it
        # counted was written already, so count on from the new total.
        return total - last if total > last else 0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.flush()
            except Exception as exc:  # keep flushing: the next round may succeed
                logger.exception(
                    "fineflow.prometheus: writing the multiprocess figures failed",
                    extra=log_extra("prometheus_flush_failed", error=error_text(exc)),
                )

    def start(self) -> None:
        """Start the background flushes (a daemon thread)."""
        self._thread.start()

    def stop(self) -> None:
        """Flush one last time, stop the thread and drop this process's live gauges
        (once; later calls do nothing)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.flush()
        mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


def start_multiprocess(interval: float = 1.0) -> MultiprocessExport:
    """Copy this process's figures into the multiprocess directory every
    ``interval`` seconds, until the process exits (call it once in every worker, e.g. at
    the app's import or startup; ``PROMETHEUS_MULTIPROC_DIR`` must be set before
    prometheus_client is first imported).

    Serve ``/metrics`` from a registry with ``prometheus_client.multiprocess
    .MultiProcessCollector``; a scrape then sees every worker's figures as they were at
    its last flush (at most ``interval`` seconds old).

    Raises:
        RuntimeError: ``PROMETHEUS_MULTIPROC_DIR`` is not set.
    """
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        raise RuntimeError(
            "start_multiprocess() needs PROMETHEUS_MULTIPROC_DIR: set it to an empty "
            "directory before the workers start (and before prometheus_client is imported)"
        )
    export = MultiprocessExport(interval)
    export.start()
    # A worker started by multiprocessing (uvicorn's) ends without running ``atexit``
    # handlers but with multiprocessing's finalizers; a plain process the other way round.
    atexit.register(export.stop)
    multiprocessing.util.Finalize(None, export.stop, exitpriority=10)
    return export
