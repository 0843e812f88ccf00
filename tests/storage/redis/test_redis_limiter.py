"""RedisStorage behind RateLimiter and RateLimitMiddleware: a raw ASGI app, 429s with the
headers, several rules of one request all or nothing, a batch of mixed algorithms."""

from __future__ import annotations

import asyncio
import secrets

import pytest
from redis_fixtures import (  # noqa: F401 - the fixtures redis_server, redis_storage
    redis_server_fixture,
    redis_storage_fixture,
)

import fineflow as ff
from asgi_helpers import call, echo_app, http_scope
from fineflow._ratelimit.algorithms import NS, step

pytestmark = pytest.mark.anyio

T0 = 1_700_000_000 * NS


async def test_the_limiter_over_redis(redis_storage: ff.RedisStorage) -> None:
    limiter = ff.RateLimiter(redis_storage)
    got = [await limiter.hit("alice", "2/minute", endpoint="e") for _ in range(3)]
    assert [d.allowed for d in got] == [True, True, False]
    assert (await limiter.peek("alice", "2/minute", endpoint="e")).remaining == 0
    both = await limiter.hit_all("bob", ["1/minute", "10/day"], endpoint="e")
    assert both.allowed and [d.remaining for d in both] == [0, 9]
    again = await limiter.hit_all("bob", ["1/minute", "10/day"], endpoint="e")
    assert not again.allowed and again[1].remaining == 9  # the day quota was not charged
    assert {s.policy for s in await limiter.status("bob")} == {"1-per-60s", "10-per-86400s"}
    assert await limiter.reset("alice") == 1
    assert (await limiter.hit("alice", "2/minute", endpoint="e")).allowed
    assert limiter.metrics().storage_errors == 0


async def test_the_middleware_over_redis(redis_storage: ff.RedisStorage) -> None:
    app = ff.RateLimitMiddleware(
        echo_app,
        storage=redis_storage,
        rules=[ff.Rule("/api/{rest:path}", quota="2/minute"), ff.Rule("/api/chat", quota="5/day")],
    )
    client = (f"198.51.100.{secrets.randbelow(200)}", 1234)
    statuses = []
    for _ in range(3):
        response = await call(app, http_scope("/api/chat", client=client))
        statuses.append(response.status)
    assert statuses == [200, 200, 429]
    assert response.header(b"retry-after") is not None
    assert response.json()["violated-policies"]


@pytest.mark.parametrize("gap", [0, NS // 3])
async def test_a_batch_of_mixed_algorithms_and_times_is_decided_in_order(
    redis_storage: ff.RedisStorage, gap: int
) -> None:
    """Requests of several algorithms, keys and explicit times, all in flight at once
    (one batch, a few script calls) get what the model gives them one by one."""
    quota, endpoint = ff.Quota(3, 1.0), f"e{secrets.token_hex(3)}"
    algorithms = ["gcra", "fixed_window", "sliding_window"]
    plan = [(algorithms[i % 3], f"k{i % 5}", T0 + (i // 7) * gap) for i in range(60)]
    model: dict[tuple[str, str], ff.BucketState | None] = {}
    expected = []
    for algorithm, key, now in plan:
        decision, model[(algorithm, key)] = step(
            algorithm, model.get((algorithm, key)), now, quota, 1
        )
        expected.append(decision)
    got = await asyncio.gather(
        *(
            redis_storage.decide(alg, [ff.Hit(f"{alg}-{key}", quota, 1, endpoint)], now=now)
            for alg, key, now in plan
        )
    )
    assert [g[0] for g in got] == expected
    assert redis_storage.batches < len(plan)
