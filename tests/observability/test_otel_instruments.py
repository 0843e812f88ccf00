"""``fineflow.opentelemetry.instrument``: the breaker figures as observable instruments, read
through the SDK's in-memory reader, equal to what ``fineflow.prometheus`` exports."""

from __future__ import annotations

import uuid

import httpx
import pytest
from obs_metrics_app import create_app
from obs_scrape import run_burst, samples
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry

import fineflow.opentelemetry
import fineflow.prometheus

pytestmark = pytest.mark.anyio

#: OTel instrument -> Prometheus sample name.
PROMETHEUS_NAME = {
    "fineflow.circuitbreaker.state": "fineflow_circuitbreaker_state",
    "fineflow.circuitbreaker.calls": "fineflow_circuitbreaker_calls_total",
    "fineflow.circuitbreaker.transitions": "fineflow_circuitbreaker_transitions_total",
    "fineflow.circuitbreaker.failure_rate": "fineflow_circuitbreaker_failure_rate",
    "fineflow.circuitbreaker.slow_call_rate": "fineflow_circuitbreaker_slow_call_rate",
}


def otel_points(reader: InMemoryMetricReader, breaker: str) -> dict[object, float]:
    """The data points of ``breaker``, keyed like ``obs_scrape.samples``."""
    found: dict[object, float] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            assert scope.scope.name == "fineflow"
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    attrs = dict(point.attributes or {})
                    if attrs.pop("name", None) != breaker:
                        continue
                    labels = tuple(sorted((k, str(v)) for k, v in attrs.items()))
                    found[PROMETHEUS_NAME[metric.name], labels] = point.value  # type: ignore[union-attr]
    return found


async def test_the_otel_figures_equal_the_prometheus_ones_for_one_burst() -> None:
    name = f"otel-{uuid.uuid4().hex[:8]}"
    registry = CollectorRegistry()
    app = create_app(name, registry)
    fineflow.prometheus.register(registry)
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    meter = fineflow.opentelemetry.instrument(provider)
    assert meter is not None
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:

        async def get(path: str) -> int:
            return (await client.get(path)).status_code

        seen = await run_burst(get)
        prometheus = samples((await client.get("/metrics")).text, name)
    otel = otel_points(reader, name)
    provider.shutdown()
    assert otel == prometheus
    assert otel["fineflow_circuitbreaker_calls_total", (("kind", "failed"),)] == seen["failed"]
    assert otel["fineflow_circuitbreaker_state", (("state", "open"),)] == 1


async def test_rates_are_observed_where_computed() -> None:
    name = f"otel-rate-{uuid.uuid4().hex[:8]}"
    breaker = fineflow.CircuitBreaker(name, failure_rate_threshold=0.9, minimum_calls=5)
    await breaker.call(lambda: 1)
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    fineflow.opentelemetry.instrument(provider)
    points = otel_points(reader, name)
    provider.shutdown()
    assert points["fineflow_circuitbreaker_failure_rate", ()] == 0.0
    assert ("fineflow_circuitbreaker_slow_call_rate", ()) not in points
