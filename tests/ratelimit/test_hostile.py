"""Hostile input: scopes, headers and keys a caller controls never break fineflow.

* Hypothesis-generated ASGI scopes (arbitrary bytes in header names and values, huge and
  many headers, many ``X-Forwarded-For`` hops, malformed ``Forwarded``, missing or odd
  ``client``, odd methods and paths, websocket scopes) go through ``RateLimitMiddleware``
  (memory storage) and ``CircuitBreakerMiddleware``, alone and stacked both ways, in front
  of an app that always answers 200: no exception escapes and nothing answers 500.
* Keys of any length and bytes reach PostgreSQL at a bounded size (hashed when long or
  odd) and still identify their caller; a flood of distinct keys is entirely reclaimed by
  ``cleanup()``; memory storage and the breaker registry stay within their bounds.
* Configuration mistakes fail when the app is built, with a message that shows the fix.
"""

from __future__ import annotations

import itertools
import secrets
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fineflow import (
    BreakerRegistry,
    CircuitBreaker,
    CircuitBreakerMiddleware,
    ConfigurationError,
    Hit,
    MemoryStorage,
    PostgresStorage,
    Quota,
    RateLimiter,
    RateLimitMiddleware,
    Rule,
    StorageError,
    keys,
)
from fineflow._asgi.types import ASGIApp, Message, Receive, Scope, Send
from fineflow._storage.base import MAX_KEY_BYTES, storage_key
from fineflow.testing import FakeClock

TRUSTED = ["10.0.0.0/8", "::1", "192.168.0.0/16"]
MISSING = object()  # a scope entry left out altogether

# -- the app behind the middlewares ------------------------------------------------------


async def inner_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers every request 200 and accepts every websocket: anything else is fineflow's."""
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": 1000})
        return
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"x-app", b"1")]})
    await send({"type": "http.response.body", "body": b"ok"})


def rate_limited(app: ASGIApp, **options: Any) -> RateLimitMiddleware:
    options.setdefault("key", keys.first(keys.header("x-api-key"), keys.client_ip(TRUSTED)))
    options.setdefault("tier", keys.header("x-tier"))
    return RateLimitMiddleware(
        app,
        storage=MemoryStorage(clock=FakeClock().time_ns, max_keys=500),
        rules=[
            Rule("/{p:path}", quota="2/minute"),
            Rule("/api/*", tiers={"free": "1/minute", "pro": ["5/minute", "50/hour"]}),
            Rule("/users/{id:int}", methods=["POST", "get"], quota="3/minute;burst=2"),
        ],
        exempt_paths=["/health", "/static/*"],
        **options,
    )


def stacks() -> dict[str, tuple[ASGIApp, frozenset[int]]]:
    """Each stack under test and the statuses it may answer (never 500)."""
    return {
        "rate-limit": (rate_limited(inner_app), frozenset({200, 429})),
        "rate-limit forwarded, legacy headers": (
            rate_limited(
                inner_app,
                key=keys.client_ip(TRUSTED, header="forwarded", fallback=None),
                headers="legacy",
                headers_for=lambda scope: bool(keys.header("authorization")(scope)),
            ),
            frozenset({200, 429}),
        ),
        "breaker per path": (
            CircuitBreakerMiddleware(inner_app, max_keys=50, state_header="x-circuit"),
            frozenset({200}),
        ),
        "one breaker": (
            CircuitBreakerMiddleware(inner_app, breaker=CircuitBreaker("one")),
            frozenset({200}),
        ),
        "rate-limit(breaker(app))": (
            rate_limited(CircuitBreakerMiddleware(inner_app, max_keys=50)),
            frozenset({200, 429}),
        ),
        "breaker(rate-limit(app))": (
            CircuitBreakerMiddleware(rate_limited(inner_app), max_keys=50),
            frozenset({200, 429}),
        ),
    }


async def drive(app: ASGIApp, scope: Scope) -> list[Message]:
    """Run one connection through ``app``; return every message it sent."""
    sent: list[Message] = []
    incoming: Iterator[Message]
    if scope["type"] == "websocket":
        incoming = iter([{"type": "websocket.connect"}])
        done: Message = {"type": "websocket.disconnect", "code": 1000}
    else:
        incoming = iter([{"type": "http.request", "body": b"x" * 10, "more_body": False}])
        done = {"type": "http.disconnect"}

    async def receive() -> Message:
        return next(incoming, done)

    async def send(message: Message) -> None:
        sent.append(message)

    await app(dict(scope), receive, send)
    return sent


