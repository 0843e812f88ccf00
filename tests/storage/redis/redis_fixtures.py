"""Fixtures of the Redis tests (imported by each module: a second conftest.py would be a
second module named ``conftest`` to mypy): the shared server (env, local or throwaway), the shared
throwaway cluster, and storages with a key prefix of their own."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from fineflow import RedisStorage
from fineflow.testing.redis import (
    RedisServer,
    ThrowawayCluster,
    delete_prefix,
    shared_cluster,
    shared_redis,
    throwaway_server,
    unique_prefix,
)


@pytest.fixture(scope="session", name="redis_server")
def redis_server_fixture() -> RedisServer:
    """The Redis server of this session (never FLUSHed: tests use their own prefixes)."""
    return shared_redis()


@pytest.fixture(scope="session", name="redis_cluster")
def redis_cluster_fixture() -> ThrowawayCluster:
    """A throwaway three-master Redis Cluster for this session."""
    return shared_cluster()


@pytest.fixture(name="throwaway")
def throwaway_fixture() -> Iterator[RedisServer]:
    """A redis-server of this test's own, to stop, restart, pause."""
    server = throwaway_server()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(name="redis_storage")
async def redis_storage_fixture(redis_server: RedisServer) -> AsyncIterator[RedisStorage]:
    """A RedisStorage on the shared server, with a prefix of its own (removed afterwards)."""
    prefix = unique_prefix()
    async with RedisStorage(redis_server.url, prefix=prefix) as storage:
        yield storage
    await delete_prefix(redis_server.url, prefix)


@pytest.fixture(name="cluster_storage")
async def cluster_storage_fixture(redis_cluster: ThrowawayCluster) -> AsyncIterator[RedisStorage]:
    """A RedisStorage on the shared throwaway cluster."""
    async with RedisStorage(redis_cluster.url, prefix=unique_prefix()) as storage:
        yield storage
