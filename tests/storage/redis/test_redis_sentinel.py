"""RedisStorage through Sentinel: a client from ``Sentinel.master_for()`` passed in (a
throwaway master and one sentinel watching it)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest
from redis.asyncio.sentinel import Sentinel
from redis_fixtures import throwaway_fixture  # noqa: F401 - the fixture throwaway

from fineflow import Hit, Quota, RedisStorage
from fineflow.testing import free_port
from fineflow.testing.redis import RedisServer, _ping

pytestmark = pytest.mark.anyio


@pytest.fixture
def sentinel(throwaway: RedisServer) -> Iterator[int]:
    """The port of a sentinel monitoring the throwaway server as master ``"m"``."""
    assert throwaway.process is not None
    directory = throwaway.process.directory
    port = free_port()
    conf = directory / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {directory}\n"
        f"sentinel monitor m 127.0.0.1 {throwaway.process.port} 1\n"
    )
    binary = shutil.which("redis-server")
    assert binary is not None
    process = subprocess.Popen(
        [binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while not _ping("127.0.0.1", port):
            assert process.poll() is None and time.monotonic() < deadline, "no sentinel"
            time.sleep(0.02)
        yield port
    finally:
        process.kill()
        process.wait(timeout=10)


async def test_decisions_through_sentinel(sentinel: int) -> None:
    sentinels = Sentinel([("127.0.0.1", sentinel)], socket_timeout=5)
    client = sentinels.master_for("m")
    try:
        async with RedisStorage(client=client) as storage:
            quota = Quota(2, 86400.0)
            got = [(await storage.decide("gcra", [Hit("s", quota)]))[0] for _ in range(3)]
            assert [d.allowed for d in got] == [True, True, False]
            (status,) = await storage.status("s")
            assert status.allowed_total == 2 and status.denied_total == 1
    finally:
        await client.aclose()
        for one in sentinels.sentinels:
            await one.aclose()