def check_http(messages: list[Message], statuses: frozenset[int]) -> None:
    starts = [m for m in messages if m["type"] == "http.response.start"]
    assert len(starts) == 1, messages
    assert starts[0]["status"] in statuses, starts[0]
    for name, value in starts[0].get("headers", ()):
        assert isinstance(name, bytes) and isinstance(value, bytes)
        assert b"\r" not in value and b"\n" not in value  # nothing echoed into headers
    assert messages[-1]["type"] == "http.response.body"
    assert not messages[-1].get("more_body", False)


def check_websocket(messages: list[Message], scope: Scope) -> None:
    kinds = [m["type"] for m in messages]
    if kinds == ["websocket.accept", "websocket.close"]:
        return  # let through
    if "websocket.http.response" in (scope.get("extensions") or {}):
        assert kinds[0] == "websocket.http.response.start", messages
        assert messages[0]["status"] == 429
        return
    assert kinds == ["websocket.close"], messages
    assert messages[0]["code"] == 1008


# -- Hypothesis strategies for what a caller controls -------------------------------------

IPS = st.one_of(
    st.ip_addresses().map(str),
    st.sampled_from(["10.0.0.1", "10.255.0.9", "::1", "192.168.1.1", "203.0.113.9"]),
    st.ip_addresses(v=6).map(lambda ip: f"[{ip}]:{secrets.randbelow(65536)}"),
    st.ip_addresses(v=4).map(lambda ip: f"{ip}:8080"),
)
HOP = st.one_of(IPS.map(str.encode), st.binary(max_size=30), st.just(b""))
XFF = st.lists(HOP, max_size=80).map(b", ".join)
FORWARDED = st.one_of(
    st.sampled_from(
        [
            b"for=",
            b'for="',
            b'for="[2001:db8::1',
            b"for=unknown",
            b'For="_gazonk"',
            b"for=192.0.2.60;proto=http;by=203.0.113.43",
            b'for=10.0.0.1, for="[::1]:80", for=6.6.6.6',
            b";;;,,,==",
            b'for="\\"quoted\\""',
            b"for=10.0.0.2;for=10.0.0.3",
            b"by=10.0.0.1",
        ]
    ),
    st.lists(IPS.map(lambda ip: f"for={ip}".encode()), max_size=40).map(b", ".join),
    st.binary(max_size=200),
)
NAMES = st.one_of(
    st.sampled_from(
        [
            b"x-forwarded-for",
            b"X-Forwarded-For",
            b"forwarded",
            b"FORWARDED",
            b"x-api-key",
            b"x-tier",
            b"authorization",
            b"host",
            b"content-length",
            b"",
        ]
    ),
    st.binary(max_size=40),
)
VALUES = st.one_of(
    st.binary(max_size=200),
    XFF,
    FORWARDED,
    st.sampled_from([b"free", b"pro", b"enterprise", b"", b"\x00", b"\xff" * 64]),
)
HEADERS = st.lists(st.tuples(NAMES, VALUES), max_size=30)
METHODS = st.one_of(
    st.sampled_from(
        ["GET", "POST", "OPTIONS", "HEAD", "PUT", "get", "post", "", "BREW", "M-SEARCH"]
    ),
    st.text(max_size=20),
)
PATHS = st.one_of(
    st.sampled_from(
        ["/", "", "//", "/api", "/api/", "/health", "/static/../api/x", "/users/1", "/users/x"]
    ),
    st.text(max_size=60),
    st.text(max_size=30).map(lambda p: "/api/" + p),
    st.integers(1, 10**30).map(lambda n: f"/users/{n}"),
    st.integers(1_000, 100_000).map(lambda n: "/" + "a" * n),
)
CLIENTS = st.one_of(
    st.just(MISSING),
    st.none(),
    st.just(()),
    st.tuples(
        st.one_of(
            st.sampled_from(["10.0.0.1", "::1", "203.0.113.9", "", "unix:/tmp/s", "[::1]"]),
            st.text(max_size=60),
        ),
        st.integers(0, 65535),
    ),
    st.lists(st.sampled_from(["10.0.0.1", "192.168.0.7"]), min_size=1, max_size=1).map(
        lambda host: [host[0], 1234]
    ),
)


