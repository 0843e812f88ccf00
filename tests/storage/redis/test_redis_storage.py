"""RedisStorage on one server: lifecycle, configuration, script loading, expiry, the
administrative calls, coalescing and the time budget."""

from __future__ import annotations

import asyncio
import secrets

import pytest
from redis.asyncio import Redis
from redis_fixtures import (  # noqa: F401 - the fixtures redis_server, redis_storage, throwaway
    redis_server_fixture,
    redis_storage_fixture,
    throwaway_fixture,
)

from fineflow import (
    ConfigurationError,
    Hit,
    Quota,
    RateLimiter,
    RedisStorage,
    StorageClosedError,
    StorageError,
)
from fineflow._ratelimit.algorithms import NS
from fineflow._storage.redis.errors import DecisionTimeout
from fineflow.testing.redis import RedisServer

pytestmark = pytest.mark.anyio

T0 = 1_700_000_000 * NS


def ep() -> str:
    return f"e{secrets.token_hex(4)}"


async def test_no_io_before_open_and_none_after_close() -> None:
    storage = RedisStorage("redis://127.0.0.1:1/0")  # nothing listens there: no I/O yet
    with pytest.raises(StorageClosedError, match="not open"):
        await storage.decide("gcra", [Hit("k", Quota(1, 1.0))])
    await storage.open()
    await storage.close()
    with pytest.raises(StorageClosedError):
        await storage.decide("gcra", [Hit("k", Quota(1, 1.0))])
    with pytest.raises(StorageClosedError, match="closed"):
        await storage.open()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"url": "http://localhost"}, "scheme must be"),
        ({"url": "redis://x", "client": Redis()}, "url or a client"),
        ({"prefix": "a{b}"}, "without braces"),
        ({"prefix": ""}, "without braces"),
        ({"max_batch": 0}, "max_batch"),
        ({"socket_timeout": -1}, "socket_timeout"),
        ({"url": "unix:///tmp/r.sock", "cluster": True}, "over TCP"),
    ],
)
def test_bad_configuration_is_a_clear_error(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        RedisStorage(**kwargs)  # type: ignore[arg-type]


def test_urls_choose_the_client() -> None:
    assert RedisStorage("redis+cluster://127.0.0.1:7000").cluster
    assert not RedisStorage("rediss://127.0.0.1:6380/1").cluster
    assert RedisStorage("redis://127.0.0.1:7000", cluster=True).cluster


async def test_a_flushed_script_cache_is_reloaded(redis_storage: RedisStorage) -> None:
    quota, endpoint = Quota(2, 60.0), ep()
    assert (await redis_storage.decide("gcra", [Hit("n", quota, 1, endpoint)]))[0].allowed
    await redis_storage.client.script_flush()
    # A lone request (EVALSHA on its own) and a batch (a pipeline) both reload it.
    assert (await redis_storage.decide("gcra", [Hit("n", quota, 1, endpoint)]))[0].allowed
    await redis_storage.client.script_flush()
    batch = await asyncio.gather(
        *(redis_storage.decide("gcra", [Hit(f"m{i}", quota, 1, endpoint)]) for i in range(5))
    )
    assert all(d[0].allowed for d in batch)


async def test_migrate_loads_the_script(redis_storage: RedisStorage) -> None:
    await redis_storage.client.script_flush()
    await redis_storage.migrate()
    from fineflow._storage.redis.scripts import DECIDE

    assert await redis_storage.client.script_exists(DECIDE.sha) == [True]


# decide.lua: how much longer a hash lives when the caller passes its own now.
EXPLICIT_NOW_GRACE_MS = 60_000


@pytest.mark.parametrize(
    ("algorithm", "period_ns"),
    [("gcra", 20 * NS), ("fixed_window", 60 * NS), ("sliding_window", 120 * NS)],
)
async def test_state_expires_when_it_is_equivalent_to_none(
    redis_storage: RedisStorage, algorithm: str, period_ns: int
) -> None:
    # At a multiple of 60 s, 3/60s: the GCRA state ends one emission interval (20 s)
    # later; a fixed window 60 s later; a sliding one two periods later.
    quota, endpoint, at = Quota(3, 60.0), ep(), 1_700_000_040 * NS
    await redis_storage.decide(algorithm, [Hit("x", quota, 1, endpoint)], now=at)
    name = redis_storage.names.key("x")
    ttl = await redis_storage.client.pttl(name)
    # With an explicit now the hash lives a minute longer than the state (its timeline is
    # not the server's). PTTL counts down as the test runs: a generous margin below.
    expected = period_ns // 1_000_000 + EXPLICIT_NOW_GRACE_MS
    assert expected - 5000 < ttl <= expected


async def test_state_on_the_server_clock_expires_at_its_end(redis_storage: RedisStorage) -> None:
    # GCRA 3/60s: one request leaves a state that ends one emission interval (20 s) later.
    quota, endpoint = Quota(3, 60.0), ep()
    await redis_storage.decide("gcra", [Hit("y", quota, 1, endpoint)])
    ttl = await redis_storage.client.pttl(redis_storage.names.key("y"))
    assert 20_000 - 5000 < ttl <= 20_000 + 2


async def test_cleanup_does_nothing(redis_storage: RedisStorage) -> None:
    await redis_storage.decide("gcra", [Hit("c", Quota(1, 1.0), 1, ep())], now=T0)
    assert await redis_storage.cleanup(now=T0 + 100 * NS) == 0
    assert await redis_storage.status("c", now=T0 + 100 * NS) == []  # expired at that time
    with pytest.raises(ValueError, match="batch_size"):
        await redis_storage.cleanup(batch_size=0)


async def test_reset_one_endpoint_and_status_of_several(redis_storage: RedisStorage) -> None:
    quota, one, two = Quota(5, 60.0), ep(), ep()
    await redis_storage.decide("gcra", [Hit("r", quota, 2, one, "pro")], now=T0)
    await redis_storage.decide("fixed_window", [Hit("r", quota, 1, two)], now=T0)
    rows = {s.endpoint: s for s in await redis_storage.status("r", now=T0)}
    assert rows[one].decision.remaining == 3 and rows[one].tier == "pro"
    assert rows[two].algorithm == "fixed_window" and rows[two].decision.remaining == 4
    assert await redis_storage.reset("r", endpoint=one) == 1
    assert [s.endpoint for s in await redis_storage.status("r", now=T0)] == [two]
    assert await redis_storage.reset("r", endpoint="nothing-here") == 0
    assert await redis_storage.reset("r") == 1
    assert await redis_storage.reset("r") == 0


@pytest.mark.parametrize("key", ["{a}", "a}b{", "\\]", "", "}"])
async def test_braces_in_keys_stay_distinct(redis_storage: RedisStorage, key: str) -> None:
    quota, endpoint = Quota(1, 60.0), ep()
    assert (await redis_storage.decide("gcra", [Hit(key, quota, 1, endpoint)]))[0].allowed
    assert not (await redis_storage.decide("gcra", [Hit(key, quota, 1, endpoint)]))[0].allowed
    other = key + "}"
    assert (await redis_storage.decide("gcra", [Hit(other, quota, 1, endpoint)]))[0].allowed
    assert len(await redis_storage.status(key)) == 1


async def test_the_servers_clock_decides(redis_storage: RedisStorage) -> None:
    quota, endpoint = Quota(2, 3600.0), ep()
    got = [
        (await redis_storage.decide(alg, [Hit("t", quota, 1, endpoint)]))[0]
        for alg in ("gcra", "gcra", "gcra")
    ]
    assert [d.allowed for d in got] == [True, True, False]
    assert 0 < (got[2].retry_after or 0) <= 1800


async def test_concurrent_decisions_share_pipelines(redis_storage: RedisStorage) -> None:
    quota, endpoint = Quota(10, 86400.0), ep()
    before = redis_storage.batches
    got = await asyncio.gather(
        *(redis_storage.decide("gcra", [Hit("hot", quota, 1, endpoint)]) for _ in range(50))
    )
    assert sum(d[0].allowed for d in got) == 10
    assert redis_storage.batches - before < 50


async def test_without_coalescing_each_request_is_its_own_call(
    redis_server: RedisServer,
) -> None:
    async with RedisStorage(
        redis_server.url, prefix=f"fftest-{secrets.token_hex(4)}", coalesce=False
    ) as storage:
        quota, endpoint = Quota(10, 86400.0), ep()
        got = await asyncio.gather(
            *(storage.decide("gcra", [Hit("hot", quota, 1, endpoint)]) for _ in range(20))
        )
        assert sum(d[0].allowed for d in got) == 10
        assert storage.batches == 20
        await storage.reset("hot")


async def test_timeout_validation(redis_storage: RedisStorage) -> None:
    for bad in (0, -1.0, True, "1"):
        with pytest.raises(ValueError, match="timeout"):
            await redis_storage.decide("gcra", [Hit("k", Quota(1, 1.0))], timeout=bad)  # type: ignore[arg-type]


async def test_a_server_that_never_answers_runs_out_of_the_budget() -> None:
    done = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 16)  # reads, never answers
        await done.wait()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with RedisStorage(f"redis://127.0.0.1:{port}/0") as storage:
            with pytest.raises(StorageError, match="time budget") as info:
                await storage.decide("gcra", [Hit("k", Quota(1, 1.0))], timeout=0.05)
            assert isinstance(info.value, DecisionTimeout)
            assert issubclass(DecisionTimeout, TimeoutError)  # the limiter counts a timeout
            limiter = RateLimiter(storage, timeout=0.05, on_storage_error="deny")
            decision = await limiter.hit("k", "1/second")
            assert not decision.allowed
            assert limiter.metrics().storage_timeouts == 1
            storage.socket_timeout = 0.1  # (close() waits at most this long for the call)
    finally:
        done.set()
        server.close()
        await server.wait_closed()


async def test_what_was_never_sent_is_never_charged(throwaway: RedisServer) -> None:
    """A request waiting behind a stalled call runs out of its budget and is dropped
    unsent; the stalled call itself was sent, so it is charged once the server goes on."""
    async with RedisStorage(throwaway.url, max_in_flight=1) as storage:
        quota = Quota(5, 60.0)
        await storage.decide("gcra", [Hit("warm", quota)])  # connection and script ready
        admin = Redis.from_url(throwaway.url)
        await admin.client_pause(400, all=False)  # (writes, scripts included, wait)
        first = asyncio.ensure_future(storage.decide("gcra", [Hit("p", quota)]))
        await asyncio.sleep(0.01)  # (first is on the server, waiting for the pause)
        with pytest.raises(DecisionTimeout):
            await storage.decide("gcra", [Hit("p", quota)], timeout=0.05)
        assert (await first)[0].allowed
        (status,) = await storage.status("p")
        assert status.allowed_total == 1
        await admin.aclose()
