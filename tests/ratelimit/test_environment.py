"""The off switch (``enabled=False``, ``FINEFLOW_ENABLED``) and the default storage
(``FINEFLOW_STORAGE_URL``, ``FINEFLOW_DSN``), as a user's app sees them."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_helpers import RecordingStorage, TestClient, call, echo_app, http_scope
from fineflow import (
    ConfigurationError,
    MemoryStorage,
    PostgresStorage,
    RateLimiter,
    RateLimitMiddleware,
    RedisStorage,
    Rule,
)

pytestmark = pytest.mark.anyio

ENV = ("FINEFLOW_ENABLED", "FINEFLOW_STORAGE_URL", "FINEFLOW_DSN")
RULES = [Rule("/hello", quota="1/minute", name="hello")]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


async def hello(request: Request) -> Response:
    return PlainTextResponse(repr("fineflow" in request.scope.get("state", {})))


def create_app(**options: Any) -> Starlette:
    return Starlette(
        routes=[Route("/hello", hello)],
        middleware=[Middleware(RateLimitMiddleware, rules=RULES, **options)],
    )


async def test_enabled_false_passes_every_request_through_untouched() -> None:
    storage = RecordingStorage()
    app = create_app(storage=storage, enabled=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        responses = [await client.get("/hello") for _ in range(3)]
    assert [r.status_code for r in responses] == [200] * 3
    assert all("ratelimit" not in r.headers for r in responses)
    assert responses[0].text == "False"  # no decision in the scope state
    assert storage.calls == []  # the owned storage was never opened


@pytest.mark.parametrize("value", ["0", "false", "OFF", " no "])
def test_fineflow_enabled_0_read_when_the_app_is_built(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    storage = RecordingStorage()
    monkeypatch.setenv("FINEFLOW_ENABLED", value)
    app = create_app(storage=storage)
    with TestClient(app) as client:  # (Starlette builds its middleware on startup)
        monkeypatch.delenv("FINEFLOW_ENABLED")  # read once: changing it later changes nothing
        assert [client.get("/hello").status_code for _ in range(3)] == [200] * 3
    assert storage.calls == []  # lifespan passed through: not opened, not closed
    assert RateLimitMiddleware(echo_app, storage=MemoryStorage(), rules=RULES).enabled


@pytest.mark.parametrize("value", ["1", "true", "on", ""])
async def test_fineflow_enabled_on_values_leave_limits_on(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("FINEFLOW_ENABLED", value)
    mw = RateLimitMiddleware(echo_app, storage=MemoryStorage(), rules=RULES)
    assert [(await call(mw, http_scope("/hello"))).status for _ in range(2)] == [200, 429]


async def test_the_switch_turns_limits_off_never_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINEFLOW_ENABLED", "1")
    mw = RateLimitMiddleware(echo_app, storage=MemoryStorage(), rules=RULES, enabled=False)
    assert not mw.enabled
    assert (await call(mw, http_scope("/hello"))).header(b"ratelimit") is None


def test_a_fineflow_enabled_typo_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FINEFLOW_ENABLED", "flase")
    with pytest.raises(ConfigurationError, match=r"FINEFLOW_ENABLED='flase'.*set it to 0"):
        RateLimitMiddleware(echo_app, storage=MemoryStorage(), rules=RULES)


def test_disabled_needs_no_storage_in_the_environment() -> None:
    mw = RateLimitMiddleware(echo_app, rules=RULES, enabled=False)
    assert not mw.enabled


def test_no_storage_and_no_environment_says_what_to_set() -> None:
    with pytest.raises(ConfigurationError) as raised:
        RateLimitMiddleware(echo_app, rules=RULES)
    message = str(raised.value)
    assert "FINEFLOW_STORAGE_URL" in message
    assert "FINEFLOW_DSN" in message
    assert "storage=" in message


def test_the_default_storage_from_fineflow_storage_url_is_owned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FINEFLOW_STORAGE_URL", "memory://")
    monkeypatch.setenv("FINEFLOW_DSN", "postgresql://ignored.invalid/db")
    with TestClient(create_app()) as client:
        assert [client.get("/hello").status_code for _ in range(2)] == [200, 429]
    monkeypatch.setenv("FINEFLOW_STORAGE_URL", "redis://127.0.0.1:6379/0")
    mw = RateLimitMiddleware(echo_app, rules=RULES)
    assert isinstance(mw.limiter.storage, RedisStorage)


def test_the_default_storage_from_fineflow_dsn_is_postgres(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FINEFLOW_DSN", "postgresql://app@db.invalid/app")
    mw = RateLimitMiddleware(echo_app, rules=RULES)  # no I/O until lifespan or a request
    assert isinstance(mw.limiter.storage, PostgresStorage)


def test_a_bad_fineflow_storage_url_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FINEFLOW_STORAGE_URL", "mysql://db/app")
    with pytest.raises(ConfigurationError, match="unsupported storage URL"):
        RateLimitMiddleware(echo_app, rules=RULES)


def test_a_limiter_given_in_code_wins_over_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FINEFLOW_STORAGE_URL", "mysql://db/app")
    limiter = RateLimiter(MemoryStorage())
    assert RateLimitMiddleware(echo_app, limiter=limiter, rules=RULES).limiter is limiter
