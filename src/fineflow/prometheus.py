"""Prometheus export of fineflow's figures (``pip install 'fineflow[prometheus]'``).

One process (one server worker)::

    import fineflow.prometheus
    fineflow.prometheus.register()            # into prometheus_client's default REGISTRY
    app.mount("/metrics", prometheus_client.make_asgi_app())

``register`` adds a collector that reads every live fineflow object *when Prometheus
scrapes*: a guarded call pays nothing for the export. Several worker processes
(``uvicorn --workers N``) cannot read each other's objects, so each worker copies its figures
into prometheus_client's multiprocess directory every ``interval`` seconds instead:
``start_multiprocess()``; see ``docs/observability.md``.

The collector is a list of family builders (``FAMILIES``), each a function giving a list of
metric families; the rate-limit families will be more builders next to
``breaker_families``.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing.util
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import mark_process_dead
from prometheus_client.registry import REGISTRY, CollectorRegistry

from ._breaker.config import CircuitState
from ._breaker.live import CALL_KINDS, BreakerFigures, figures
from ._logfields import error_text, log_extra

__all__ = [
    "FAMILIES",
    "FamilyBuilder",
    "FineflowCollector",
    "MultiprocessExport",
    "breaker_families",
    "register",
    "start_multiprocess",
]

logger = logging.getLogger("fineflow.prometheus")

#: A function giving metric families read from live objects at the time it is called.
FamilyBuilder = Callable[[], Iterable[Metric]]

_STATE = "fineflow_circuitbreaker_state"
_CALLS = "fineflow_circuitbreaker_calls"  # prometheus_client adds ``_total``
_TRANSITIONS = "fineflow_circuitbreaker_transitions"
_FAILURE_RATE = "fineflow_circuitbreaker_failure_rate"
_SLOW_CALL_RATE = "fineflow_circuitbreaker_slow_call_rate"

_HELP = {
    _STATE: "Circuit breakers of this name in this state (1 for the current state, 0 else).",
    _CALLS: "Calls through circuit breakers by kind: successful, failed, ignored, not_permitted.",
    _TRANSITIONS: "Circuit breaker state changes by from and to state.",
    _FAILURE_RATE: "Failure rate over the breaker's sliding window (where a policy computes it).",
    _SLOW_CALL_RATE: "Slow-call rate over the breaker's sliding window (where computed).",
}


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


#: The builders ``register`` uses by default.
FAMILIES: tuple[FamilyBuilder, ...] = (breaker_families,)


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
    """Export every live fineflow breaker through ``registry``, read at scrape time.

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


class MultiprocessExport:
    """Copies this process's breaker figures into prometheus_client's multiprocess
    directory (``PROMETHEUS_MULTIPROC_DIR``), where any worker's ``MultiProcessCollector``
    sums them over the workers. Made by ``start_multiprocess``.

    Calls and transitions are counters (a dead worker's counts still count); the state
    gauge sums over live workers (``livesum``: how many breakers of a name are in each
    state), the rates take the highest value over live workers (``livemax``).
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._calls = Counter(_CALLS, _HELP[_CALLS], ["name", "kind"], registry=None)
        self._moves = Counter(
            _TRANSITIONS, _HELP[_TRANSITIONS], ["name", "from", "to"], registry=None
        )
        self._state = Gauge(
            _STATE, _HELP[_STATE], ["name", "state"], registry=None, multiprocess_mode="livesum"
        )
        self._rates = {
            name: Gauge(name, _HELP[name], ["name"], registry=None, multiprocess_mode="livemax")
            for name in (_FAILURE_RATE, _SLOW_CALL_RATE)
        }
        # What was last written, to add only the difference to the counters.
        self._written: dict[tuple[str, ...], int] = {}
        self._names: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fineflow-prometheus", daemon=True)

    def flush(self) -> None:
        """Write the figures of this process's live breakers now."""
        with self._lock:
            current = figures()
            for fig in current:
                self._write(fig)
            for gone in self._names - {fig.name for fig in current}:
                for state in CircuitState:
                    self._state.labels(gone, state.value).set(0)
            self._names = {fig.name for fig in current}

    def _write(self, fig: BreakerFigures) -> None:
        for value, count in fig.states.items():
            self._state.labels(fig.name, value).set(count)
        for kind in CALL_KINDS:
            self._add(self._calls, ("calls", fig.name, kind), fig.calls[kind])
        for (old, new), count in fig.transitions.items():
            self._add(self._moves, ("transitions", fig.name, old, new), count)
        rates = ((_FAILURE_RATE, fig.failure_rate), (_SLOW_CALL_RATE, fig.slow_call_rate))
        for name, rate in rates:
            if rate is not None:
                self._rates[name].labels(fig.name).set(rate)

    def _add(self, counter: Counter, key: tuple[str, ...], total: int) -> None:
        last = self._written.get(key, 0)
        # A total below the last one: a breaker of that name was dropped; what it counted
        # was written already, so count on from the new total.
        if total > last:
            counter.labels(*key[1:]).inc(total - last)
        self._written[key] = total

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
    """Copy this process's breaker figures into the multiprocess directory every
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
