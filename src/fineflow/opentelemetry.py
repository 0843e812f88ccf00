"""OpenTelemetry metrics of fineflow's figures (``pip install 'fineflow[opentelemetry]'``).

Only ``opentelemetry-api`` is needed at run time; the application brings the SDK and its
exporter (OTLP, Prometheus, ...)::

    import fineflow.opentelemetry
    fineflow.opentelemetry.instrument()      # the global MeterProvider

Every instrument is *observable*: the SDK calls back when it collects, and the callback reads
every live fineflow object then; a guarded call or a rate-limit decision pays only its own
counter increment. The figures are the ones ``fineflow.prometheus`` exports (the same
``fineflow._breaker.live.figures()``, ``fineflow._ratelimit.live.decision_counts()`` and
``storage_figures()``), under OTel names:

- ``fineflow.circuitbreaker.state``: observable gauge; attributes ``name``, ``state``.
- ``fineflow.circuitbreaker.calls``: observable counter; ``name``, ``kind``.
- ``fineflow.circuitbreaker.transitions``: observable counter; ``name``, ``from``, ``to``.
- ``fineflow.circuitbreaker.failure_rate``: observable gauge; ``name``.
- ``fineflow.circuitbreaker.slow_call_rate``: observable gauge; ``name``.
- ``fineflow.ratelimit.decisions``: observable counter; ``rule``, ``tier``, ``outcome``.
- ``fineflow.storage.errors``, ``fineflow.storage.timeouts``: observable counters; ``storage``.
- ``fineflow.storage.round_trip.duration`` (seconds) and ``fineflow.storage.batch.size``
  (requests per round trip): histograms. The OTel API has no observable histogram, so each is
  three observable counters, as Prometheus's text has them: ``<name>.count``, ``<name>.sum``
  and ``<name>.bucket`` (cumulative, attribute ``le``, ``"+Inf"`` last); ``storage``.
- ``fineflow.postgres.pool.<figure>``: psycopg_pool's ``get_stats()``, levels as observable
  gauges, counts as observable counters (milliseconds as seconds, ``..._time``); ``pool``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation, get_meter

from ._breaker.live import BreakerFigures, figures
from ._ratelimit.live import decision_counts, storage_figures
from ._storage.figures import (
    POOL_FIGURES,
    HistogramSnapshot,
    PoolFigure,
    StorageFigures,
    le_label,
)

__all__ = ["METER_NAME", "instrument"]

#: The instrumentation scope of fineflow's instruments.
METER_NAME = "fineflow"

Reader = Callable[[BreakerFigures], Iterable[Observation]]


def _states(fig: BreakerFigures) -> Iterable[Observation]:
    for state, count in fig.states.items():
        yield Observation(count, {"name": fig.name, "state": state})


def _calls(fig: BreakerFigures) -> Iterable[Observation]:
    for kind, count in fig.calls.items():
        yield Observation(count, {"name": fig.name, "kind": kind})


def _transitions(fig: BreakerFigures) -> Iterable[Observation]:
    for (old, new), count in sorted(fig.transitions.items()):
        yield Observation(count, {"name": fig.name, "from": old, "to": new})


def _failure_rate(fig: BreakerFigures) -> Iterable[Observation]:
    if fig.failure_rate is not None:
        yield Observation(fig.failure_rate, {"name": fig.name})


def _slow_call_rate(fig: BreakerFigures) -> Iterable[Observation]:
    if fig.slow_call_rate is not None:
        yield Observation(fig.slow_call_rate, {"name": fig.name})


def _callback(read: Reader) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def observe(options: CallbackOptions) -> Iterable[Observation]:
        return [obs for fig in figures() for obs in read(fig)]

    return observe


def _decisions(options: CallbackOptions) -> Iterable[Observation]:
    return [
        Observation(count, {"rule": rule, "tier": tier, "outcome": outcome})
        for (rule, tier, outcome), count in decision_counts().items()
    ]


StorageReader = Callable[[StorageFigures], Iterable[Observation]]


def _storage_callback(read: StorageReader) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def observe(options: CallbackOptions) -> Iterable[Observation]:
        return [obs for fig in storage_figures() for obs in read(fig)]

    return observe


def _histogram_readers(
    histogram: Callable[[StorageFigures], HistogramSnapshot],
) -> dict[str, StorageReader]:
    """The ``count``, ``sum`` and ``bucket`` readers of one histogram of the storages."""

    def count(fig: StorageFigures) -> Iterable[Observation]:
        yield Observation(histogram(fig).count, {"storage": fig.storage})

    def total(fig: StorageFigures) -> Iterable[Observation]:
        yield Observation(histogram(fig).total, {"storage": fig.storage})

    def buckets(fig: StorageFigures) -> Iterable[Observation]:
        for bound, n in histogram(fig).cumulative():
            yield Observation(n, {"storage": fig.storage, "le": le_label(bound)})

    return {"count": count, "sum": total, "bucket": buckets}


def _pool_reader(figure: PoolFigure) -> StorageReader:
    def read(fig: StorageFigures) -> Iterable[Observation]:
        if fig.pool:
            yield Observation(fig.pool.get(figure.stat, 0) * figure.scale, {"pool": fig.pool_name})

    return read


def _instrument_storages(meter: Meter) -> None:
    meter.create_observable_counter(
        "fineflow.storage.errors",
        callbacks=[_storage_callback(lambda f: [_by_storage(f, f.batches.errors)])],
        unit="{request}",
        description="Rate-limit decisions whose storage round trip failed.",
    )
    meter.create_observable_counter(
        "fineflow.storage.timeouts",
        callbacks=[_storage_callback(lambda f: [_by_storage(f, f.batches.timeouts)])],
        unit="{request}",
        description="Rate-limit decisions out of their time budget waiting for the storage.",
    )
    histograms = (
        ("fineflow.storage.round_trip.duration", "s", lambda f: f.batches.round_trip),
        ("fineflow.storage.batch.size", "{request}", lambda f: f.batches.batch_size),
    )
    for name, unit, histogram in histograms:
        for part, read in _histogram_readers(histogram).items():
            meter.create_observable_counter(
                f"{name}.{part}",
                callbacks=[_storage_callback(read)],
                unit="{round_trip}" if part != "sum" else unit,
                description=f"The histogram {name}: its {part} (see fineflow.opentelemetry).",
            )
    for figure in POOL_FIGURES:
        create = (
            meter.create_observable_counter if figure.counter else meter.create_observable_gauge
        )
        create(
            "fineflow.postgres.pool." + figure.name.replace("_seconds", "_time"),
            callbacks=[_storage_callback(_pool_reader(figure))],
            unit=figure.unit,
            description=f"psycopg_pool {figure.stat}: {figure.help}",
        )


def _by_storage(fig: StorageFigures, value: int) -> Observation:
    return Observation(value, {"storage": fig.storage})


def instrument(meter_provider: MeterProvider | None = None) -> Meter:
    """Create fineflow's observable instruments on ``meter_provider``.

    Args:
        meter_provider: where (default: the global one, ``opentelemetry.metrics
            .get_meter_provider()``). Call once per provider.

    Returns:
        The ``fineflow`` meter the instruments belong to.
    """
    meter = get_meter(METER_NAME, meter_provider=meter_provider)
    meter.create_observable_gauge(
        "fineflow.circuitbreaker.state",
        callbacks=[_callback(_states)],
        unit="{breaker}",
        description="Circuit breakers of this name in this state (1 current, 0 else).",
    )
    meter.create_observable_counter(
        "fineflow.circuitbreaker.calls",
        callbacks=[_callback(_calls)],
        unit="{call}",
        description="Calls by kind: successful, failed, ignored, not_permitted.",
    )
    meter.create_observable_counter(
        "fineflow.circuitbreaker.transitions",
        callbacks=[_callback(_transitions)],
        unit="{transition}",
        description="State changes by from and to state.",
    )
    meter.create_observable_gauge(
        "fineflow.circuitbreaker.failure_rate",
        callbacks=[_callback(_failure_rate)],
        unit="1",
        description="Failure rate over the sliding window (where a policy computes it).",
    )
    meter.create_observable_gauge(
        "fineflow.circuitbreaker.slow_call_rate",
        callbacks=[_callback(_slow_call_rate)],
        unit="1",
        description="Slow-call rate over the sliding window (where a policy computes it).",
    )
    meter.create_observable_counter(
        "fineflow.ratelimit.decisions",
        callbacks=[_decisions],
        unit="{decision}",
        description="Rate-limit decisions per rule, by tier and outcome: allowed, denied, "
        "failed_open, failed_closed, shadow_denied.",
    )
    _instrument_storages(meter)
    return meter
