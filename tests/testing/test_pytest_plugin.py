"""fineflow's pytest plugin, as a user meets it: a test file of theirs, run by pytest in a
subprocess, with the fixtures coming from the installed entry point alone (no conftest)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

USER_TESTS = """
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

import fineflow as ff


def app_with(limiter):
    async def hello(request):
        return PlainTextResponse("hi")

    app = Starlette(routes=[Route("/", hello)])
    return ff.RateLimitMiddleware(app, limiter=limiter, rules=[ff.Rule("/", quota="2/minute")])


def test_sync_client_and_fake_time(ff_limiter, ff_clock):
    with TestClient(app_with(ff_limiter)) as client:
        assert [client.get("/").status_code for _ in range(3)] == [200, 200, 429]
        ff_clock.advance(30)
        assert client.get("/").status_code == 200


@pytest.mark.anyio
async def test_async_limiter(ff_limiter, ff_clock):
    quota = ff.Quota.parse("1/second")
    assert (await ff_limiter.hit("k", quota)).allowed
    assert not (await ff_limiter.hit("k", quota)).allowed
    ff_clock.advance(1)
    assert (await ff_limiter.hit("k", quota)).allowed


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_postgres(ff_postgres_dsn):
    async with ff.PostgresStorage(ff_postgres_dsn, schema="plugin_test") as storage:
        await storage.migrate()
        limiter = ff.RateLimiter(storage)
        decisions = [await limiter.hit("k", "2/minute") for _ in range(3)]
        assert [d.allowed for d in decisions] == [True, True, False]
"""


def test_a_user_test_file_gets_the_fixtures(tmp_path: Path) -> None:
    (tmp_path / "test_user.py").write_text(USER_TESTS)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_user.py"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout, result.stdout


def test_the_plugin_is_registered_by_its_entry_point() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--fixtures", "-q", "-p", "no:cacheprovider"],
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    for name in ("ff_clock", "ff_limiter", "ff_postgres_dsn"):
        assert name in result.stdout, result.stdout[-2000:]
