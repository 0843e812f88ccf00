"""The storage conformance suite (:mod:`fineflow.testing.conformance`, public so that a
third-party storage can run it too) over every storage fineflow ships: memory; PostgreSQL on
a real server, logged, unlogged, and with the lone-request fast path turned off so requests
go through the general batch statement (``decide()``), the grouped single-quota one
(``hit_many()``) or the one for batches sharing one quota (``hit_keys()``); Redis standalone
and a three-master Redis Cluster."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest

from fineflow import MemoryStorage, PostgresStorage, RedisStorage, Storage
from fineflow.testing.conformance import T0, StatsConformance, StorageConformance
from fineflow.testing.redis import delete_prefix, shared_cluster, shared_redis, unique_prefix

# Which statements each PostgreSQL variant may use: lone requests go through the batch
# statements unless "hit" is there; "hit_keys", "hit_many" or, with neither, decide().
FAST_PATHS = {
    "logged": {"hit", "hit_keys", "hit_many"},
    "unlogged": {"hit", "hit_keys", "hit_many"},
    "batch": set(),
    "grouped": {"hit_many"},
    "keys": {"hit_keys", "hit_many"},
}


class TestMemoryStorage(StorageConformance, StatsConformance):
    @pytest.fixture
    async def storage(self) -> AsyncIterator[Storage]:
        async with MemoryStorage(clock=lambda: T0) as memory:
            yield memory


class TestPostgresStorage(StorageConformance, StatsConformance):
    @pytest.fixture(params=list(FAST_PATHS))
    async def storage(self, request: pytest.FixtureRequest, pg_dsn: str) -> AsyncIterator[Storage]:
        variant = request.param
        schema = f"ff_{secrets.token_hex(6)}"
        pg = PostgresStorage(
            pg_dsn, schema=schema, unlogged=variant == "unlogged", fast_paths=FAST_PATHS[variant]
        )
        async with pg:
            await pg.migrate()
            yield pg

    def arrival_order(self, storage: Storage) -> None:
        # With one statement in flight the serial order is the arrival order; with more, two
        # statements may reach the database in either order (still some serial order).
        assert isinstance(storage, PostgresStorage)
        storage.max_in_flight = 1


class TestRedisStorage(StorageConformance, StatsConformance):
    # Redis expires state by itself (PEXPIRE): its cleanup() has nothing to do and returns 0.
    expires_by_itself = True
    counts_keys = False  # (it would take a scan)

    @pytest.fixture(params=["standalone", "cluster"])
    async def storage(self, request: pytest.FixtureRequest) -> AsyncIterator[Storage]:
        cluster = request.param == "cluster"
        url = shared_cluster().url if cluster else shared_redis().url
        prefix = unique_prefix()
        async with RedisStorage(url, prefix=prefix) as redis_storage:
            yield redis_storage
        if not cluster:
            await delete_prefix(url, prefix)
