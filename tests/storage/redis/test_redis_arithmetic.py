"""The script's exact integer arithmetic against the reference, at the edges: times from 0 to
past 2^62 ns, periods from a nanosecond to ten years, whole and fractional seconds, limits up
to 10^10 (the sliding window's products then need the script's bignums), costs that can never
fit. Each step is one decision on one key, compared with the reference model."""

from __future__ import annotations

import secrets

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis_fixtures import (  # noqa: F401 - the fixtures redis_server, redis_storage
    redis_server_fixture,
    redis_storage_fixture,
)

from fineflow import BucketState, Hit, Quota, RedisStorage
from fineflow._ratelimit.algorithms import NS, step

pytestmark = pytest.mark.anyio

YEAR = 365 * 86400.0
QUOTAS = [
    Quota(1, 1e-9),  # one per nanosecond
    Quota(3, 0.3),  # a fractional period
    Quota(5, 60.0, burst=7),
    Quota(10**10, 100.0),  # products past 2^53 in the sliding window
    Quota(2, 86400.0),
    Quota(10**6, 9 * YEAR),  # about the longest period allowed
    Quota(7, 12345.678901234),
]


@pytest.mark.parametrize("algorithm", ["gcra", "fixed_window", "sliding_window"])
@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    quota=st.sampled_from(QUOTAS),
    start=st.one_of(st.integers(0, 10 * NS), st.integers(0, 2**62)),
    steps=st.lists(
        st.tuples(
            st.one_of(st.integers(0, 3), st.just(10**30), st.integers(0, 10**10 + 2)),
            st.one_of(st.integers(0, NS), st.integers(0, 400 * 86400 * NS)),
        ),
        min_size=1,
        max_size=12,
    ),
)
async def test_the_script_is_the_reference(
    redis_storage: RedisStorage,
    algorithm: str,
    quota: Quota,
    start: int,
    steps: list[tuple[int, int]],
) -> None:
    endpoint = f"e{secrets.token_hex(4)}"
    state: BucketState | None = None
    now = start
    for cost, gap in steps:
        now += gap
        expected, state = step(algorithm, state, now, quota, cost)
        got = await redis_storage.decide(algorithm, [Hit("k", quota, cost, endpoint)], now=now)
        assert got == [expected]
