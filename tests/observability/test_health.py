"""ff.health_app: 200 / 503 with JSON from real storages (PostgreSQL, Redis, memory; a
throwaway PostgreSQL that is stopped) and breakers' states, through httpx's ASGI transport."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx
import psycopg
import pytest
from psycopg import sql

import fineflow as ff
from fineflow._asgi.types import Message
from fineflow._health import masked
from fineflow.testing import ThrowawayCluster, find_postgres_bindir
from fineflow.testing.redis import shared_redis

pytestmark = pytest.mark.anyio

PASSWORD = "PLANTED-pw-7c1e"


async def get(app: Any, method: str = "GET") -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://probe") as client:
        return await client.request(method, "/ready")


@pytest.fixture
async def postgres(pg_dsn: str, pg_schema: str) -> AsyncIterator[ff.PostgresStorage]:
    async with ff.PostgresStorage(pg_dsn, schema=pg_schema) as pg:
        await pg.migrate()
        yield pg


async def test_a_schema_never_migrated_is_unhealthy_and_says_what_to_do(
    pg_dsn: str, pg_schema: str
) -> None:
    async with ff.PostgresStorage(pg_dsn, schema=pg_schema) as pg:
        app = ff.health_app(storages={"rate-limits": pg})
        response = await get(app)
        assert response.status_code == 503  # every decision would fail
        [entry] = response.json()["storages"]
        assert entry["healthy"] is False
        assert entry["error"] == (
            f"schema {pg_schema!r} is not migrated: run `fineflow migrate` or "
            "`await storage.migrate()`"
        )
        await pg.migrate()
        assert (await get(app)).status_code == 200


async def test_a_least_privilege_runtime_role_is_healthy(pg_dsn: str, pg_schema: str) -> None:
    role = f"ff_rt_{secrets.token_hex(4)}"
    try:
        async with ff.PostgresStorage(pg_dsn, schema=pg_schema) as admin:
            await admin.migrate()
            await admin.grant_runtime(role, create=True)
        runtime_dsn = psycopg.conninfo.make_conninfo(pg_dsn, user=role)
        async with ff.PostgresStorage(runtime_dsn, schema=pg_schema) as runtime:
            health = await runtime.health()
            assert (health.healthy, health.error) == (True, None)  # no table read needed
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


@pytest.fixture
async def redis() -> AsyncIterator[ff.RedisStorage]:
    async with ff.RedisStorage(shared_redis().url, prefix="ff-health") as storage:
        yield storage


async def test_healthy_storages_answer_200_with_a_report(
    postgres: ff.PostgresStorage, redis: ff.RedisStorage
) -> None:
    app = ff.health_app(storages=[postgres, redis, ff.MemoryStorage(), ff.MemoryStorage()])
    response = await get(app)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    report = response.json()
    assert report["status"] == "pass"
    assert report["breakers"] == []
    assert [(s["name"], s["backend"], s["healthy"]) for s in report["storages"]] == [
        ("postgres", "postgres", True),
        ("redis", "redis", True),
        ("memory", "memory", True),
        ("memory-2", "memory", True),
    ]
    assert all(s["latency_ms"] >= 0 and "error" not in s for s in report["storages"])


async def test_head_has_the_status_and_no_body_other_methods_get_405(
    postgres: ff.PostgresStorage,
) -> None:
    app = ff.health_app(storages={"primary": postgres})
    head = await get(app, "HEAD")
    assert (head.status_code, head.content) == (200, b"")
    assert int(head.headers["content-length"]) == len((await get(app)).content)
    for method in ("POST", "PUT", "DELETE"):
        refused = await get(app, method)
        assert refused.status_code == 405
        assert refused.headers["allow"] == "GET, HEAD"


@pytest.fixture(scope="module")
def cluster() -> Iterator[ThrowawayCluster]:
    if find_postgres_bindir() is None:
        pytest.fail("this test needs PostgreSQL server binaries (initdb, pg_ctl) on this machine")
    with ThrowawayCluster.create() as c:
        yield c


async def test_a_stopped_postgres_answers_503_without_the_password(
    cluster: ThrowawayCluster,
) -> None:
    dsn = f"{cluster.dsn} password={PASSWORD}"
    async with ff.PostgresStorage(dsn, schema="ff_health", connect_timeout=1) as pg:
        await pg.migrate()
        app = ff.health_app(storages={"rate-limits": pg}, timeout=1.0)
        assert (await get(app)).status_code == 200
        cluster.stop("immediate")
        try:
            response = await get(app)
        finally:
            cluster.start()
        assert response.status_code == 503
        [entry] = response.json()["storages"]
        assert (entry["name"], entry["healthy"]) == ("rate-limits", False)
        assert entry["error"]
        assert response.json()["status"] == "fail"
        assert PASSWORD not in response.text
        # Reported only, when storages are not critical (the limiter fails open).
        relaxed = ff.health_app(storages={"rate-limits": pg}, critical_storages=False)
        cluster.stop("immediate")
        try:
            response = await get(relaxed)
        finally:
            cluster.start()
        assert (response.status_code, response.json()["status"]) == (200, "warn")


async def test_unreachable_and_closed_storages_are_unhealthy_without_credentials() -> None:
    redis = ff.RedisStorage(f"redis://:{PASSWORD}@127.0.0.1:1/0", connect_timeout=0.5)
    memory = ff.MemoryStorage()
    await memory.close()
    async with redis:
        app = ff.health_app(storages=[redis, memory, ff.PostgresStorage("dbname=never_opened")])
        response = await get(app)
    assert response.status_code == 503
    report = response.json()
    assert [(s["name"], s["healthy"]) for s in report["storages"]] == [
        ("redis", False),
        ("memory", False),
        ("postgres", False),
    ]
    assert report["storages"][1]["error"] == report["storages"][2]["error"] == "not open"
    assert PASSWORD not in response.text


class Hanging:
    """A storage whose health check never answers (a custom storage, badly written)."""

    async def health(self, *, timeout: float = 1.0) -> ff.StorageHealth:  # noqa: ASYNC109
        await anyio.sleep_forever()
        raise AssertionError("unreachable")


class Raising:
    async def health(self, *, timeout: float = 1.0) -> ff.StorageHealth:  # noqa: ASYNC109
        raise RuntimeError("health broke")


async def test_a_hanging_or_raising_health_check_is_a_failed_one() -> None:
    app = ff.health_app(storages={"hangs": Hanging(), "raises": Raising()}, timeout=0.05)
    response = await get(app)
    assert response.status_code == 503
    errors = {s["name"]: s["error"] for s in response.json()["storages"]}
    assert errors == {"hangs": "no answer within 0.05s", "raises": "RuntimeError: health broke"}


async def test_open_breakers_are_reported_and_fail_only_when_critical() -> None:
    registry = ff.BreakerRegistry()
    payments = registry.get_or_create("payments", failure_threshold=1, reset_timeout=30.0)
    registry.get_or_create("search")
    with pytest.raises(ZeroDivisionError):
        await payments.call(lambda: 1 / 0)
    assert payments.state is ff.CircuitState.OPEN
    spare = ff.CircuitBreaker("spare")
    spare.force_open()

    default = await get(ff.health_app(registry=registry, breakers=[spare, payments]))
    assert default.status_code == 200
    report = default.json()
    assert report["status"] == "warn"
    states = {b["name"]: (b["state"], b["critical"]) for b in report["breakers"]}
    assert states == {
        "spare": ("forced_open", False),
        "payments": ("open", False),
        "search": ("closed", False),
    }
    assert [b["name"] for b in report["breakers"]] == ["spare", "payments", "search"]
    assert 0 < next(b for b in report["breakers"] if b["name"] == "payments")["retry_after"] <= 30

    critical = await get(ff.health_app(registry=registry, critical_breakers=["payments"]))
    assert (critical.status_code, critical.json()["status"]) == (503, "fail")
    only_forced = ff.health_app(
        registry=registry, critical_breakers=True, unhealthy_states=["forced_open"]
    )
    assert (await get(only_forced)).json()["status"] == "pass"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"storages": [object()]}, "has no health"),
        ({"storages": "postgres"}, "storages must be"),
        ({"timeout": 0}, "timeout"),
        ({"unhealthy_states": ["broken"]}, "unhealthy_states"),
        ({"critical_breakers": "payments"}, "critical_breakers"),
        ({"breakers": ["payments"]}, "CircuitBreaker"),
        ({"registry": {}}, "BreakerRegistry"),
    ],
)
def test_bad_options_fail_at_configuration(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ff.ConfigurationError, match=message):
        ff.health_app(**options)


async def test_lifespan_is_acknowledged_and_websockets_refused() -> None:
    app = ff.health_app()
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    await app({"type": "lifespan"}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    sent.clear()
    await app({"type": "websocket", "path": "/ready"}, receive, send)
    assert sent == [{"type": "websocket.close", "code": 1008}]


def test_credentials_in_error_texts_are_masked() -> None:
    assert masked(f"postgresql://app:{PASSWORD}@db:5432/x refused") == (
        "postgresql://app:***@db:5432/x refused"
    )
    assert masked(f"host=db password={PASSWORD} dbname=x") == "host=db password=*** dbname=x"
    assert masked("redis://:s3cr@t@cache:6379/0 down") == "redis://:***@cache:6379/0 down"
    assert masked("host=db password='my secret \\' pw' dbname=x") == (
        "host=db password=*** dbname=x"
    )
    assert json.dumps(masked("no credentials here")) == '"no credentials here"'
