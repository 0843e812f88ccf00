"""``fineflow.prometheus.register``: every live breaker, read at scrape time, parsed back with
prometheus_client's own parser."""

from __future__ import annotations

import gc
import uuid

import httpx
import pytest
from obs_metrics_app import FAILURES_TO_OPEN, create_app
from obs_scrape import by_label, calls_by_kind, run_burst, samples
from prometheus_client import CollectorRegistry, generate_latest

import fineflow as ff
import fineflow.prometheus
from fineflow.prometheus import FineflowCollector, breaker_families

pytestmark = pytest.mark.anyio

STATE = "fineflow_circuitbreaker_state"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def scrape(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


async def test_a_burst_through_the_middleware_is_scraped_as_the_client_saw_it() -> None:
    name = unique("burst")
    registry = CollectorRegistry()
    app = create_app(name, registry)
    fineflow.prometheus.register(registry)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:

        async def get(path: str) -> int:
            return (await client.get(path)).status_code

        seen = await run_burst(get)
        text = (await client.get("/metrics")).text
    found = samples(text, name)
    assert seen == {"successful": 10, "failed": FAILURES_TO_OPEN, "not_permitted": 19}
    assert calls_by_kind(found) == seen
    assert by_label(found, STATE, "state") == {
        s.value: (s is ff.CircuitState.OPEN) * 1.0 for s in ff.CircuitState
    }
    moves = {
        (dict(labels)["from"], dict(labels)["to"]): v
        for (sample, labels), v in found.items()
        if sample == "fineflow_circuitbreaker_transitions_total"
    }
    assert moves == {("closed", "open"): 1.0}
    assert by_label(found, "fineflow_circuitbreaker_calls_total", "kind")["ignored"] == 0


async def test_breakers_of_every_origin_are_seen_and_dropped_ones_disappear() -> None:
    direct = ff.CircuitBreaker(unique("direct"))
    registry = ff.BreakerRegistry()
    in_registry = registry.get_or_create(unique("registry"))
    by_default = ff.get_circuit_breaker(unique("default"))
    dropped = ff.CircuitBreaker(unique("dropped"))
    dropped_name = dropped.name
    prom = CollectorRegistry()
    fineflow.prometheus.register(prom)
    text = scrape(prom)
    for breaker in (direct, in_registry, by_default, dropped):
        assert samples(text, breaker.name)[STATE, (("state", "closed"),)] == 1.0
    del dropped, breaker  # the loop variable held it too
    gc.collect()
    assert samples(scrape(prom), dropped_name) == {}
    assert samples(scrape(prom), direct.name)


async def test_breakers_sharing_a_name_are_summed() -> None:
    name = unique("shared")
    one = ff.CircuitBreaker(name, failure_threshold=1)
    two = ff.CircuitBreaker(name, failure_threshold=1)
    await one.call(lambda: 1)
    await two.call(lambda: 2)
    with pytest.raises(ZeroDivisionError):
        await two.call(lambda: 1 / 0)
    prom = CollectorRegistry()
    fineflow.prometheus.register(prom)
    found = samples(scrape(prom), name)
    assert calls_by_kind(found) == {"successful": 2, "failed": 1}
    assert by_label(found, STATE, "state")["closed"] == 1.0
    assert by_label(found, STATE, "state")["open"] == 1.0


async def test_rates_only_where_a_policy_computes_them() -> None:
    rated = ff.CircuitBreaker(
        unique("rated"), failure_rate_threshold=0.9, minimum_calls=2, slow_call_duration=60.0
    )
    plain = ff.CircuitBreaker(unique("plain"))
    await rated.call(lambda: 1)
    with pytest.raises(ZeroDivisionError):
        await rated.call(lambda: 1 / 0)
    await plain.call(lambda: 1)
    prom = CollectorRegistry()
    fineflow.prometheus.register(prom)
    text = scrape(prom)
    assert samples(text, rated.name)["fineflow_circuitbreaker_failure_rate", ()] == 0.5
    assert samples(text, rated.name)["fineflow_circuitbreaker_slow_call_rate", ()] == 0.0
    assert ("fineflow_circuitbreaker_failure_rate", ()) not in samples(text, plain.name)


def test_registering_twice_in_one_registry_fails() -> None:
    prom = CollectorRegistry()
    collector = fineflow.prometheus.register(prom)
    with pytest.raises(ValueError, match="Duplicated"):
        fineflow.prometheus.register(prom)
    prom.unregister(collector)
    fineflow.prometheus.register(prom)


def test_the_collector_takes_more_family_builders() -> None:
    from prometheus_client.core import CounterMetricFamily

    def more() -> list[CounterMetricFamily]:
        family = CounterMetricFamily("fineflow_extra", "an extra family", labels=["name"])
        family.add_metric(["x"], 7)
        return [family]

    prom = CollectorRegistry()
    prom.register(FineflowCollector([breaker_families, more]))
    assert samples(scrape(prom), "x") == {("fineflow_extra_total", ()): 7.0}


def test_start_multiprocess_needs_the_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    with pytest.raises(RuntimeError, match="PROMETHEUS_MULTIPROC_DIR"):
        fineflow.prometheus.start_multiprocess()


def test_the_grafana_dashboard_queries_only_exported_families() -> None:
    import json
    import re
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "grafana-fineflow.json"
    dashboard = json.loads(path.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", ())]
    used = {name for expr in exprs for name in re.findall(r"fineflow_[a-z_]+", expr)}
    exported = {f.name for build in fineflow.prometheus.FAMILIES for f in build()}
    # prometheus_client's family names drop ``_total``; the samples carry it (and a
    # histogram's its ``_bucket``, ``_sum`` and ``_count``)
    suffixes = ("", "_total", "_bucket", "_sum", "_count")
    assert used <= {name + suffix for name in exported for suffix in suffixes}
    assert "fineflow_circuitbreaker_state" in used
    assert "fineflow_circuitbreaker_calls_total" in used
    assert {
        "fineflow_ratelimit_decisions_total",
        "fineflow_storage_round_trip_seconds_bucket",
        "fineflow_storage_errors_total",
    } <= used
