"""A FastAPI app under a real uvicorn: the RateLimit dependency and a middleware with a
per-request quota, both on the default storage named by FINEFLOW_STORAGE_URL."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from asgi_helpers import sf
from fineflow.testing import UvicornProcess

HERE = Path(__file__).resolve().parent


@pytest.fixture
def server() -> Iterator[UvicornProcess]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINEFLOW_")}
    env.update(FINEFLOW_STORAGE_URL="memory://", PYTHONUNBUFFERED="1")
    with UvicornProcess(
        "fastapi_uvicorn_app:create_app", factory=True, app_dir=HERE, env=env
    ) as process:
        process.wait_listening(60.0)
        yield process


def test_fastapi_route_limits_and_dynamic_quotas_under_uvicorn(server: UvicornProcess) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        search = [client.get("/search") for _ in range(3)]
        assert [r.status_code for r in search] == [200, 200, 429]
        assert sf(search[0].headers["ratelimit-policy"].encode()) == [("search", {"q": 2, "w": 60})]
        denied = search[2]
        assert denied.headers["content-type"] == "application/problem+json"
        assert denied.headers["retry-after"] == "30"
        assert denied.json()["violated-policies"] == ["search"]
        plan = [client.get("/plan") for _ in range(4)]
        assert [r.status_code for r in plan] == [200, 200, 200, 429]
        assert sf(plan[0].headers["ratelimit-policy"].encode()) == [("plan", {"q": 3, "w": 60})]
