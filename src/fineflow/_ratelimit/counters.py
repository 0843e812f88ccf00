"""Decision counts by rule, tier and outcome: what the exporters report as
``fineflow_ratelimit_decisions_total``.

Pure: no clock, no I/O. A :class:`DecisionCounts` belongs to the one front end that decides
(the :class:`~.gate.Gate` of a middleware, a FastAPI dependency or ``@ff.limit``), which
counts each request once under every rule it was decided under; exporters read
:meth:`DecisionCounts.snapshot` when they collect.

Outcomes, per rule of a request:

* ``allowed``: the storage admitted every quota of the rule (another rule of the same request
  may still have denied it: quotas are all or nothing, counts are per rule);
* ``denied``: the storage denied at least one quota of the rule, and the request was refused;
* ``shadow_denied``: the same in shadow mode, where the request went through;
* ``failed_open`` / ``failed_closed``: the storage failed and ``on_storage_error`` allowed
  / denied the request (in shadow mode too: the storage's health is not the rule's verdict).
"""

from __future__ import annotations

from collections.abc import Sequence

from .._storage.base import Hit
from .algorithms import Decision

__all__ = ["OUTCOMES", "DecisionCounts", "DecisionKey"]

#: Every outcome, in the order the exporters list them.
OUTCOMES = ("allowed", "denied", "failed_open", "failed_closed", "shadow_denied")

#: ``(rule, tier, outcome)``
DecisionKey = tuple[str, str, str]


class DecisionCounts:
    """Counts of rule decisions, keyed ``(rule, tier, outcome)``; written by its owner only."""

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: dict[DecisionKey, int] = {}

    def count(
        self,
        hits: Sequence[Hit],
        decisions: Sequence[Decision],
        *,
        storage_failed: bool,
        shadow: bool,
    ) -> None:
        """Count one request: once under each rule (``Hit.endpoint``) of its ``hits``.

        Args:
            hits: the request's hits, one per quota (a rule with several quotas has several).
            decisions: their decisions, in the same order.
            storage_failed: the decisions are ``on_storage_error``'s, not the storage's.
            shadow: shadow mode (a denial lets the request through).
        """
        counts = self._counts
        if storage_failed:
            outcome = "failed_open" if decisions[0].allowed else "failed_closed"
            for hit in _one_per_rule(hits):
                key = (hit.endpoint, hit.tier, outcome)
                counts[key] = counts.get(key, 0) + 1
            return
        denied = "shadow_denied" if shadow else "denied"
        if len(hits) == 1:  # one rule, one quota: most requests
            hit = hits[0]
            key = (hit.endpoint, hit.tier, "allowed" if decisions[0].allowed else denied)
            counts[key] = counts.get(key, 0) + 1
            return
        verdicts: dict[tuple[str, str], bool] = {}
        for hit, decision in zip(hits, decisions, strict=True):
            rule = (hit.endpoint, hit.tier)
            verdicts[rule] = verdicts.get(rule, True) and decision.allowed
        for (rule_name, tier), allowed in verdicts.items():
            key = (rule_name, tier, "allowed" if allowed else denied)
            counts[key] = counts.get(key, 0) + 1

    def snapshot(self) -> dict[DecisionKey, int]:
        """The counts now (a copy: the dict is copied in one step, so a scrape on another
        thread never sees it change size under it)."""
        return self._counts.copy()


def _one_per_rule(hits: Sequence[Hit]) -> list[Hit]:
    """The first hit of each ``(rule, tier)``, in order."""
    if len(hits) == 1:
        return [hits[0]]
    seen: dict[tuple[str, str], Hit] = {}
    for hit in hits:
        seen.setdefault((hit.endpoint, hit.tier), hit)
    return list(seen.values())
