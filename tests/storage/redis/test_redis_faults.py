"""Faults on throwaway servers: a standalone server stopped and restarted, a cluster master
killed and brought back, slots moved under the client. Failures are StorageError, so the
limiter's on_storage_error and storage breaker apply; nothing else escapes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from redis.crc import key_slot
from redis_fixtures import throwaway_fixture  # noqa: F401 - the fixture throwaway

from fineflow import Hit, Quota, RateLimiter, RedisStorage, StorageError
from fineflow.testing.redis import RedisServer, ThrowawayCluster, _cli, throwaway_cluster

pytestmark = pytest.mark.anyio

QUOTA = Quota(100, 86400.0)  # (slow: nothing drains while the test runs)


@pytest.fixture
def cluster() -> Iterator[ThrowawayCluster]:
    """A cluster of this test's own, to break (a master it kills is not taken for failed,
    nor the cluster for down, within the test)."""
    with throwaway_cluster(node_timeout=60.0) as own:
        yield own


async def test_a_stopped_server_fails_decisions_and_a_restarted_one_serves_again(
    throwaway: RedisServer,
) -> None:
    assert throwaway.process is not None
    async with RedisStorage(throwaway.url) as storage:
        allow = RateLimiter(storage, on_storage_error="allow", failure_threshold=100)
        deny = RateLimiter(storage, on_storage_error="deny", failure_threshold=100)
        assert (await allow.hit("k", QUOTA)).allowed
        throwaway.process.stop()
        with pytest.raises(StorageError, match="ConnectionError"):
            await storage.decide("gcra", [Hit("k", QUOTA)])
        assert (await allow.hit("k", QUOTA)).allowed  # failed open
        assert not (await deny.hit("k", QUOTA)).allowed  # failed closed
        assert allow.metrics().storage_errors == 1 and deny.metrics().storage_errors == 1
        with pytest.raises(StorageError):
            await storage.status("k")
        throwaway.process.start()  # empty, without the script: NOSCRIPT, loaded again
        decision = (await storage.decide("gcra", [Hit("k", QUOTA)]))[0]
        assert decision.allowed and decision.remaining == 99


def owner(cluster: ThrowawayCluster, slot: int) -> tuple[int, str]:
    """The port and node id of the master serving ``slot``."""
    for line in _cli(cluster.nodes[0].port, "cluster", "nodes").splitlines():
        (
            node_id,
            address,
            flags,
            *_,
        ) = line.split()[:3]
        for span in line.split()[8:]:
            low, _, high = span.partition("-")
            if "master" in flags and int(low) <= slot <= int(high or low):
                return int(address.split(":")[1].split("@")[0]), node_id
    raise AssertionError(f"no master for slot {slot}")


async def test_a_killed_master_fails_its_keys_until_it_is_back(cluster: ThrowawayCluster) -> None:
    async with RedisStorage(cluster.url) as storage:
        limiter = RateLimiter(storage, failure_threshold=100)
        assert (await storage.decide("gcra", [Hit("victim", QUOTA)]))[0].allowed
        port, _ = owner(cluster, key_slot(storage.names.key("victim").encode()))
        healthy, healthy_port = next(
            (f"h{i}", at)
            for i in range(10**6)
            if (at := owner(cluster, key_slot(storage.names.key(f"h{i}").encode()))[0]) != port
        )
        node = next(n for n in cluster.nodes if n.port == port)
        node.stop()
        # The healthy key's master forgets the script too (a restart, say): it is loaded
        # again there although another master is down.
        _cli(healthy_port, "script", "flush")
        # One batch over both: the dead master fails its own call only.
        victim, other = await asyncio.gather(
            storage.decide("gcra", [Hit("victim", QUOTA)]),
            storage.decide("gcra", [Hit(healthy, QUOTA)]),
            return_exceptions=True,
        )
        assert isinstance(victim, StorageError)
        assert isinstance(other, list) and other[0].allowed
        assert (await limiter.hit("victim", QUOTA)).allowed  # failed open, no 500
        assert limiter.metrics().storage_errors == 1
        node.start()
        cluster.wait_ok()
        for _ in range(3):  # the client may need a failed call to find its way back
            try:
                decision = (await storage.decide("gcra", [Hit("victim", QUOTA)]))[0]
                break
            except StorageError:
                continue
        else:
            raise AssertionError("the cluster did not serve again")
        assert decision.allowed  # (its state went with the process: no persistence here)


async def test_a_moved_slot_is_followed_and_a_half_moved_one_is_a_storage_error(
    cluster: ThrowawayCluster,
) -> None:
    async with RedisStorage(cluster.url) as storage:
        # Two keys whose hashes share a slot: one request on both is one script call.
        first = storage.names.key("mover")
        slot = key_slot(first.encode())
        other = next(
            f"m{i}" for i in range(10**6) if key_slot(storage.names.key(f"m{i}").encode()) == slot
        )
        hits = [Hit("mover", QUOTA), Hit(other, QUOTA)]
        assert [d.remaining for d in await storage.decide("gcra", hits)] == [99, 99]
        source, source_id = owner(cluster, slot)
        target = next(n.port for n in cluster.nodes if n.port != source)
        target_id = _cli(target, "cluster", "myid").strip()
        _cli(target, "cluster", "setslot", str(slot), "importing", source_id)
        _cli(source, "cluster", "setslot", str(slot), "migrating", target_id)
        # Half moved: one hash on the target, the other still on the source. The script
        # needs both: the server answers TRYAGAIN, the caller a StorageError.
        _cli(source, "migrate", "127.0.0.1", str(target), first, "0", "5000")
        with pytest.raises(StorageError):
            await storage.decide("gcra", hits)
        _cli(source, "migrate", "127.0.0.1", str(target), storage.names.key(other), "0", "5000")
        for node in cluster.nodes:
            _cli(node.port, "cluster", "setslot", str(slot), "node", target_id)
        # Moved: the client follows MOVED to the new owner, where the state went.
        assert [d.remaining for d in await storage.decide("gcra", hits)] == [98, 98]
