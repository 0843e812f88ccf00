"""``fineflow.opentelemetry.instrument``: the rate-limit decisions and the storage figures
(a ``PostgresStorage``, its round trips and pool) read through the SDK's in-memory reader
equal what ``fineflow.prometheus`` exports for the same burst, and what the client saw."""

from __future__ import annotations

from collections import Counter

import httpx
import pytest
from obs_ratelimit_app import create_app
from obs_ratelimit_burst import BURST, decisions, run_burst
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import fineflow as ff
import fineflow.opentelemetry
import fineflow.prometheus

pytestmark = pytest.mark.anyio

#: The families compared, by the start of their Prometheus names.
PREFIXES = ("fineflow_ratelimit_", "fineflow_storage_", "fineflow_postgres_pool_")
#: OTel histogram parts -> Prometheus sample suffix.
PARTS = {".count": "_count", ".sum": "_sum", ".bucket": "_bucket"}
HISTOGRAMS = {
    "fineflow.storage.round_trip.duration": "fineflow_storage_round_trip_seconds",
    "fineflow.storage.batch.size": "fineflow_storage_batch_size",
}

Point = tuple[str, tuple[tuple[str, str], ...]]


def prometheus_name(otel: str, counter: bool) -> str:
    """The Prometheus sample name of an OTel instrument of fineflow's."""
    for prefix, name in HISTOGRAMS.items():
        for part, suffix in PARTS.items():
            if otel == prefix + part:
                return name + suffix
    name = otel.replace(".", "_")
    if name.endswith("_time"):  # a pool's milliseconds, exported as seconds
        name = name.removesuffix("_time") + "_seconds"
    return name + "_total" if counter else name


def otel_points(reader: InMemoryMetricReader) -> dict[Point, float]:
    found: dict[Point, float] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                counter = hasattr(metric.data, "is_monotonic")  # a Sum, not a Gauge
                name = prometheus_name(metric.name, counter)
                if not name.startswith(PREFIXES):
                    continue
                for point in metric.data.data_points:
                    labels = tuple(sorted((k, str(v)) for k, v in (point.attributes or {}).items()))
                    found[name, labels] = point.value  # type: ignore[union-attr]
    return found


def prometheus_points(text: str) -> dict[Point, float]:
    found: dict[Point, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith(PREFIXES):
                found[s.name, tuple(sorted(s.labels.items()))] = s.value
    return found


async def test_otel_equals_prometheus_for_one_burst(pg_dsn: str, pg_schema: str) -> None:
    registry = CollectorRegistry()
    fineflow.prometheus.register(registry)
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    fineflow.opentelemetry.instrument(provider)
    before = decisions(generate_latest(registry).decode())
    storage = ff.PostgresStorage(pg_dsn, schema=pg_schema)
    app = create_app(registry, storage)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:

        async def get(path: str, tier: str) -> tuple[int, bytes]:
            response = await client.get(path, headers={"x-tier": tier})
            return response.status_code, response.content

        seen = await run_burst(get)
        text = (await client.get("/metrics")).text
        otel = otel_points(reader)
    await storage.close()
    provider.shutdown()
    prometheus = prometheus_points(text)
    assert otel == prometheus
    assert decisions(text) - before == seen
    assert sum(seen.values()) >= len(BURST)
    outcomes: Counter[str] = Counter()
    for (_, _, outcome), n in seen.items():
        outcomes[outcome] += n
    assert set(outcomes) == {"allowed", "denied", "shadow_denied"}
    assert otel["fineflow_storage_batch_size_count", (("storage", "postgres"),)] >= len(BURST)
    assert ("fineflow_postgres_pool_size", (("pool", f"fineflow-{pg_schema}"),)) in otel
