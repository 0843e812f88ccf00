"""The pure counting cores: ``DecisionCounts`` (one count per rule of a request, by outcome)
and the fixed-bucket ``Histogram`` the storages' round trips and batch sizes go into."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

import fineflow as ff
from fineflow._ratelimit.algorithms import Decision
from fineflow._ratelimit.counters import OUTCOMES, DecisionCounts
from fineflow._storage.base import Hit
from fineflow._storage.figures import ROUND_TRIP_BUCKETS, Histogram, HistogramSnapshot

Q = ff.Quota.parse("10/minute")


def hit(rule: str, tier: str = "") -> Hit:
    return Hit("k", Q, 1, rule, tier)


def decision(allowed: bool, reason: str | None = None) -> Decision:
    return Decision(
        allowed, 10, 5 if allowed else 0, 1.0, 0.0 if allowed else 6.0, Q.policy, reason=reason
    )


ALLOW, DENY = decision(True), decision(False)
#: on_storage_error's decisions (the limiter's reason) and a denial with another reason
FAILED = "storage unavailable"
OPEN, CLOSED = decision(True, FAILED), decision(False, FAILED)
TOO_BIG = decision(False, "cost exceeds burst")


@pytest.mark.parametrize(
    ("hits", "decisions", "shadow", "expected"),
    [
        ([hit("a")], [ALLOW], False, {("a", "", "allowed"): 1}),
        ([hit("a", "pro")], [DENY], False, {("a", "pro", "denied"): 1}),
        ([hit("a")], [DENY], True, {("a", "", "shadow_denied"): 1}),
        # two rules: each its own verdict (b admitted, though a denied the request)
        (
            [hit("a"), hit("b")],
            [DENY, ALLOW],
            False,
            {("a", "", "denied"): 1, ("b", "", "allowed"): 1},
        ),
        # one rule, two quotas: one count, denied when either quota denied
        ([hit("a"), hit("a")], [ALLOW, DENY], False, {("a", "", "denied"): 1}),
        ([hit("a"), hit("a")], [ALLOW, ALLOW], False, {("a", "", "allowed"): 1}),
        # the storage failed: the policy's answer for every rule, in shadow mode too
        (
            [hit("a"), hit("a"), hit("b")],
            [OPEN] * 3,
            False,
            {("a", "", "failed_open"): 1, ("b", "", "failed_open"): 1},
        ),
        ([hit("a")], [CLOSED], True, {("a", "", "failed_closed"): 1}),
        # a denial with a reason that is not the storage's is a denial
        ([hit("a")], [TOO_BIG], False, {("a", "", "denied"): 1}),
    ],
)
def test_one_count_per_rule_and_request(
    hits: list[Hit],
    decisions: list[Decision],
    shadow: bool,
    expected: dict[tuple[str, str, str], int],
) -> None:
    counts = DecisionCounts(FAILED)
    counts.count(hits, decisions, shadow)
    assert nonzero(counts.snapshot()) == expected
    counts.count(hits, decisions, shadow)
    assert nonzero(counts.snapshot()) == {k: 2 * v for k, v in expected.items()}


def nonzero(counts: dict[tuple[str, str, str], int]) -> dict[tuple[str, str, str], int]:
    return {k: v for k, v in counts.items() if v}


def test_every_outcome_of_a_rule_seen_is_listed_and_a_snapshot_is_a_copy() -> None:
    counts = DecisionCounts(FAILED)
    assert counts.snapshot() == {}
    counts.count([hit("a", "pro")], [ALLOW], False)
    snap = counts.snapshot()
    assert snap == {("a", "pro", o): int(o == "allowed") for o in OUTCOMES}
    counts.count([hit("a", "pro")], [ALLOW], False)
    assert snap["a", "pro", "allowed"] == 1


def test_a_value_on_a_bound_falls_in_that_bucket() -> None:
    h = Histogram((1.0, 2.0))
    for value in (0.5, 1.0, 1.5, 2.0, 3.0):
        h.observe(value)
    snap = h.snapshot()
    assert snap.counts == (2, 2, 1)
    assert snap.cumulative() == [(1.0, 2), (2.0, 4), (math.inf, 5)]
    assert (snap.count, snap.total) == (5, 8.0)


@pytest.mark.parametrize("bounds", [(), (1.0, 1.0), (2.0, 1.0)])
def test_bounds_must_ascend(bounds: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="strictly ascending"):
        Histogram(bounds)


def test_snapshots_add_bucket_by_bucket_and_only_alike() -> None:
    a = HistogramSnapshot((1.0,), (1, 2), 5.0)
    assert a + HistogramSnapshot((1.0,), (3, 0), 1.0) == HistogramSnapshot((1.0,), (4, 2), 6.0)
    with pytest.raises(ValueError, match="same buckets"):
        a + HistogramSnapshot((2.0,), (0, 0), 0.0)


@given(st.lists(st.floats(min_value=0, max_value=10, allow_nan=False), max_size=50))
def test_cumulative_counts_agree_with_the_values(values: list[float]) -> None:
    h = Histogram(ROUND_TRIP_BUCKETS)
    for value in values:
        h.observe(value)
    for bound, n in h.snapshot().cumulative():
        assert n == sum(1 for v in values if v <= bound)
    assert h.snapshot().total == pytest.approx(sum(values))
