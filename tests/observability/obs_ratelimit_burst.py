"""A scripted burst through ``obs_ratelimit_app``, what the client saw of it, and the
decision samples of a Prometheus text."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Awaitable, Callable

from prometheus_client.parser import text_string_to_metric_families

#: ``(path, tier)`` in order: the shadow rule first (the global one still admits), then
#: enough of each tier to pass its quota, then past the global quota.
BURST = (
    [("/shadow", "pro")] * 4
    + [("/tiered", "free")] * 5
    + [("/tiered", "pro")] * 7
    + [("/other", "free")] * 4
)

#: A decision's labels: ``(rule, tier, outcome)``.
Key = tuple[str, str, str]
#: ``get(path, tier)`` -> ``(status, body)``
Get = Callable[[str, str], Awaitable[tuple[int, bytes]]]


def rules_of(path: str) -> list[str]:
    """The outer middleware's rules that apply to ``path``."""
    return ["tiered", "global"] if path == "/tiered" else ["global"]


def tally(path: str, tier: str, status: int, body: bytes) -> Counter[Key]:
    """The rule decisions one answer shows."""
    seen: Counter[Key] = Counter()
    answer = json.loads(body)
    if status == 429:
        violated = set(answer["violated-policies"])
        for rule in rules_of(path):
            seen[rule, tier, "denied" if rule in violated else "allowed"] += 1
        return seen
    if status == 503:
        for rule in rules_of(path):
            seen[rule, tier, "failed_closed"] += 1
        return seen
    outcome = "failed_open" if answer["failed"] else "allowed"
    for rule in rules_of(path):
        seen[rule, tier, outcome] += 1
    if answer["shadow_denied"] is not None:
        seen["shadow", "", "shadow_denied" if answer["shadow_denied"] else "allowed"] += 1
    return seen


async def run_burst(get: Get) -> Counter[Key]:
    """Send ``BURST`` one request after the other; the rule decisions the client saw."""
    seen: Counter[Key] = Counter()
    for path, tier in BURST:
        status, body = await get(path, tier)
        seen += tally(path, tier, status, body)
    return seen


def decisions(text: str) -> Counter[Key]:
    """``fineflow_ratelimit_decisions_total`` of a Prometheus text (zeros left out)."""
    found: Counter[Key] = Counter()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "fineflow_ratelimit_decisions_total" and s.value:
                found[s.labels["rule"], s.labels["tier"], s.labels["outcome"]] += int(s.value)
    return found


def storage_samples(text: str, storage: str) -> dict[str, float]:
    """The samples labelled ``storage=<storage>``, by sample name (histogram buckets by
    ``name{le}``)."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("storage") != storage:
                continue
            le = s.labels.get("le")
            found[s.name if le is None else f"{s.name}{{{le}}}"] = s.value
    return found


def pool_samples(text: str) -> dict[str, float]:
    """The ``fineflow_postgres_pool_*`` samples by name (pools summed)."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("fineflow_postgres_pool_"):
                found[s.name] = found.get(s.name, 0.0) + s.value
    return found
