"""Every example app works in-process and serves with uvicorn when run as a script."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

import fineflow
from asgi_helpers import TestClient, sf
from fineflow import MemoryStorage
from fineflow.testing import FakeClock, free_port

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NAMES = ["raw_asgi", "starlette_app", "fastapi_app", "quart_app"]


def load(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` by path, as a fresh module."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def memory_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FINEFLOW_DSN", raising=False)


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.mark.usefixtures("memory_only")
@pytest.mark.parametrize("name", NAMES)
def test_examples_use_postgres_only_when_fineflow_dsn_is_set(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = load(name)
    assert isinstance(module.default_storage(), MemoryStorage)
    monkeypatch.setenv("FINEFLOW_DSN", "postgresql://nobody@127.0.0.1:1/nothing")
    assert isinstance(module.default_storage(), fineflow.PostgresStorage)  # no I/O yet


@pytest.mark.usefixtures("memory_only")
def test_raw_asgi_example() -> None:
    module = load("raw_asgi")
    with TestClient(module.app) as http:  # runs the lifespan the example implements
        response = http.get("/users/1")
        assert response.status_code == 200
        assert response.json() == {"path": "/users/1", "remaining": 4}
        assert http.get("/health").headers.get("ratelimit") is None
    app = module.create_app(storage=MemoryStorage(clock=FakeClock().time_ns))
    with TestClient(app) as http:
        statuses = [http.get(f"/users/{i}").status_code for i in range(6)]
        assert statuses == [200] * 5 + [429]
        denied = http.get("/users/9")
        assert denied.json()["violated-policies"] == ["global:5-per-1s"]


@pytest.mark.usefixtures("memory_only")
@pytest.mark.anyio
async def test_starlette_example() -> None:
    module = load("starlette_app")
    async with client(module.app) as http:
        first = await http.get("/api/users/1")
        assert first.status_code == 200
        assert first.json() == {"user": "1", "remaining": 9}
    async with client(module.create_app(storage=MemoryStorage(clock=FakeClock().time_ns))) as http:
        pro = {"x-api-key": "pro-key"}
        policy = sf((await http.get("/api/users/1", headers=pro)).headers["ratelimit-policy"])
        assert policy == [("api", {"q": 100, "w": 60})]
        for _ in range(10):
            assert (await http.get("/api/users/1")).status_code == 200
        denied = await http.get("/api/users/2")
        assert denied.status_code == 429
        assert denied.json()["violated-policies"] == ["api"]
        assert (await http.get("/health")).status_code == 200
        made_up = {"x-api-key": "made-up"}  # unknown keys share the caller's address bucket
        assert (await http.get("/api/users/3", headers=made_up)).status_code == 429


@pytest.mark.usefixtures("memory_only")
@pytest.mark.anyio
async def test_fastapi_example() -> None:
    module = load("fastapi_app")
    async with client(module.app) as http:
        assert (await http.get("/v1/items/3")).json() == {"item": 3}
    async with client(module.create_app(storage=MemoryStorage(clock=FakeClock().time_ns))) as http:
        first = await http.post("/v1/chat?tokens=40")
        assert first.status_code == 200
        assert first.json()["tokens"] == 40
        assert (await http.post("/v1/chat?tokens=40")).status_code == 200
        denied = await http.post("/v1/chat?tokens=40")  # 120 tokens > 100/hour for free
        assert denied.status_code == 429
        assert denied.json()["violated-policies"] == ["chat-tokens"]
        pro = await http.post("/v1/chat?tokens=40", headers={"x-api-key": "pro-key"})
        assert pro.status_code == 200


@pytest.mark.usefixtures("memory_only")
@pytest.mark.anyio
async def test_quart_example() -> None:
    module = load("quart_app")
    response = await module.app.test_client().get("/hello/world")
    assert response.status_code == 200
    assert (await response.get_json()) == {"hello": "world", "remaining": 4}
    quart_app = module.create_app(storage=MemoryStorage(clock=FakeClock().time_ns))
    test_client = quart_app.test_client()
    statuses = [(await test_client.get(f"/hello/{i}")).status_code for i in range(6)]
    assert statuses == [200] * 5 + [429]


@pytest.fixture
def served(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run ``python examples/<name>.py`` and yield its base URL once it answers."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "FINEFLOW_DSN"}
    env["PORT"] = str(port)
    src = str(EXAMPLES.parent / "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLES / f"{request.param}.py")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                assert process.stderr is not None
                pytest.fail(f"{request.param} exited: {process.stderr.read().decode()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"{request.param} did not start serving within 30 s")
                time.sleep(0.05)  # waiting for a subprocess to listen, not moving time
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stderr is not None:
            process.stderr.close()


PATHS = {
    "raw_asgi": "/users/1",
    "starlette_app": "/api/users/1",
    "fastapi_app": "/v1/items/1",
    "quart_app": "/hello/you",
}


@pytest.mark.parametrize("served", NAMES, indirect=True)
def test_examples_serve_with_uvicorn(served: str, request: pytest.FixtureRequest) -> None:
    name = request.node.callspec.params["served"]
    response = httpx.get(served + PATHS[name], timeout=10)
    assert response.status_code == 200
    assert sf(response.headers["ratelimit"].encode())


@pytest.mark.anyio
async def test_openai_client_example(capsys: pytest.CaptureFixture[str]) -> None:
    module = load("openai_client")
    await module.main()
    out = capsys.readouterr().out
    assert "'hello' -> 'You said: hello'" in out
    assert out.count("upstream answered 500") == 3
    assert "is open" in out and module.FALLBACK in out
    assert "requests the stub saw while the circuit was open: 0" in out
    stub = module.create_stub()
    registry = fineflow.BreakerRegistry(failure_threshold=1)
    async with module.serve(stub) as url, module.ChatClient(url, registry=registry) as chat:
        payload = await chat.complete("one two three")
        assert payload["object"] == "chat.completion"
        assert payload["usage"]["prompt_tokens"] == 3
        stub.state.mode = "throttle"  # a 429 is not a failure (on_throttle="ignore")
        with pytest.raises(httpx.HTTPStatusError):
            await chat.complete("again")
        (breaker,) = registry
        assert breaker.state is fineflow.CircuitState.CLOSED
        assert breaker.metrics().total_ignored == 1
