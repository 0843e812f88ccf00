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

import threading
from collections.abc import Sequence

from .._storage.base import Hit
from .algorithms import Decision

__all__ = ["OUTCOMES", "DecisionCounts", "DecisionKey"]

#: Every outcome, in the order the exporters list them.
OUTCOMES = ("allowed", "denied", "failed_open", "failed_closed", "shadow_denied")
ALLOWED, DENIED, FAILED_OPEN, FAILED_CLOSED, SHADOW_DENIED = range(len(OUTCOMES))

#: ``(rule, tier, outcome)``
DecisionKey = tuple[str, str, str]


class DecisionCounts:
    """Counts of rule decisions by rule, tier and outcome; written by its owner only.

    Kept as rule -> tier -> one count per outcome (indexed like ``OUTCOMES``): a request
    pays two lookups of strings whose hashes are cached and one list increment, not the
    hash of a new tuple key.

    Args:
        failed_reason: the ``Decision.reason`` of the decisions ``on_storage_error`` makes
            when the storage fails (the limiter's; a plain decision has no reason).
    """

    __slots__ = ("_failed_reason", "_lock", "_rows")

    def __init__(self, failed_reason: str) -> None:
        self._failed_reason = failed_reason
        self._rows: dict[str, dict[str, list[int]]] = {}
        # Taken to add a rule or tier and to copy the table: a scrape on another thread
        # then never sees a dict change size under it (counting into a row takes none).
        self._lock = threading.Lock()

    def count(self, hits: Sequence[Hit], decisions: Sequence[Decision], shadow: bool) -> None:
        """Count one request: once under each rule (``Hit.endpoint``) of its ``hits``.

        Args:
            hits: the request's hits, one per quota (a rule with several quotas has several).
            decisions: their decisions, in the same order.
            shadow: shadow mode (a denial lets the request through).
        """
        first = decisions[0]
        if len(hits) == 1 and first.reason is None:  # one rule, one quota: most requests
            hit = hits[0]
            row = self._row(hit.endpoint, hit.tier)
            row[ALLOWED if first.allowed else SHADOW_DENIED if shadow else DENIED] += 1
            return
        if first.reason == self._failed_reason:  # all of a request's, or none
            outcome = FAILED_OPEN if first.allowed else FAILED_CLOSED
            for rule, tier in _rules(hits):
                self._row(rule, tier)[outcome] += 1
            return
        verdicts: dict[tuple[str, str], bool] = {}
        for hit, decision in zip(hits, decisions, strict=True):
            key = (hit.endpoint, hit.tier)
            verdicts[key] = verdicts.get(key, True) and decision.allowed
        denied = SHADOW_DENIED if shadow else DENIED
        for (rule_name, tier), allowed in verdicts.items():
            self._row(rule_name, tier)[ALLOWED if allowed else denied] += 1

    def _row(self, rule: str, tier: str) -> list[int]:
        tiers = self._rows.get(rule)
        row = None if tiers is None else tiers.get(tier)
        if row is None:
            with self._lock:
                row = self._rows.setdefault(rule, {}).setdefault(tier, [0] * len(OUTCOMES))
        return row

    def snapshot(self) -> dict[DecisionKey, int]:
        """The counts now, every outcome of each (rule, tier) seen, zeros included (so a
        first denial is an increase from 0 to a query, not a new series)."""
        with self._lock:
            return {
                (rule, tier, outcome): n
                for rule, tiers in self._rows.items()
                for tier, row in tiers.items()
                for outcome, n in zip(OUTCOMES, row, strict=True)
            }


def _rules(hits: Sequence[Hit]) -> list[tuple[str, str]]:
    """Each ``(rule, tier)`` of ``hits`` once, in order."""
    return list(dict.fromkeys((hit.endpoint, hit.tier) for hit in hits))