@st.composite
def scopes(draw: st.DrawFn) -> Scope:
    kind = draw(st.sampled_from(["http", "http", "websocket"]))
    headers: list[tuple[bytes, bytes]] = draw(HEADERS)
    if draw(st.booleans()):  # many hops in one header, or the header repeated
        hops = draw(st.lists(IPS, min_size=1, max_size=5))
        headers += [(b"x-forwarded-for", ", ".join(hops * 200).encode())] * draw(st.integers(1, 3))
    extra = draw(st.sampled_from(["none", "huge", "many"]))
    if extra == "huge":  # one enormous header value
        headers.append((draw(NAMES), b"10.0.0.1, " * 50_000 + draw(st.binary(max_size=10))))
    elif extra == "many":  # thousands of headers
        headers += [(b"x-forwarded-for", b"10.0.0.%d" % (i % 256)) for i in range(3_000)]
        headers += [(b"x-h-%d" % i, b"v") for i in range(2_000)]
    path = draw(PATHS)
    scope: dict[str, Any] = {
        "type": kind,
        "asgi": {"version": "3.0"},
        "http_version": draw(st.sampled_from(["1.0", "1.1", "2"])),
        "scheme": "http" if kind == "http" else "ws",
        "path": path,
        "raw_path": draw(st.binary(max_size=60)),
        "query_string": draw(st.binary(max_size=60)),
        "root_path": draw(st.sampled_from(["", "", "/api", "/", path[:3]])),
        "headers": headers,
    }
    if kind == "http":
        scope["method"] = draw(METHODS)
    elif draw(st.booleans()):
        scope["extensions"] = {"websocket.http.response": {}}
    client = draw(CLIENTS)
    if client is not MISSING:
        scope["client"] = client
    if draw(st.booleans()):
        scope["server"] = ("127.0.0.1", 8000)
    if draw(st.booleans()):
        scope["state"] = {}
    return scope


@given(scope=scopes())
def test_hostile_scopes_never_crash_either_middleware(scope: Scope) -> None:
    async def run() -> None:
        for name, (app, statuses) in stacks().items():
            for _ in range(3):  # allowed first, then possibly limited
                try:
                    messages = await drive(app, scope)
                except Exception as exc:  # pragma: no cover - the failure being hunted
                    raise AssertionError(f"{name}: {exc!r} escaped from fineflow") from exc
                if scope["type"] == "http":
                    check_http(messages, statuses)
                else:
                    check_websocket(messages, scope)

    anyio.run(run)


def test_an_empty_path_does_not_crash_the_breaker_middleware() -> None:
    # What uvicorn sends for "GET ?a HTTP/1.1": path "", raw_path b"".
    scope = {"type": "http", "method": "GET", "path": "", "root_path": "", "headers": []}
    for app in (
        CircuitBreakerMiddleware(inner_app),
        rate_limited(CircuitBreakerMiddleware(inner_app)),
    ):
        check_http(anyio.run(drive, app, scope), frozenset({200, 429}))


def test_the_breaker_registry_stays_bounded_under_distinct_hostile_paths() -> None:
    registry = BreakerRegistry(max_size=100)
    app = CircuitBreakerMiddleware(inner_app, registry=registry)

    async def run() -> None:
        for i in range(5_000):
            path = f"/{secrets.token_hex(8)}/{i}" + "\udcff" * (i % 3)
            messages = await drive(app, {"type": "http", "method": "GET", "path": path})
            check_http(messages, frozenset({200}))

    anyio.run(run)
    assert len(registry) <= 100


def test_memory_storage_stays_within_max_keys_under_a_flood() -> None:
    storage = MemoryStorage(clock=FakeClock().time_ns, max_keys=1_000)
    limiter = RateLimiter(storage)
    quota = Quota(1, 3600.0)

    async def run() -> None:
        async with limiter:
            for i in range(20_000):
                decision = await limiter.hit(f"{i}:" + "k" * (i % 500), quota)
                assert decision.allowed  # every key is new
            statuses = await storage.status(f"{19_999}:" + "k" * (19_999 % 500))
            assert len(statuses) == 1  # the newest key is still there
            assert len(storage) == 1_000  # full, never over
            assert storage.evictions == 19_000  # every key beyond the bound evicted one

    anyio.run(run)


# -- keys of any length and bytes through PostgreSQL --------------------------------------

pg = pytest.mark.postgres
NS = 10**9
T0 = 1_700_000_000 * NS  # a fixed "now" for the database functions (nanoseconds)

