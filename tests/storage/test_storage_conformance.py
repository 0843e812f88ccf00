"""One conformance suite for every storage backend, plus differential tests against the
reference model. PostgreSQL runs on a real server: logged, unlogged, and with the lone-request
fast path turned off so requests go through the general batch statement (``decide()``), the
grouped single-quota one (``hit_many()``) or the one for batches sharing one quota
(``hit_keys()``)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fineflow import BucketState, Hit, MemoryStorage, PostgresStorage, Quota, Storage
from fineflow._ratelimit.algorithms import NS, step_all
from fineflow._storage.base import MinuteStats

pytestmark = pytest.mark.anyio

T0 = 1_700_000_000 * NS
BACKENDS = [
    "memory",
    "postgres",
    "postgres-unlogged",
    "postgres-batch",
    "postgres-grouped",
    "postgres-keys",
    "redis",
    "redis-cluster",
]
ALGORITHMS = ["gcra", "fixed_window", "sliding_window"]
# Redis expires state by itself (PEXPIRE): its cleanup() has nothing to do and returns 0.
EXPIRES_BY_ITSELF = {"redis", "redis-cluster"}
# Which statements each PostgreSQL variant may use: lone requests go through the batch
# statements unless "hit" is there; "hit_keys", "hit_many" or, with neither, decide().
FAST_PATHS = {
    "postgres": {"hit", "hit_keys", "hit_many"},
    "postgres-unlogged": {"hit", "hit_keys", "hit_many"},
    "postgres-batch": set(),
    "postgres-grouped": {"hit_many"},
    "postgres-keys": {"hit_keys", "hit_many"},
}


@pytest.fixture(params=BACKENDS)
async def storage(request: pytest.FixtureRequest, pg_dsn: str) -> AsyncIterator[Storage]:
    kind = request.param
    if kind == "memory":
        async with MemoryStorage(clock=lambda: T0) as memory:
            yield memory
        return
    if kind.startswith("redis"):
        from fineflow import RedisStorage
        from fineflow.testing.redis import (
            delete_prefix,
            shared_cluster,
            shared_redis,
            unique_prefix,
        )

        url = shared_cluster().url if kind == "redis-cluster" else shared_redis().url
        prefix = unique_prefix()
        async with RedisStorage(url, prefix=prefix) as redis_storage:
            yield redis_storage
        if kind == "redis":
            await delete_prefix(url, prefix)
        return
    schema = f"ff_{secrets.token_hex(6)}"
    pg = PostgresStorage(
        pg_dsn,
        schema=schema,
        unlogged=kind == "postgres-unlogged",
        fast_paths=FAST_PATHS[kind],
    )
    async with pg:
        await pg.migrate()
        yield pg


def ep() -> str:
    return f"e{secrets.token_hex(4)}"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_first_requests_allowed_then_blocked(storage: Storage, algorithm: str) -> None:
    quota, endpoint = Quota(3, 60.0), ep()
    out = [
        (await storage.decide(algorithm, [Hit("u", quota, 1, endpoint)], now=T0))[0]
        for _ in range(5)
    ]
    assert [d.allowed for d in out] == [True, True, True, False, False]
    assert [d.remaining for d in out[:3]] == [2, 1, 0]
    assert out[3].retry_after is not None and out[3].retry_after > 0
    assert out[3].policy == quota.policy and out[3].limit == 3


async def test_users_endpoints_and_policies_are_isolated(storage: Storage) -> None:
    quota, endpoint = Quota(1, 60.0), ep()
    assert (await storage.decide("gcra", [Hit("alice", quota, 1, endpoint)], now=T0))[0].allowed
    assert (await storage.decide("gcra", [Hit("bob", quota, 1, endpoint)], now=T0))[0].allowed
    other = ep()
    assert (await storage.decide("gcra", [Hit("alice", quota, 1, other)], now=T0))[0].allowed
    q2 = Quota(1, 30.0)
    assert (await storage.decide("gcra", [Hit("alice", q2, 1, endpoint)], now=T0))[0].allowed
    again = await storage.decide("gcra", [Hit("alice", quota, 1, endpoint)], now=T0)
    assert not again[0].allowed


async def test_tiers_have_their_own_quotas(storage: Storage) -> None:
    endpoint = ep()
    free, pro = Quota(2, 60.0, name="free"), Quota(5, 60.0, name="pro")
    got = {}
    for tier, quota in (("free", free), ("pro", pro)):
        hits = [Hit(f"user-{tier}", quota, 1, endpoint, tier)]
        got[tier] = sum([(await storage.decide("gcra", hits, now=T0))[0].allowed for _ in range(8)])
    assert got == {"free": 2, "pro": 5}
    rows = {(r.endpoint, r.tier): r for r in await storage.stats()}
    assert rows[(endpoint, "free")].allowed == 2 and rows[(endpoint, "free")].denied == 6
    assert rows[(endpoint, "pro")].allowed == 5 and rows[(endpoint, "pro")].denied == 3


async def test_all_or_nothing_over_several_quotas(storage: Storage) -> None:
    endpoint = ep()
    per_second, per_day = Quota(2, 1.0), Quota(3, 86400.0)
    hits = [Hit("k", per_second, 1, endpoint), Hit("k", per_day, 1, endpoint)]
    first = await storage.decide("gcra", hits, now=T0)
    second = await storage.decide("gcra", hits, now=T0)
    third = await storage.decide("gcra", hits, now=T0)
    assert [d.allowed for d in first] == [True, True]
    assert [d.allowed for d in second] == [True, True]
    assert [d.allowed for d in third] == [False, True]
    assert third[1].remaining == 1  # the day quota was not charged
    later = await storage.decide("gcra", hits, now=T0 + 2 * NS)
    assert [d.allowed for d in later] == [True, True]
    blocked = await storage.decide("gcra", hits, now=T0 + 4 * NS)
    assert [d.allowed for d in blocked] == [True, False]


async def test_window_slides_and_state_expires(
    storage: Storage, request: pytest.FixtureRequest
) -> None:
    quota, endpoint = Quota(2, 1.0), ep()
    hits = [Hit("w", quota, 1, endpoint)]
    assert [(await storage.decide("gcra", hits, now=T0))[0].allowed for _ in range(3)] == [
        True,
        True,
        False,
    ]
    assert (await storage.decide("gcra", hits, now=T0 + NS // 2))[0].allowed
    removed = await storage.cleanup(now=T0 + 10 * NS)
    if request.node.callspec.params["storage"] in EXPIRES_BY_ITSELF:
        assert removed == 0  # nothing left for cleanup() to do
    else:
        assert removed >= 1
    assert await storage.status("w", now=T0 + 10 * NS) == []
    assert await storage.cleanup(now=T0 + 10 * NS) == 0


async def test_status_reset_and_peek(storage: Storage) -> None:
    quota, endpoint = Quota(5, 60.0), ep()
    for _ in range(2):
        await storage.decide("gcra", [Hit("s", quota, 1, endpoint, "pro")], now=T0)
    (status,) = await storage.status("s", now=T0)
    assert (status.endpoint, status.policy, status.tier) == (endpoint, quota.policy, "pro")
    assert status.decision.remaining == 3
    assert (status.allowed_total, status.denied_total) == (2, 0)
    peek = await storage.decide("gcra", [Hit("s", quota, 0, endpoint)], now=T0)
    assert peek[0].allowed and peek[0].remaining == 3
    assert await storage.reset("s") == 1
    assert await storage.status("s", now=T0) == []
    fresh = await storage.decide("gcra", [Hit("s", quota, 1, endpoint)], now=T0)
    assert fresh[0].remaining == 4


@pytest.mark.parametrize(
    "key",
    ["", "x" * 1_000_000, "nul\x00byte", "\udcff-surrogate", "'; DROP TABLE x; --", "ü" * 100],
)
async def test_any_key_is_a_correct_decision(storage: Storage, key: str) -> None:
    quota, endpoint = Quota(1, 60.0), ep()
    assert (await storage.decide("gcra", [Hit(key, quota, 1, endpoint)], now=T0))[0].allowed
    assert not (await storage.decide("gcra", [Hit(key, quota, 1, endpoint)], now=T0))[0].allowed


@pytest.mark.parametrize("cost", [-1, 1.5, True, "1"])
async def test_bad_costs_are_clear_errors(storage: Storage, cost: object) -> None:
    with pytest.raises(ValueError, match="cost"):
        await storage.decide("gcra", [Hit("c", Quota(1, 1.0), cost)], now=T0)  # type: ignore[arg-type]


async def test_enormous_cost_is_denied_not_crashed(storage: Storage) -> None:
    decision = (await storage.decide("gcra", [Hit("c", Quota(1, 1.0), 10**30, ep())], now=T0))[0]
    assert not decision.allowed and decision.retry_after is None


# -- differential: every backend agrees with the reference model ------------------------------

ops = st.lists(
    st.tuples(
        st.integers(0, 2),  # key
        st.lists(st.integers(0, 2), min_size=1, max_size=2, unique=True),  # quota indexes
        st.integers(0, 3),  # cost
        st.integers(0, 2 * NS),  # time step
    ),
    min_size=1,
    max_size=25,
)
QUOTAS = [Quota(3, 1.0), Quota(5, 2.5, burst=2), Quota(4, 10.0)]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops)
async def test_backend_matches_reference_model(
    storage: Storage, algorithm: str, ops: list[tuple[int, list[int], int, int]]
) -> None:
    endpoint = ep()
    model: dict[tuple[int, int], BucketState | None] = {}
    now = T0
    for key, quota_ids, cost, gap in ops:
        now += gap
        quotas = [QUOTAS[i] for i in quota_ids]
        states = [model.get((key, i)) for i in quota_ids]
        expected, new_states = step_all(algorithm, states, now, quotas, cost)
        for i, state in zip(quota_ids, new_states, strict=True):
            model[(key, i)] = state
        hits = [Hit(str(key), q, cost, endpoint) for q in quotas]
        got = await storage.decide(algorithm, hits, now=now)
        assert got == expected


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@settings(max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2)), min_size=1, max_size=40),
    gap=st.integers(0, 3 * NS),
)
async def test_concurrent_batches_match_the_model_in_arrival_order(
    storage: Storage, algorithm: str, batch: list[tuple[int, int]], gap: int
) -> None:
    """Many requests at once (coalesced into batches) get the decisions the model gives
    when it takes them one by one in arrival order. Each key has one cost.

    With one statement in flight the serial order is the arrival order; with more, two
    statements may reach the database in either order (still some serial order)."""
    import asyncio

    if isinstance(storage, PostgresStorage):
        storage.max_in_flight = 1

    endpoint = ep()
    quota = QUOTAS[0]
    now = T0 + gap
    costs = {0: 1, 1: 2, 2: 1, 3: 3}
    model: dict[int, BucketState | None] = {}
    expected = []
    for key, _ in batch:
        decisions, states = step_all(algorithm, [model.get(key)], now, [quota], costs[key])
        model[key] = states[0]
        expected.append(decisions[0])
    got = await asyncio.gather(
        *(
            storage.decide(algorithm, [Hit(str(key), quota, costs[key], endpoint)], now=now)
            for key, _ in batch
        )
    )
    assert [g[0] for g in got] == expected


# -- stats: requests counted per minute, endpoint and tier -------------------------------


def minute_stats(storage: Storage) -> MinuteStats:
    """Every fineflow storage counts requests per minute (the MinuteStats protocol)."""
    from fineflow import RedisStorage

    assert isinstance(storage, MemoryStorage | PostgresStorage | RedisStorage)
    return storage


async def test_stats_count_requests_once_by_endpoint_and_tier(storage: Storage) -> None:
    """A request counts once per endpoint and tier, whatever its quotas and cost; denied when
    any quota denies; a peek counts nothing."""
    one, two = ep(), ep()
    quotas = [
        Hit("k", Quota(2, 60.0), 1, one, "free"),
        Hit("k", Quota(99, 86400.0), 1, one, "free"),
    ]
    wide = [Hit("k", Quota(5, 60.0), 3, one, "pro"), Hit("g", Quota(1, 60.0), 1, two)]
    seen = [all(d.allowed for d in await storage.decide("gcra", quotas, now=T0)) for _ in "abc"]
    seen += [all(d.allowed for d in await storage.decide("gcra", wide, now=T0)) for _ in "ab"]
    await storage.decide("gcra", [Hit("k", Quota(2, 60.0), 0, one, "free")], now=T0)  # a peek
    assert seen == [True, True, False, True, False]
    stats = minute_stats(storage)
    rows = {(r.endpoint, r.tier): (r.allowed, r.denied) for r in await stats.stats()}
    assert rows == {(one, "free"): (2, 1), (one, "pro"): (1, 1), (two, ""): (1, 1)}
    by_endpoint = await stats.stats(by=["endpoint"])
    assert [(r.endpoint, r.tier, r.allowed, r.denied) for r in by_endpoint] == sorted(
        [(one, "", 3, 2), (two, "", 1, 1)]
    )
    (total,) = await stats.stats(by=())
    assert (total.endpoint, total.tier, total.allowed, total.denied) == ("", "", 4, 3)
    keys = {(r.endpoint, r.tier): r.keys for r in await stats.stats()}
    if storage.__class__.__name__ == "RedisStorage":
        assert set(keys.values()) == {0}  # (it would take a scan)
    else:
        assert keys == {(one, "free"): 1, (one, "pro"): 1, (two, ""): 1}


async def test_stats_per_minute_and_since(storage: Storage) -> None:
    endpoint, quota = ep(), Quota(2, 3600.0)
    at = [T0, T0 + 61 * NS, T0 + 125 * NS, T0 + 126 * NS]  # minutes m0, m1, m2, m2
    for now in at:
        await storage.decide("gcra", [Hit("u", quota, 1, endpoint, "t")], now=now)
    stats = minute_stats(storage)
    points = await stats.stats_series()
    m0 = T0 // (60 * NS) * 60
    assert [(int(p.minute.timestamp()) - m0, p.allowed, p.denied) for p in points] == [
        (0, 1, 0),
        (60, 1, 0),
        (120, 0, 2),
    ]
    assert {(p.endpoint, p.tier) for p in points} == {(endpoint, "t")}
    recent = await stats.stats_series(since=60, now=at[-1], by=["tier"])
    assert [(p.endpoint, p.tier, p.allowed, p.denied) for p in recent] == [
        ("", "t", 1, 0),
        ("", "t", 0, 2),
    ]
    (row,) = await stats.stats(since=timedelta(seconds=60), now=at[-1])
    assert (row.allowed, row.denied) == (1, 2)
    for bad in ({"since": -1}, {"since": float("nan")}, {"by": ["user"]}, {"by": "keys"}):
        with pytest.raises(ValueError):
            await stats.stats(**bad)


async def test_stats_survive_cleanup(storage: Storage) -> None:
    endpoint = ep()
    for _ in range(3):
        await storage.decide("gcra", [Hit("u", Quota(2, 1.0), 1, endpoint)], now=T0)
    await storage.cleanup(now=T0 + 600 * NS)  # the state is gone (Redis: expired by itself)
    assert await storage.status("u", now=T0 + 600 * NS) == []
    (row,) = await minute_stats(storage).stats()
    assert (row.endpoint, row.keys, row.allowed, row.denied) == (endpoint, 0, 2, 1)
