"""The pure reference algorithms: table tests and Hypothesis properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fineflow import BucketState, Quota
from fineflow._ratelimit.algorithms import (
    COST_TOO_HIGH,
    NS,
    expires_at,
    fixed_window_step,
    gcra_step,
    sliding_window_step,
    step,
    step_all,
)

T0 = 1_700_000_000 * NS
ALGORITHMS = ["gcra", "fixed_window", "sliding_window"]


def run(algorithm: str, quota: Quota, times: list[int], cost: int = 1) -> list[bool]:
    state: BucketState | None = None
    out = []
    for now in times:
        decision, state = step(algorithm, state, now, quota, cost)
        out.append(decision.allowed)
    return out


def test_gcra_fresh_key_admits_exactly_burst_then_one_per_interval() -> None:
    quota = Quota(10, 1.0, burst=3)
    assert run("gcra", quota, [T0] * 5) == [True, True, True, False, False]
    state = None
    for _ in range(3):
        _, state = gcra_step(state, T0, quota, 1)
    denied, same = gcra_step(state, T0, quota, 1)
    assert not denied.allowed and same is state
    assert denied.retry_after == pytest.approx(0.1)
    assert denied.remaining == 0
    allowed, _ = gcra_step(state, T0 + NS // 10, quota, 1)
    assert allowed.allowed
    assert allowed.remaining == 0


def test_gcra_remaining_and_reset_after() -> None:
    quota = Quota.parse("100/minute")
    decision, state = gcra_step(None, T0, quota, 1)
    assert (decision.allowed, decision.remaining, decision.retry_after) == (True, 99, 0.0)
    assert decision.reset_after == pytest.approx(0.6)
    decision, state = gcra_step(state, T0, quota, 9)
    assert decision.remaining == 90
    assert decision.reset_after == pytest.approx(6.0)
    assert state is not None and expires_at("gcra", state, quota) == T0 + 6 * NS


def test_cost_that_can_never_fit_is_denied_without_retry() -> None:
    for algorithm in ALGORITHMS:
        decision, state = step(algorithm, None, T0, Quota(5, 1.0), 6)
        assert not decision.allowed
        assert decision.retry_after is None
        assert decision.reason == COST_TOO_HIGH
        assert state is None


def test_fixed_window_aligns_to_the_epoch() -> None:
    quota = Quota(2, 10.0)
    start = T0 - T0 % (10 * NS)
    assert run("fixed_window", quota, [start + 9 * NS] * 3) == [True, True, False]
    state = None
    for _ in range(2):
        _, state = fixed_window_step(state, start + 9 * NS, quota, 1)
    denied, _ = fixed_window_step(state, start + 9 * NS, quota, 1)
    assert denied.retry_after == pytest.approx(1.0)
    assert denied.reset_after == pytest.approx(1.0)
    fresh, _ = fixed_window_step(state, start + 10 * NS, quota, 1)
    assert fresh.allowed and fresh.remaining == 1


def test_sliding_window_weighs_the_previous_window() -> None:
    quota = Quota(10, 10.0)
    start = T0 - T0 % (10 * NS)
    state = None
    for _ in range(10):
        decision, state = sliding_window_step(state, start, quota, 1)
        assert decision.allowed
    # Halfway through the next window the previous 10 weigh 5: five more fit.
    half = start + 15 * NS
    admitted = 0
    for _ in range(8):
        decision, state = sliding_window_step(state, half, quota, 1)
        admitted += decision.allowed
    assert admitted == 5
    assert not decision.allowed
    assert decision.retry_after is not None and decision.retry_after > 0
    # At the advertised retry time, the request fits.
    retry_ns = round(decision.retry_after * NS)
    later, _ = sliding_window_step(state, half + retry_ns, quota, 1)
    assert later.allowed


def test_step_all_is_all_or_nothing() -> None:
    small, large = Quota(1, 1.0), Quota(100, 60.0)
    decisions, states = step_all("gcra", [None, None], T0, [small, large], 1)
    assert all(d.allowed for d in decisions)
    decisions2, states2 = step_all("gcra", states, T0, [small, large], 1)
    assert [d.allowed for d in decisions2] == [False, True]
    assert states2 == states
    assert decisions2[1].remaining == 99  # reported as a peek: nothing charged


# -- properties ----------------------------------------------------------------------------

quotas = st.builds(
    Quota,
    limit=st.integers(1, 20),
    period=st.sampled_from([1.0, 2.5, 10.0, 60.0]),
    burst=st.one_of(st.none(), st.integers(1, 30)),
)
events = st.lists(st.tuples(st.integers(0, 3 * NS), st.integers(0, 4)), min_size=1, max_size=60)


@given(quota=quotas, events=events)
def test_gcra_never_admits_more_than_burst_plus_rate(
    quota: Quota, events: list[tuple[int, int]]
) -> None:
    now = T0
    state: BucketState | None = None
    admitted: list[tuple[int, int]] = []
    for gap, cost in events:
        now += gap
        decision, state = gcra_step(state, now, quota, cost)
        if decision.allowed and cost:
            admitted.append((now, cost))
    interval = quota.emission_interval_ns
    for i, (start, _) in enumerate(admitted):
        total = 0
        for when, cost in admitted[i:]:
            total += cost
            # Over [start, when]: at most capacity + (when - start) / T.
            assert total * interval <= quota.capacity * interval + (when - start)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@given(quota=quotas, events=events)
def test_denied_and_zero_cost_change_nothing(
    algorithm: str, quota: Quota, events: list[tuple[int, int]]
) -> None:
    now = T0
    state: BucketState | None = None
    for gap, cost in events:
        now += gap
        decision, new_state = step(algorithm, state, now, quota, cost)
        if not decision.allowed or cost == 0:
            assert new_state is state
        assert decision.remaining >= 0
        assert decision.reset_after >= 0
        assert decision.allowed == (decision.retry_after == 0.0)
        state = new_state


@pytest.mark.parametrize("algorithm", ["fixed_window", "sliding_window"])
@given(quota=quotas, events=events)
def test_windows_never_admit_more_than_limit_per_aligned_window(
    algorithm: str, quota: Quota, events: list[tuple[int, int]]
) -> None:
    now = T0
    state: BucketState | None = None
    per_window: dict[int, int] = {}
    for gap, cost in events:
        now += gap
        decision, state = step(algorithm, state, now, quota, cost)
        if decision.allowed:
            window = now // quota.period_ns
            per_window[window] = per_window.get(window, 0) + cost
    assert all(total <= quota.limit for total in per_window.values())


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@given(quota=quotas, events=events)
def test_retry_after_is_honest(algorithm: str, quota: Quota, events: list[tuple[int, int]]) -> None:
    """A denied request fits at its retry_after if nothing else happens, and not before."""
    now = T0
    state: BucketState | None = None
    for gap, cost in events:
        now += gap
        decision, new_state = step(algorithm, state, now, quota, cost)
        if not decision.allowed and decision.retry_after is not None:
            wait = round(decision.retry_after * NS)
            assert step(algorithm, state, now + wait, quota, cost)[0].allowed
            if wait > 0:
                assert not step(algorithm, state, now + wait - 1, quota, cost)[0].allowed
        state = new_state
