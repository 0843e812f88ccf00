"""RedisStorage through Redis Sentinel, on throwaway processes (a master, its replica and a
``redis-server --sentinel``): a ``redis+sentinel://`` URL, a client you pass, and a
failover under a middleware: no 500 while the master is gone, decisions through
``on_storage_error``, then real decisions again on the promoted replica, nothing left open."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator

import anyio
import httpx
import pytest
from redis.asyncio.sentinel import Sentinel

import fineflow as ff
from asgi_helpers import echo_app
from fineflow.testing.redis import ThrowawaySentinel, throwaway_sentinel, unique_prefix

pytestmark = pytest.mark.anyio


@pytest.fixture
def sentinel_set() -> Iterator[ThrowawaySentinel]:
    with throwaway_sentinel(down_after=1.0, failover_timeout=2.0) as group:
        yield group


def our_connections(port: int) -> list[str]:
    """The clients of the server on ``port`` other than the sentinels, a replica's link
    and this query."""
    out = subprocess.run(
        ["redis-cli", "-p", str(port), "client", "list"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    return [
        line
        for line in out.splitlines()
        if "name=sentinel-" not in line
        and " flags=S " not in line
        and "cmd=client|list" not in line
    ]


async def test_a_sentinel_url_and_a_client_you_pass(sentinel_set: ThrowawaySentinel) -> None:
    storage = ff.storage_from_url(sentinel_set.url)
    assert isinstance(storage, ff.RedisStorage) and not storage.cluster
    quota = ff.Quota(2, 86400.0)
    async with storage:
        got = [(await storage.decide("gcra", [ff.Hit("s", quota)]))[0] for _ in range(3)]
        assert [d.allowed for d in got] == [True, True, False]
        (status,) = await storage.status("s")
        assert status.allowed_total == 2 and status.denied_total == 1
    assert our_connections(sentinel_set.master.port) == []
    sentinels = Sentinel([("127.0.0.1", sentinel_set.sentinels[0].port)], socket_timeout=5)
    client = sentinels.master_for(sentinel_set.service)
    try:
        async with ff.RedisStorage(client=client, prefix=unique_prefix()) as mine:
            assert (await mine.decide("gcra", [ff.Hit("s", quota)]))[0].remaining == 1
    finally:
        await client.aclose()
        for one in sentinels.sentinels:
            await one.aclose()


async def test_a_failover_goes_through_on_storage_error_then_resumes_on_the_new_master(
    sentinel_set: ThrowawaySentinel,
) -> None:
    storage = ff.RedisStorage(sentinel_set.url, prefix=unique_prefix())
    limiter = ff.RateLimiter(storage, timeout=0.5)
    app = ff.RateLimitMiddleware(echo_app, limiter=limiter, rules=[ff.Rule("/", quota="3/day")])
    transport = httpx.ASGITransport(app=app)
    async with (
        storage,
        httpx.AsyncClient(transport=transport, base_url="http://t") as client,
    ):
        before = [await client.get("/") for _ in range(4)]
        assert [r.status_code for r in before] == [200, 200, 200, 429]
        old_port = sentinel_set.master.port
        sentinel_set.master.stop()  # kill -9: the sentinel will promote the replica
        during: list[httpx.Response] = []
        new_port = None
        with anyio.fail_after(60):  # a bound, not a measurement
            while True:
                response = await client.get("/")
                during.append(response)
                decided = "ratelimit" in response.headers  # by the storage, not the policy
                if decided:
                    new_port = sentinel_set.master_port()
                    if new_port not in (None, old_port):
                        break
                await anyio.sleep(0.05)
        assert all(r.status_code in (200, 429) for r in during)  # never a 500
        assert limiter.metrics().failed_open >= 1  # the outage went through the policy
        assert new_port == sentinel_set.replica.port
        # Decisions go on against the new master: its state, its denials.
        more = [await client.get("/") for _ in range(4)]
        assert more[-1].status_code == 429 and "ratelimit" in more[-1].headers
        (status,) = await storage.status("127.0.0.1")
        assert status.denied_total >= 1
    assert our_connections(new_port) == []  # closed: nothing left open on the new master


def test_the_harness_leaves_no_process_or_directory_behind() -> None:
    with throwaway_sentinel() as group:
        processes = [group.master, group.replica, *group.sentinels]
        assert group.master_port() == group.master.port
    for process in processes:
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", process.port), 1):
            pass
        assert not process.directory.exists()


@pytest.mark.parametrize(
    ("url", "sentinels", "service", "db", "password"),
    [
        ("redis+sentinel://s1:26379/mymaster", [("s1", 26379)], "mymaster", 0, None),
        (
            "redis+sentinel://:se%40cret@s1:26379,s2:26380/cache/2",
            [("s1", 26379), ("s2", 26380)],
            "cache",
            2,
            "se@cret",
        ),
        ("redis+sentinel://[::1]:26379/m", [("::1", 26379)], "m", 0, None),
    ],
)
def test_sentinel_urls(
    url: str, sentinels: list[tuple[str, int]], service: str, db: int, password: str | None
) -> None:
    from fineflow._storage.redis.sentinel import SentinelURL

    parsed = SentinelURL.parse(url)
    assert (list(parsed.sentinels), parsed.service, parsed.db) == (sentinels, service, db)
    assert parsed.password == password
    assert isinstance(ff.storage_from_url(url), ff.RedisStorage)


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://s1:26379",  # no service
        "redis+sentinel:///m",  # no sentinel
        "redis+sentinel://s1/m",  # no port
        "redis+sentinel://s1:26379/m/x",  # not a database number
        "redis+sentinel://:hunter2@s1:26379/m/1/2",
    ],
)
def test_bad_sentinel_urls_fail_when_the_storage_is_built(url: str) -> None:
    with pytest.raises(ff.ConfigurationError, match="redis\\+sentinel://") as info:
        ff.RedisStorage(url)
    assert "hunter2" not in str(info.value)
    with pytest.raises(ff.ConfigurationError, match="drop cluster=True"):
        ff.RedisStorage("redis+sentinel://s1:26379/m", cluster=True)