KEY_TEXT = st.one_of(
    st.text(max_size=200),
    st.text(alphabet=st.characters(categories=["Cs"]), min_size=1, max_size=5),  # lone surrogates
    st.binary(max_size=300).map(lambda b: b.decode("latin-1")),  # NULs, control bytes
    st.tuples(st.text(min_size=1, max_size=3), st.integers(100, 200_000)).map(
        lambda t: t[0] * t[1]
    ),  # huge
)


@pytest.fixture(scope="module")
async def pg_module(pg_dsn: str) -> AsyncIterator[PostgresStorage]:
    schema = f"ff_hostile_{secrets.token_hex(4)}"
    async with PostgresStorage(pg_dsn, schema=schema) as storage:
        await storage.migrate()
        yield storage


_endpoints = itertools.count()


@pg
@pytest.mark.anyio
@given(key_list=st.lists(KEY_TEXT, min_size=1, max_size=8, unique_by=storage_key))
async def test_keys_of_any_bytes_are_stored_at_bounded_size_and_still_identify_the_caller(
    pg_module: PostgresStorage, key_list: list[str]
) -> None:
    storage = pg_module
    endpoint = f"e{next(_endpoints)}"
    quota = Quota(1, 3600.0)
    hits = [Hit(k, quota, 1, endpoint) for k in key_list]
    first = [(await storage.decide("gcra", [h], now=T0))[0] for h in hits]
    assert all(d.allowed for d in first)
    again = [(await storage.decide("gcra", [h], now=T0 + NS))[0] for h in hits]
    assert not any(d.allowed for d in again)  # the stored key still names the same caller
    async with storage.pool.connection() as conn:
        cur = await conn.execute(
            f"SELECT key, octet_length(key) FROM {storage.schema}.buckets WHERE endpoint = %s",
            (endpoint,),
        )
        rows = await cur.fetchall()
    assert len(rows) == len(key_list)
    assert max(size for _, size in rows) <= MAX_KEY_BYTES
    assert {k for k, _ in rows} == {storage_key(k) for k in key_list}
    for stored, size in rows:
        if stored.startswith("sha256:"):
            assert size == 71  # a fixed-size digest, however long the key was
    for key in key_list:
        statuses = await storage.status(key, now=T0 + NS)
        [status] = [s for s in statuses if s.endpoint == endpoint]
        assert status.allowed_total == 1 and status.denied_total == 1


