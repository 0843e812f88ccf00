"""A caller's key never reaches a log line: a planted secret-looking API key goes through the
real middleware (shadow mode, denials, storage errors failing open and closed, a breaker
around the app, the CLI's ``reset``) on real storages, with every fineflow logger and the
root logger captured at DEBUG; the key is in no formatted line, argument or extra field."""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Literal

import anyio.to_thread
import httpx
import psycopg
import pytest
from psycopg import sql

import fineflow as ff
from fineflow import cli, keys
from fineflow._asgi.types import Receive, Scope, Send
from fineflow.testing.redis import delete_prefix, shared_redis, unique_prefix

pytestmark = pytest.mark.anyio

KEY = "sk-live-PLANTED-5f3c9a7e0d2b4c6a8e1f9d3b"
CLIENT_IP = "198.51.100.23"
PLANTED = (KEY, "PLANTED-5f3c9a", CLIENT_IP)
HEADERS = {"x-api-key": KEY, "authorization": f"Bearer {KEY}"}


class Capture(logging.Handler):
    """Every record, kept with its fully formatted line (traceback and causes included)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        # The line, the arguments and every attribute (extras included), as text.
        self.lines.append(f"{self.format(record)}\n{record.args!r}\n{vars(record)!r}")

    def events(self, event: str) -> list[logging.LogRecord]:
        return [r for r in self.records if getattr(r, "event", None) == event]

    def leaks(self) -> list[str]:
        return [line for line in self.lines if any(secret in line for secret in PLANTED)]


@pytest.fixture
def captured() -> Iterator[Capture]:
    """Root and every fineflow logger at DEBUG, into one handler on the root logger."""
    capture = Capture()
    names = ["", "fineflow"] + [
        n for n in logging.root.manager.loggerDict if n.startswith("fineflow.")
    ]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
    logging.root.addHandler(capture)
    try:
        yield capture
    finally:
        logging.root.removeHandler(capture)
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    status = 500 if scope["path"].endswith("/fail") else 200
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def guarded(
    limiter: ff.RateLimiter, *, threshold: int = 2, **options: object
) -> ff.CircuitBreakerMiddleware:
    """The app behind a breaker behind the rate limits: per client address, then per API key."""
    limited = ff.RateLimitMiddleware(
        app,
        limiter=limiter,
        rules=[
            ff.Rule("/api/{rest:path}", quota="2/minute", name="per-ip"),
            ff.Rule(
                "/api/{rest:path}", quota="3/minute", name="per-key", key=keys.header("x-api-key")
            ),
        ],
        **options,  # type: ignore[arg-type]
    )
    return ff.CircuitBreakerMiddleware(
        limited,
        breaker=ff.CircuitBreaker(f"upstream-{secrets.token_hex(3)}", failure_threshold=threshold),
    )


async def send_requests(asgi: object, paths: list[str]) -> list[int]:
    transport = httpx.ASGITransport(app=asgi, client=(CLIENT_IP, 40000))  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return [(await client.get(path, headers=HEADERS)).status_code for path in paths]


@pytest.fixture(params=["postgres", "redis", "memory"])
async def storage(
    request: pytest.FixtureRequest, pg_dsn: str, pg_schema: str
) -> AsyncIterator[ff.Storage]:
    if request.param == "postgres":
        async with ff.PostgresStorage(pg_dsn, schema=pg_schema) as pg:
            await pg.migrate()
            yield pg
    elif request.param == "redis":
        url, prefix = shared_redis().url, unique_prefix()
        async with ff.RedisStorage(url, prefix=prefix) as redis:
            yield redis
        await delete_prefix(url, prefix)
    else:
        yield ff.MemoryStorage()


@pytest.mark.parametrize("shadow", [True, False])
async def test_shadow_mode_and_denials_log_digests_not_keys(
    storage: ff.Storage, shadow: bool, captured: Capture
) -> None:
    asgi = guarded(ff.RateLimiter(storage, timeout=2.0), shadow=shadow, log_denied=True)
    statuses = await send_requests(asgi, ["/api/items"] * 4 + ["/api/fail"] * 3)
    if shadow:  # never denied; the failing route opens the breaker (503)
        assert statuses == [200] * 4 + [500, 500, 503]
    else:
        assert statuses == [200, 200] + [429] * 5
    event = "ratelimit_shadow_denied" if shadow else "ratelimit_denied"
    denied = captured.events(event)
    assert len(denied) == (4 if shadow else 5)  # (the open breaker turned the last one away)
    assert {r.key_digest for r in denied} == {keys.digest(CLIENT_IP)}  # type: ignore[attr-defined]
    assert {(r.rule, r.policy, r.method) for r in denied} == {("per-ip", "2-per-60s", "GET")}  # type: ignore[attr-defined]
    if shadow:
        assert [r.to_state for r in captured.events("circuit_breaker_transition")] == ["open"]  # type: ignore[attr-defined]
    assert captured.leaks() == []


@pytest.fixture
async def refusing_storage(pg_dsn: str, pg_schema: str) -> AsyncIterator[ff.PostgresStorage]:
    """A real PostgreSQL storage whose table refuses the planted key: every decision for it
    fails with an error whose DETAIL quotes the row, key included."""
    async with ff.PostgresStorage(pg_dsn, schema=pg_schema) as pg:
        await pg.migrate()
        async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
            await conn.execute(
                sql.SQL(
                    "ALTER TABLE {}.buckets ADD CONSTRAINT no_live CHECK (key NOT LIKE 'sk-%')"
                ).format(sql.Identifier(pg_schema))
            )
        yield pg


async def test_the_provoked_storage_error_quotes_the_key_in_its_detail(
    refusing_storage: ff.PostgresStorage,
) -> None:
    """The error the next test provokes does carry the key (so that test can fail), on the
    driver's error only; fineflow's StorageError leaves the row out."""
    with pytest.raises(ff.StorageError) as raised:
        await refusing_storage.decide("gcra", [ff.Hit(KEY, ff.Quota.parse("5/minute"))])
    cause = raised.value.__cause__
    assert isinstance(cause, psycopg.errors.CheckViolation)
    assert KEY in (cause.diag.message_detail or "")
    assert KEY not in str(raised.value)


@pytest.mark.parametrize("policy", ["allow", "deny"])
async def test_storage_errors_log_no_key(
    refusing_storage: ff.PostgresStorage,
    policy: Literal["allow", "deny"],
    captured: Capture,
) -> None:
    limiter = ff.RateLimiter(refusing_storage, on_storage_error=policy, timeout=2.0)
    asgi = guarded(limiter, threshold=10, log_denied=True)  # (a 503 counts as a failure)
    statuses = await send_requests(asgi, ["/api/items"] * 5)
    assert statuses == ([200] * 5 if policy == "allow" else [503] * 5)
    [failed] = captured.events("ratelimit_storage_failed")
    assert "check constraint" in failed.error  # type: ignore[attr-defined]
    assert failed.storage == "PostgresStorage"  # type: ignore[attr-defined]
    assert [r.breaker for r in captured.events("circuit_breaker_transition")] == [  # type: ignore[attr-defined]
        "fineflow-storage"
    ]
    if policy == "deny":
        reasons = {r.reason for r in captured.events("ratelimit_denied")}  # type: ignore[attr-defined]
        assert reasons == {"storage unavailable"}
    assert captured.leaks() == []


async def test_the_cli_reset_of_a_key_logs_no_key(
    pg_dsn: str, pg_schema: str, captured: Capture, capsys: pytest.CaptureFixture[str]
) -> None:
    async with ff.PostgresStorage(pg_dsn, schema=pg_schema) as pg:
        await pg.migrate()
        await ff.RateLimiter(pg).hit(KEY, "5/minute", endpoint="api")
    argv = ["reset", KEY, "--dsn", pg_dsn, "--schema", pg_schema]
    assert await anyio.to_thread.run_sync(cli.main, argv) == 0
    assert "1" in capsys.readouterr().out  # one entry removed (printed for the operator)
    assert captured.leaks() == []
