"""A real uvicorn serving ``obs_ratelimit_app``, scraped through prometheus_client's
``make_asgi_app()`` and parsed with its own parser: after a scripted burst the rate-limit
decisions equal what the client saw, by rule, tier and outcome, with a ``MemoryStorage`` and
a ``PostgresStorage`` (whose round trips are counted too), and with ``--workers 2`` (each
worker's figures copied into ``PROMETHEUS_MULTIPROC_DIR``, summed by
``MultiProcessCollector``)."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import anyio.to_thread
import httpx
import pytest
from obs_ratelimit_burst import BURST, Key, decisions, pool_samples, run_burst, storage_samples
from test_metrics_uvicorn_workers import a_client, base_env, serve

from fineflow.testing import UvicornProcess

pytestmark = pytest.mark.anyio

SETTLE_DEADLINE = 20.0  # seconds for every worker's figures to reach the directory

#: One worker, one storage: what the burst must give (3 free and 5 pro on /tiered, 12 in
#: all; the shadow rule admits 2 of 4).
ONE_WORKER: Counter[Key] = Counter(
    {
        ("shadow", "", "allowed"): 2,
        ("shadow", "", "shadow_denied"): 2,
        ("tiered", "free", "allowed"): 3,
        ("tiered", "free", "denied"): 2,
        ("tiered", "pro", "allowed"): 5,
        ("tiered", "pro", "denied"): 2,
        ("global", "pro", "allowed"): 9,
        ("global", "pro", "denied"): 2,
        ("global", "free", "allowed"): 5,
        ("global", "free", "denied"): 4,
    }
)


def postgres_env(pg_dsn: str, pg_schema: str) -> dict[str, str]:
    return {**base_env(), "OBS_DSN": pg_dsn, "OBS_SCHEMA": pg_schema}


@contextlib.contextmanager
def serve_app(env: dict[str, str], *args: str) -> Iterator[UvicornProcess]:
    yield from serve(env, *args, app="obs_ratelimit_app:create_app")


async def burst(client: httpx.Client) -> Counter[Key]:
    async def get(path: str, tier: str) -> tuple[int, bytes]:
        response = await anyio.to_thread.run_sync(
            lambda: client.get(path, headers={"x-tier": tier})
        )
        return response.status_code, response.content

    return await run_burst(get)


def scrape(client: httpx.Client) -> str:
    return client.get("/metrics").text


async def test_memory_storage_one_worker() -> None:
    with serve_app(base_env()) as server, a_client(server) as client:
        seen = await burst(client)
        text = scrape(client)
    assert seen == ONE_WORKER
    assert decisions(text) == seen
    assert storage_samples(text, "memory") == {}  # nothing to report: no round trips


async def test_postgres_storage_one_worker(pg_dsn: str, pg_schema: str) -> None:
    with serve_app(postgres_env(pg_dsn, pg_schema)) as server, a_client(server) as client:
        seen = await burst(client)
        text = scrape(client)
    assert seen == ONE_WORKER
    assert decisions(text) == seen
    pg = storage_samples(text, "postgres")
    # One request at a time: every decision of the outer middleware is one round trip.
    assert pg["fineflow_storage_batch_size_count"] == len(BURST)
    assert pg["fineflow_storage_batch_size_sum"] == len(BURST)
    assert pg["fineflow_storage_batch_size_bucket{1.0}"] == len(BURST)
    assert pg["fineflow_storage_round_trip_seconds_count"] == len(BURST)
    assert pg["fineflow_storage_round_trip_seconds_bucket{+Inf}"] == len(BURST)
    assert pg["fineflow_storage_round_trip_seconds_sum"] > 0
    assert pg["fineflow_storage_errors_total"] == pg["fineflow_storage_timeouts_total"] == 0
    pool = pool_samples(text)
    assert pool["fineflow_postgres_pool_size"] >= 1
    assert pool["fineflow_postgres_pool_requests_total"] >= 1  # the migration's, at least


async def test_postgres_storage_two_workers(pg_dsn: str, pg_schema: str, tmp_path: Path) -> None:
    directory = tmp_path / "prometheus"
    directory.mkdir()
    env = {**postgres_env(pg_dsn, pg_schema), "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    with serve_app(env, "--workers", "2") as server, a_client(server) as client:
        seen = await burst(client)
        expected = dict(seen)
        text = wait_for(client, lambda t: decisions(t) == expected, f"decisions {seen}")
    # One limit shared through PostgreSQL: the same decisions as one worker; the shadow
    # rule's memory storage is per worker, so it admits 2 of 4 in each.
    assert {k: v for k, v in seen.items() if k[0] != "shadow"} == {
        k: v for k, v in ONE_WORKER.items() if k[0] != "shadow"
    }
    assert seen["shadow", "", "allowed"] + seen["shadow", "", "shadow_denied"] == 4
    assert len({path.stem.rsplit("_", 1)[-1] for path in directory.iterdir()}) == 2
    pg = storage_samples(text, "postgres")
    assert pg["fineflow_storage_batch_size_sum"] == len(BURST)
    assert pg["fineflow_storage_round_trip_seconds_count"] == len(BURST)


def wait_for(client: httpx.Client, done: object, what: str) -> str:
    """Scrape until ``done(text)`` holds (workers flush every 0.1 s); fail after a while."""
    deadline = time.monotonic() + SETTLE_DEADLINE
    while True:
        text = scrape(client)
        if done(text):  # type: ignore[operator]
            return text
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not seen within {SETTLE_DEADLINE}s; last: {decisions(text)}")
        time.sleep(0.1)  # waiting for other processes to flush, not moving time
