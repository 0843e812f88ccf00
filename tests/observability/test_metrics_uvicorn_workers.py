"""A real uvicorn, scraped through ``prometheus_client.make_asgi_app()`` and parsed with
prometheus_client's parser: after a scripted burst through a ``CircuitBreakerMiddleware``
the breaker's calls, state and transitions equal what the client saw, with one worker (the
scrape-time collector) and with ``--workers 2`` (every worker's figures copied into
``PROMETHEUS_MULTIPROC_DIR``, summed by ``MultiProcessCollector``)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import anyio.to_thread
import httpx
import pytest
from obs_metrics_app import NAME
from obs_scrape import Sample, by_label, calls_by_kind, run_burst, samples

from fineflow.testing import UvicornProcess

pytestmark = pytest.mark.anyio

HERE = Path(__file__).resolve().parent
START_DEADLINE = 60.0  # seconds for uvicorn to listen (bounds a broken start)
SETTLE_DEADLINE = 20.0  # seconds for every worker's figures to reach the directory
STATE = "fineflow_circuitbreaker_state"


def serve(
    env: dict[str, str], *args: str, app: str = "obs_metrics_app:create_app"
) -> Iterator[UvicornProcess]:
    server = UvicornProcess(app, factory=True, app_dir=HERE, env=env, args=args)
    try:
        try:
            server.wait_listening(START_DEADLINE)
        except RuntimeError as exc:
            pytest.fail(str(exc))
        yield server
    finally:
        server.stop()


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def one_worker() -> Iterator[UvicornProcess]:
    yield from serve(base_env())


@pytest.fixture
def multiproc_dir(tmp_path: Path) -> Path:
    path = tmp_path / "prometheus"
    path.mkdir()
    return path


@pytest.fixture
def two_workers(multiproc_dir: Path) -> Iterator[UvicornProcess]:
    yield from serve(
        {**base_env(), "PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir)}, "--workers", "2"
    )


def scrape(client: httpx.Client) -> dict[Sample, float]:
    return samples(client.get("/metrics").text, NAME)


def wait_for(client: httpx.Client, done: object, what: str) -> dict[Sample, float]:
    """Scrape until ``done(found)`` holds (workers flush every 0.1 s); fail after a while."""
    deadline = time.monotonic() + SETTLE_DEADLINE
    while True:
        found = scrape(client)
        if done(found):  # type: ignore[operator]
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not seen within {SETTLE_DEADLINE}s; last scrape: {found}")
        time.sleep(0.1)  # waiting for other processes to flush, not moving time


def a_client(server: UvicornProcess) -> httpx.Client:
    # No keep-alive: every request is a new connection, which either worker may accept.
    limits = httpx.Limits(max_keepalive_connections=0)
    return httpx.Client(base_url=server.url, limits=limits, timeout=10)


async def burst(client: httpx.Client) -> dict[str, int]:
    async def get(path: str) -> int:
        response = await anyio.to_thread.run_sync(client.get, path)
        return response.status_code

    return dict(await run_burst(get))


async def test_one_worker_is_scraped_as_the_client_saw_it(one_worker: UvicornProcess) -> None:
    with a_client(one_worker) as client:
        seen = await burst(client)
        found = scrape(client)
    assert seen == {"successful": 10, "failed": 3, "not_permitted": 19}
    assert calls_by_kind(found) == seen
    assert by_label(found, STATE, "state")["open"] == 1
    assert sum(by_label(found, STATE, "state").values()) == 1


async def test_two_workers_sum_to_what_the_client_saw(
    two_workers: UvicornProcess, multiproc_dir: Path
) -> None:
    with a_client(two_workers) as client:
        # Both workers made their breaker and flushed it: two breakers, both closed.
        wait_for(client, lambda f: by_label(f, STATE, "state").get("closed") == 2, "2 workers")
        seen = await burst(client)
        found = wait_for(client, lambda f: calls_by_kind(f) == seen, f"calls {seen}")
    pids = {name.rsplit("_", 1)[-1] for name in os.listdir(multiproc_dir)}
    assert len(pids) == 2, sorted(os.listdir(multiproc_dir))
    assert sum(seen.values()) == 32
    assert seen.get("failed", 0) >= 3
    states = by_label(found, STATE, "state")
    assert sum(states.values()) == 2
    opened = states["open"]
    assert opened >= 1  # 12 failures in a row: a worker that got 3 of them opened
    moves = {
        (dict(labels)["from"], dict(labels)["to"]): v
        for (sample, labels), v in found.items()
        if sample == "fineflow_circuitbreaker_transitions_total"
    }
    assert moves == {("closed", "open"): opened}