@pg
@pytest.mark.anyio
async def test_a_flood_of_distinct_keys_is_entirely_reclaimed_by_cleanup(
    pg_dsn: str, pg_schema: str
) -> None:
    flood = 20_000
    quota = Quota(1, 1.0)  # one request per second: expired a second later
    async with PostgresStorage(pg_dsn, schema=pg_schema, max_size=4) as storage:
        await storage.migrate()
        limiter = RateLimiter(storage, timeout=None)

        async def hit(i: int) -> bool:
            key = f"flood-{i}-" + "x" * (i % 300)  # many of them long: stored hashed
            decisions = await limiter.decide([Hit(key, quota, 1, "flood")], now=T0)
            return decisions.allowed

        admitted = 0
        for start in range(0, flood, 2_000):
            async with anyio.create_task_group() as tg:
                results: list[bool] = []

                async def one(i: int, out: list[bool] = results) -> None:
                    out.append(await hit(i))

                for i in range(start, start + 2_000):
                    tg.start_soon(one, i)
            admitted += sum(results)
        assert admitted == flood
        assert limiter.metrics().storage_errors == 0

        async def count() -> tuple[int, int]:
            async with storage.pool.connection() as conn:
                cur = await conn.execute(
                    f"SELECT count(*), coalesce(max(octet_length(key)), 0) FROM {pg_schema}.buckets"
                )
                row = await cur.fetchone()
            assert row is not None
            return int(row[0]), int(row[1])

        rows, widest = await count()
        assert rows == flood
        assert widest <= MAX_KEY_BYTES
        assert await storage.cleanup(now=T0 + NS // 2) == 0  # nothing has expired yet
        assert await storage.cleanup(batch_size=5_000, now=T0 + 2 * NS) == flood
        assert (await count())[0] == 0


# -- configuration mistakes fail at start-up, saying the fix ------------------------------


def _app(**options: Any) -> Callable[[], object]:
    options.setdefault("rules", [Rule("/x", quota="1/s")])
    options.setdefault("storage", MemoryStorage())
    return lambda: RateLimitMiddleware(inner_app, **options)


CONFIG_MISTAKES: list[tuple[str, Callable[[], object], str]] = [
    ("unknown unit", lambda: Quota.parse("100/fortnight"), 'accepted forms: "100/minute"'),
    ("empty quota", lambda: Quota.parse(""), "accepted forms"),
    ("quota not a string", lambda: Quota.parse(100), "accepted forms"),  # type: ignore[arg-type]
    ("zero limit", lambda: Quota.parse("0/minute"), r"limit must be 1\.\."),
    ("negative limit", lambda: Quota(-5, 60.0), r"limit must be 1\.\."),
    ("zero period", lambda: Quota(5, 0.0), "period must be > 0"),
    ("NaN period", lambda: Quota(5, float("nan")), "period must be > 0"),
    ("zero burst", lambda: Quota.parse("10/minute;burst=0"), "burst must be an int 1"),
    ("rule quota", lambda: Rule("/x", quota="lots"), "accepted forms"),
    ("tier quota", lambda: Rule("/x", tiers={"free": "1 per fortnight"}), "units: s, m, h, d"),
    ("cost never fits", lambda: Rule("/x", quota="1/s", cost=5), "lower the cost or raise"),
    ("bad CIDR", lambda: keys.client_ip(trusted_proxies=["not-a-cidr"]), "such as '10.0.0.0/8'"),
    ("bad prefix", lambda: keys.client_ip(["10.0.0.0/33"]), "such as '10.0.0.0/8'"),
    ("CIDRs in one string", lambda: keys.client_ip("10.0.0.0/8,192.168.0.0/16"), "CIDR"),
    ("unknown algorithm", lambda: RateLimiter(MemoryStorage(), algorithm="leaky"), "one of 'gcra'"),
    ("middleware algorithm", _app(algorithm="token_bucket"), "choose one of 'gcra'"),
    ("storage policy", lambda: RateLimiter(MemoryStorage(), on_storage_error="maybe"), "'deny'"),  # type: ignore[arg-type]
    ("header style", _app(headers="draft"), "'ietf', 'legacy', 'x' or None"),
    ("schema with a dash", lambda: PostgresStorage("", schema="my-schema"), "plain SQL identifier"),
    ("schema injection", lambda: PostgresStorage("", schema="x; DROP TABLE t"), "identifier"),
    ("schema digit first", lambda: PostgresStorage("", schema="1abc"), "identifier"),
    ("schema too long", lambda: PostgresStorage("", schema="s" * 64), "at most 63"),
    ("empty schema", lambda: PostgresStorage("", schema=""), "identifier"),
    ("DSN without =", lambda: PostgresStorage("host=x port"), "invalid PostgreSQL DSN"),
    ("DSN option", lambda: PostgresStorage("nonsense_option=1"), "invalid PostgreSQL DSN"),
    ("DSN quoting", lambda: PostgresStorage("host='unterminated"), "invalid PostgreSQL DSN"),
    ("path", lambda: Rule("users", quota="1/s"), "starting with '/'"),
    ("breaker threshold", lambda: CircuitBreaker("b", failure_threshold=0), "e.g. 5"),
    ("memory bound", lambda: MemoryStorage(max_keys=0), "positive int"),
]


@pytest.mark.parametrize(
    ("factory", "fix"),
    [(f, m) for _, f, m in CONFIG_MISTAKES],
    ids=[n for n, _, _ in CONFIG_MISTAKES],
)
def test_configuration_mistakes_fail_at_startup_saying_the_fix(
    factory: Callable[[], object], fix: str
) -> None:
    with pytest.raises(ConfigurationError, match=fix) as info:
        factory()
    assert isinstance(info.value, ValueError)  # catchable as the standard error too


# DSNs libpq rejects on every connection attempt, yet accepted when the app is built: the app
# starts, each connection fails, and requests run on on_storage_error for ever.
@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://app@127.0.0.1:notaport/app",
        "host=127.0.0.1 port=99999",
        "host=127.0.0.1 sslmode=bogus",
    ],
)
def test_dsn_values_that_can_never_connect_fail_at_construction(dsn: str) -> None:
    with pytest.raises(ConfigurationError, match="DSN"):
        PostgresStorage(dsn)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # nothing listens there any more: connections are refused


@pytest.mark.anyio
async def test_an_unreachable_server_is_named_with_the_reason(pg_schema: str) -> None:
    port = _closed_port()
    async with PostgresStorage(
        f"host=127.0.0.1 port={port}", schema=pg_schema, connect_timeout=1
    ) as storage:
        with pytest.raises(StorageError) as info:
            await storage.migrate()
    message = str(info.value)
    assert str(port) in message or "refused" in message.lower()  # where and why
    assert "DSN" in message
