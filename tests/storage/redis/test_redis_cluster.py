"""RedisStorage on a three-master Redis Cluster: requests whose quotas live in several
slots are charged slot by slot and refunded when one denies; never more than the quotas."""

from __future__ import annotations

import asyncio
import secrets

import pytest
from redis.crc import key_slot
from redis_fixtures import (  # noqa: F401 - the fixtures cluster_storage, redis_cluster
    cluster_storage_fixture,
    redis_cluster_fixture,
)

from fineflow import Hit, Quota, RedisStorage
from fineflow._ratelimit.algorithms import NS
from fineflow._storage.coalescing import Request
from fineflow._storage.redis.batch import plan
from fineflow._storage.redis.sender import slot

pytestmark = pytest.mark.anyio

ALGORITHMS = ["gcra", "fixed_window", "sliding_window"]
T0 = 1_700_000_000 * NS  # (an explicit time: no window boundary passes mid-test)


def ep() -> str:
    return f"e{secrets.token_hex(4)}"


def apart(storage: RedisStorage, endpoint: str, policy: str, count: int) -> list[str]:
    """``count`` keys whose states live in different slots."""
    keys: list[str] = []
    slots: set[int] = set()
    for i in range(1000):
        key = f"k{i}"
        slot = key_slot(storage.names.key(key).encode())
        if slot not in slots:
            keys.append(key)
            slots.add(slot)
        if len(keys) == count:
            return keys
    raise AssertionError("no keys in different slots")


async def test_the_quotas_of_one_key_are_one_call(cluster_storage: RedisStorage) -> None:
    endpoint, one, two = ep(), Quota(1, 1.0), Quota(100, 86400.0)
    hits = [Hit("user-7", one, 1, endpoint), Hit("user-7", two, 1, endpoint, "pro")]
    request = Request(hits, None, "gcra", asyncio.get_running_loop().create_future())
    (call,) = plan(request, cluster_storage.names, slot)
    assert call.keys == [cluster_storage.names.key("user-7")] and call.hashes == [1, 1]
    assert [d.allowed for d in await cluster_storage.decide("gcra", hits, now=T0)] == [True] * 2
    assert [d.allowed for d in await cluster_storage.decide("gcra", hits, now=T0)] == [False, True]
    assert len(await cluster_storage.status("user-7", now=T0)) == 2


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_a_denial_in_one_slot_refunds_the_others(
    cluster_storage: RedisStorage, algorithm: str
) -> None:
    endpoint = ep()
    per_user, overall = Quota(1, 60.0), Quota(5, 60.0)
    user, everyone = apart(cluster_storage, endpoint, per_user.policy, 2)
    hits = [Hit(user, per_user, 1, endpoint), Hit(everyone, overall, 1, endpoint)]
    first = await cluster_storage.decide(algorithm, hits, now=T0)
    assert [d.allowed for d in first] == [True, True]
    assert first[1].remaining == 4
    second = await cluster_storage.decide(algorithm, hits, now=T0)
    assert [d.allowed for d in second] == [False, True]  # the user's quota denies
    assert second[1].remaining == 4  # as a peek: the charge was given back
    (status,) = await cluster_storage.status(everyone, now=T0)
    assert status.decision.remaining == 4
    assert (status.allowed_total, status.denied_total) == (1, 1)
    assert cluster_storage.refunded == 1


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_many_requests_over_several_slots_never_exceed_a_quota(
    cluster_storage: RedisStorage, algorithm: str
) -> None:
    endpoint = ep()
    per_user, overall = Quota(3, 60.0), Quota(10, 60.0)
    *users, everyone = apart(cluster_storage, endpoint, per_user.policy, 9)

    async def one(user: str) -> bool:
        hits = [Hit(user, per_user, 1, endpoint), Hit(everyone, overall, 1, endpoint)]
        return all(d.allowed for d in await cluster_storage.decide(algorithm, hits, now=T0))

    order = [users[i % len(users)] for i in range(120)]
    admitted = [
        u for u, ok in zip(order, await asyncio.gather(*map(one, order)), strict=True) if ok
    ]
    assert 0 < len(admitted) <= 10
    assert all(admitted.count(u) <= 3 for u in users)
    # Whatever was refunded was given back exactly: the overall quota holds the admitted.
    (status,) = await cluster_storage.status(everyone, now=T0)
    assert status.allowed_total == len(admitted)
    assert status.decision.remaining == 10 - len(admitted)
