"""OpenTelemetry metrics of fineflow's figures (``pip install 'fineflow[opentelemetry]'``).

Only ``opentelemetry-api`` is needed at run time; the application brings the SDK and its
exporter (OTLP, Prometheus, ...)::

    import fineflow.opentelemetry
    fineflow.opentelemetry.instrument()      # the global MeterProvider

Every instrument is *observable*: the SDK calls back when it collects, and the callback reads
every live fineflow breaker then; a guarded call pays nothing. The figures are the ones
``fineflow.prometheus`` exports (the same ``fineflow._breaker.live.figures()``), under OTel
names:

- ``fineflow.circuitbreaker.state``: observable gauge; attributes ``name``, ``state``.
- ``fineflow.circuitbreaker.calls``: observable counter; ``name``, ``kind``.
- ``fineflow.circuitbreaker.transitions``: observable counter; ``name``, ``from``, ``to``.
- ``fineflow.circuitbreaker.failure_rate``: observable gauge; ``name``.
- ``fineflow.circuitbreaker.slow_call_rate``: observable gauge; ``name``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation, get_meter

from ._breaker.live import BreakerFigures, figures

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
    return meter
