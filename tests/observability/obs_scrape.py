"""Helpers of the observability tests: a scripted burst and the parsed Prometheus text."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable

from prometheus_client.parser import text_string_to_metric_families

#: The burst: paths in order. Successes, then enough failures to open every worker's
#: breaker that sees three of them, then calls the open breakers turn away.
BURST = ["/ok"] * 10 + ["/fail"] * 12 + ["/ok"] * 10

#: What the client saw, as the breaker's call kinds.
KIND_OF_STATUS = {200: "successful", 500: "failed", 503: "not_permitted"}

Sample = tuple[str, tuple[tuple[str, str], ...]]


async def run_burst(get: Callable[[str], Awaitable[int]]) -> Counter[str]:
    """Send ``BURST`` one request after the other; the call kinds the client saw."""
    seen: Counter[str] = Counter()
    for path in BURST:
        seen[KIND_OF_STATUS[await get(path)]] += 1
    return seen


def samples(text: str, breaker: str) -> dict[Sample, float]:
    """The fineflow samples of ``breaker`` in a Prometheus text: ``(sample name, labels)``
    to value, the ``name`` label left out."""
    found: dict[Sample, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if not s.name.startswith("fineflow_") or s.labels.get("name") != breaker:
                continue
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "name"))
            found[s.name, labels] = s.value
    return found


def calls_by_kind(found: dict[Sample, float]) -> Counter[str]:
    """``fineflow_circuitbreaker_calls_total`` by kind (zero kinds left out)."""
    calls: Counter[str] = Counter()
    for (name, labels), value in found.items():
        if name == "fineflow_circuitbreaker_calls_total" and value:
            calls[dict(labels)["kind"]] += int(value)
    return calls


def by_label(found: dict[Sample, float], sample: str, label: str) -> dict[str, float]:
    """One sample name's values by one label."""
    return {dict(labels)[label]: v for (name, labels), v in found.items() if name == sample}
