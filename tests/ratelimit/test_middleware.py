"""RateLimitMiddleware through raw ASGI: rules, keys, tiers, responses, failures, shadow."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal
from unittest.mock import patch

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asgi_helpers import (
    FailingStorage,
    RecordingStorage,
    Response,
    call,
    echo_app,
    http_scope,
    sf,
)
from fineflow import (
    ConfigurationError,
    Decision,
    Decisions,
    Hit,
    MemoryStorage,
    Quota,
    RateLimiter,
    RateLimitMiddleware,
    Rule,
    keys,
)
from fineflow._asgi.types import Message, Receive, Scope, Send
from fineflow._ratelimit import headers as _headers
from fineflow._ratelimit.headers import AppliedPolicy, render_headers
from fineflow._ratelimit.problems import QUOTA_EXCEEDED
from fineflow._storage import lifespan as _lifecycle
from fineflow.testing import FakeClock

pytestmark = pytest.mark.anyio


def limited(
    rules: list[Rule], clock: FakeClock | None = None, **options: Any
) -> RateLimitMiddleware:
    app = options.pop("app", echo_app)
    return RateLimitMiddleware(
        app, storage=MemoryStorage(clock=(clock or FakeClock()).time_ns), rules=rules, **options
    )


async def test_allowed_requests_carry_ietf_headers_and_denied_get_429_problem() -> None:
    mw = limited([Rule("/users/{id}", quota="2/minute", name="users")])
    first = await call(mw, http_scope("/users/1"))
    assert first.status == 200
    assert first.header(b"x-app") == b"yes"
    assert sf(first.header(b"ratelimit-policy")) == [("users", {"q": 2, "w": 60})]
    assert sf(first.header(b"ratelimit")) == [("users", {"r": 1, "t": 30})]
    assert first.header(b"retry-after") is None
    second = await call(mw, http_scope("/users/2"))  # same template, same limit
    assert second.status == 200
    assert sf(second.header(b"ratelimit")) == [("users", {"r": 0, "t": 60})]
    denied = await call(mw, http_scope("/users/3"))
    assert denied.status == 429
    assert denied.header(b"content-type") == b"application/problem+json"
    assert denied.header(b"retry-after") == b"30"
    assert sf(denied.header(b"ratelimit")) == [("users", {"r": 0, "t": 60})]
    problem = denied.json()
    assert problem["type"] == QUOTA_EXCEEDED
    assert problem["status"] == 429
    assert problem["violated-policies"] == ["users"]
    assert mw.metrics().allowed == 2
    assert mw.metrics().limited == 1


async def test_time_moves_with_the_injected_clock() -> None:
    clock = FakeClock()
    mw = limited([Rule("/x", quota="1/second")], clock)
    assert (await call(mw, http_scope("/x"))).status == 200
    assert (await call(mw, http_scope("/x"))).status == 429
    clock.advance(1.0)
    assert (await call(mw, http_scope("/x"))).status == 200


async def test_different_rules_never_share_state() -> None:
    mw = limited([Rule("/a", quota="1/minute"), Rule("/b", quota="1/minute")])
    assert (await call(mw, http_scope("/a"))).status == 200
    assert (await call(mw, http_scope("/b"))).status == 200
    assert (await call(mw, http_scope("/a"))).status == 429


async def test_every_matching_rule_applies_all_or_nothing() -> None:
    mw = limited(
        [
            Rule("/{path:path}", quota="3/minute", name="global"),
            Rule("/search", quota="1/minute", name="search"),
        ]
    )
    ok = await call(mw, http_scope("/search"))
    assert [name for name, _ in sf(ok.header(b"ratelimit"))] == ["global", "search"]
    denied = await call(mw, http_scope("/search"))
    assert denied.status == 429
    assert denied.json()["violated-policies"] == ["search"]
    # The denied request charged nothing to the global quota: 2 of 3 are left.
    other = await call(mw, http_scope("/other"))
    assert sf(other.header(b"ratelimit")) == [("global", {"r": 1, "t": 40})]


async def test_several_quotas_in_one_rule_are_named_apart() -> None:
    mw = limited([Rule("/x", quota=["2/second", "3/day"], name="api")])
    response = await call(mw, http_scope("/x"))
    names = [n for n, _ in sf(response.header(b"ratelimit-policy"))]
    assert names == ["api:2-per-1s", "api:3-per-86400s"]


async def test_methods_and_unmatched_paths() -> None:
    mw = limited([Rule("/x", ["POST"], quota="1/minute")])
    for _ in range(3):
        response = await call(mw, http_scope("/x", "GET"))
        assert response.status == 200
        assert response.header(b"ratelimit") is None
    assert (await call(mw, http_scope("/x", "POST"))).status == 200
    assert (await call(mw, http_scope("/x", "POST"))).status == 429
    assert mw.metrics().unmatched == 3


async def test_exemptions() -> None:
    async def key(scope: Scope) -> str | None:
        return None if scope["path"] == "/free" else "k"

    mw = limited(
        [Rule("/{p:path}", quota="1/minute")],
        key=key,
        exempt_paths=["/health", "/static/*"],
    )
    for path, method in [("/health", "GET"), ("/static/a.css", "GET"), ("/free", "GET")] * 2:
        response = await call(mw, http_scope(path, method))
        assert response.status == 200
        assert response.header(b"ratelimit") is None
    for _ in range(2):  # CORS preflights are exempt by default
        assert (await call(mw, http_scope("/x", "OPTIONS"))).status == 200
    assert (await call(mw, http_scope("/x"))).status == 200
    assert (await call(mw, http_scope("/y"))).status == 429
    metrics = mw.metrics()
    assert metrics.exempt == 8
    assert metrics.requests == 10


async def test_spoofed_forwarded_for_cannot_change_the_key() -> None:
    mw = limited([Rule("/x", quota="1/minute")])
    assert (await call(mw, http_scope("/x", headers=[(b"x-forwarded-for", b"1.1.1.1")]))).status
    spoofed = http_scope("/x", headers=[(b"x-forwarded-for", b"2.2.2.2")])
    assert (await call(mw, spoofed)).status == 429
    other_client = http_scope("/x", client=("198.51.100.1", 1))
    assert (await call(mw, other_client)).status == 200


async def test_trusted_proxy_keys_by_forwarded_client() -> None:
    mw = limited([Rule("/x", quota="1/minute")], key=keys.client_ip(["10.0.0.0/8"]))
    proxy = ("10.0.0.1", 1)
    a = http_scope("/x", headers=[(b"x-forwarded-for", b"198.51.100.1")], client=proxy)
    b = http_scope("/x", headers=[(b"x-forwarded-for", b"198.51.100.2")], client=proxy)
    assert (await call(mw, a)).status == 200
    assert (await call(mw, b)).status == 200
    assert (await call(mw, a)).status == 429


async def test_rule_key_overrides_and_async_keys_and_costs() -> None:
    async def api_key(scope: Scope) -> str | None:
        return dict(scope["headers"]).get(b"x-api-key", b"").decode() or None

    async def tokens(scope: Scope) -> int:
        return int(dict(scope["headers"]).get(b"x-tokens", b"1"))

    mw = limited([Rule("/chat", quota="10/minute", key=api_key, cost=tokens)])
    heavy = http_scope("/chat", headers=[(b"x-api-key", b"a"), (b"x-tokens", b"7")])
    assert sf((await call(mw, heavy)).header(b"ratelimit"))[0][1]["r"] == 3
    assert (await call(mw, heavy)).status == 429
    other = http_scope("/chat", headers=[(b"x-api-key", b"b"), (b"x-tokens", b"7")])
    assert (await call(mw, other)).status == 200
    anonymous = http_scope("/chat")  # key None: exempt from the rule
    assert (await call(mw, anonymous)).header(b"ratelimit") is None
    too_big = http_scope("/chat", headers=[(b"x-api-key", b"c"), (b"x-tokens", b"11")])
    response = await call(mw, too_big)
    assert response.status == 429
    assert response.header(b"retry-after") is None  # it can never fit


async def test_a_bad_cost_function_is_a_programming_error() -> None:
    mw = limited([Rule("/x", quota="1/s", cost=lambda scope: -1)])
    with pytest.raises(ValueError, match="cost function"):
        await call(mw, http_scope("/x"))


async def test_tiers_with_default_and_unknown_tier_warned_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def tier(scope: Scope) -> str | None:
        value = dict(scope["headers"]).get(b"x-tier")
        return value.decode() if value else None

    rule = Rule("/api", tiers={"free": "1/minute", "pro": "3/minute"}, key=lambda s: "user")
    mw = limited([rule], tier=tier, default_tier="free")
    pro = http_scope("/api", headers=[(b"x-tier", b"pro")])
    assert sf((await call(mw, pro)).header(b"ratelimit-policy")) == [("/api", {"q": 3, "w": 60})]
    caplog.set_level(logging.WARNING, logger="fineflow.middleware")
    gold = http_scope("/api", headers=[(b"x-tier", b"gold")])
    response = await call(mw, gold)
    assert sf(response.header(b"ratelimit-policy")) == [("/api", {"q": 1, "w": 60})]
    assert (await call(mw, gold)).status == 429
    assert (await call(mw, http_scope("/api"))).status == 429  # no tier: the default
    warnings = [r for r in caplog.records if "unknown tier" in r.getMessage()]
    assert len(warnings) == 1
    assert "'gold'" in warnings[0].getMessage()


async def test_default_tier_is_each_rules_first_tier() -> None:
    mw = limited([Rule("/api", tiers={"free": "1/minute", "pro": "5/minute"})])
    response = await call(mw, http_scope("/api"))
    assert sf(response.header(b"ratelimit-policy")) == [("/api", {"q": 1, "w": 60})]


async def test_decision_is_available_to_the_app() -> None:
    seen: list[Any] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["state"]["fineflow"])
        await echo_app(scope, receive, send)

    mw = limited([Rule("/x", quota="5/minute")], app=app)
    await call(mw, http_scope("/x", state={"db": "kept"}))
    [decisions] = seen
    assert isinstance(decisions, Decisions)
    assert decisions.allowed
    assert decisions[0].remaining == 4


@pytest.mark.parametrize(
    ("style", "names"),
    [
        ("legacy", [b"ratelimit-limit", b"ratelimit-remaining", b"ratelimit-reset"]),
        ("x", [b"x-ratelimit-limit", b"x-ratelimit-remaining", b"x-ratelimit-reset"]),
        (None, []),
    ],
)
async def test_header_styles(style: str | None, names: list[bytes]) -> None:
    mw = limited([Rule("/x", quota="1/minute")], headers=style)
    ok = await call(mw, http_scope("/x"))
    assert [n for n, _ in ok.headers if n != b"x-app"] == names
    denied = await call(mw, http_scope("/x"))
    assert denied.status == 429
    assert denied.header(b"retry-after") == b"60"


async def test_headers_for_withholds_rate_limit_headers() -> None:
    mw = limited([Rule("/x", quota="1/minute")], headers_for=lambda scope: "user" in scope)
    ok = await call(mw, http_scope("/x"))
    assert ok.header(b"ratelimit") is None
    denied = await call(mw, http_scope("/x"))
    assert denied.header(b"ratelimit") is None
    assert denied.header(b"retry-after") == b"60"
    assert (await call(mw, http_scope("/x", user="u"))).header(b"ratelimit") is not None


async def test_custom_deny_app() -> None:
    async def deny(scope: Scope, receive: Receive, send: Send) -> None:
        retry = scope["state"]["fineflow"].retry_after
        await send({"type": "http.response.start", "status": 418, "headers": []})
        await send({"type": "http.response.body", "body": f"{retry:.0f}".encode()})

    mw = limited([Rule("/x", quota="1/minute")], deny_app=deny)
    await call(mw, http_scope("/x"))
    response = await call(mw, http_scope("/x"))
    assert (response.status, response.body) == (418, b"60")


async def test_shadow_mode_never_blocks(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fineflow.middleware")
    mw = limited([Rule("/x", quota="1/minute", name="x")], shadow=True)
    for _ in range(3):
        response = await call(mw, http_scope("/x"))
        assert response.status == 200
        assert response.header(b"ratelimit") is None
    metrics = mw.metrics()
    assert (metrics.allowed, metrics.shadow_limited, metrics.limited) == (1, 2, 0)
    assert sum("shadow mode: would deny" in r.getMessage() for r in caplog.records) == 2


@pytest.mark.parametrize("policy", ["allow", "deny"])
async def test_storage_failure_never_answers_500(policy: Literal["allow", "deny"]) -> None:
    storage = FailingStorage()
    mw = RateLimitMiddleware(
        echo_app, storage=storage, rules=[Rule("/x", quota="1/minute")], on_storage_error=policy
    )
    for _ in range(5):
        response = await call(mw, http_scope("/x"))
        if policy == "allow":
            assert response.status == 200
            assert response.header(b"ratelimit") is None  # the state is unknown
        else:
            assert response.status == 503
            assert int(response.header(b"retry-after") or 0) >= 1
            assert response.json()["status"] == 503
    assert mw.metrics().storage_failed == 5


@pytest.mark.parametrize("policy", ["allow", "deny"])
async def test_a_closed_memory_storage_is_a_storage_failure_on_the_in_process_path(
    policy: Literal["allow", "deny"],
) -> None:
    storage = MemoryStorage()
    limiter = RateLimiter(storage, on_storage_error=policy)
    mw = RateLimitMiddleware(echo_app, limiter=limiter, rules=[Rule("/x", quota="1/minute")])
    assert (await call(mw, http_scope("/x"))).status == 200
    await storage.close()
    response = await call(mw, http_scope("/x"))
    assert response.status == (200 if policy == "allow" else 503)
    assert response.header(b"ratelimit") is None
    assert mw.metrics().storage_failed == 1
    metrics = limiter.metrics()
    assert (metrics.decisions, metrics.allowed, metrics.storage_errors) == (2, 1, 1)


async def test_streaming_passes_through_unbuffered() -> None:
    finished = False

    async def streaming(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal finished
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(3):
            await send({"type": "http.response.body", "body": b"%d" % i, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        finished = True

    mw = limited([Rule("/x", quota="5/minute")], app=streaming)
    seen: list[tuple[Message, bool]] = []

    async def receive() -> Message:
        return {"type": "http.request"}

    async def send(message: Message) -> None:
        seen.append((message, finished))

    await mw(http_scope("/x"), receive, send)
    assert [m["type"] for m, _ in seen] == ["http.response.start"] + ["http.response.body"] * 4
    assert not any(done for _, done in seen)  # every message went out as it was sent
    assert [m.get("body") for m, _ in seen[1:]] == [b"0", b"1", b"2", b""]
    assert seen[0][0]["headers"][0][0] == b"ratelimit-policy"


async def test_websocket_denied_with_close_1008_without_the_extension() -> None:
    accepted: list[bool] = []

    async def ws_app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        accepted.append(True)

    mw = limited([Rule("/ws", quota="1/minute")], app=ws_app)
    for _ in range(2):
        sent: list[Message] = []

        async def receive() -> Message:
            return {"type": "websocket.connect"}

        async def send(message: Message, sent: list[Message] = sent) -> None:
            sent.append(message)

        await mw(
            {"type": "websocket", "path": "/ws", "headers": [], "client": ("1.2.3.4", 1)},
            receive,
            send,
        )
    assert accepted == [True]
    assert sent == [{"type": "websocket.close", "code": 1008, "reason": "rate limit exceeded"}]


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_lazy_open_happens_exactly_once_under_concurrency(anyio_backend: str) -> None:
    storage = RecordingStorage()
    mw = RateLimitMiddleware(echo_app, storage=storage, rules=[Rule("/x", quota="100/minute")])
    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(call, mw, http_scope("/x"))
    assert storage.calls == ["open", "migrate"]


@pytest.mark.parametrize(("retry_every", "opens"), [(3600.0, 1), (0.0, 3)])
async def test_storage_that_fails_to_open_is_retried_and_requests_follow_the_policy(
    monkeypatch: pytest.MonkeyPatch, retry_every: float, opens: int
) -> None:
    monkeypatch.setattr(_lifecycle, "OPEN_RETRY", retry_every)
    storage = RecordingStorage(fail_open=True)
    mw = RateLimitMiddleware(
        echo_app, storage=storage, rules=[Rule("/x", quota="1/minute")], on_storage_error="deny"
    )
    for _ in range(3):
        assert (await call(mw, http_scope("/x"))).status == 503
    assert storage.calls == ["open"] * opens
    storage.fail_open = False
    monkeypatch.setattr(_lifecycle, "OPEN_RETRY", 0.0)
    mw_ok = RateLimitMiddleware(echo_app, storage=storage, rules=[Rule("/x", quota="1/minute")])
    assert (await call(mw_ok, http_scope("/x"))).status == 200


async def test_a_limiter_given_by_the_user_is_not_opened_or_closed() -> None:
    storage = RecordingStorage()
    limiter = RateLimiter(storage)
    mw = RateLimitMiddleware(echo_app, limiter=limiter, rules=[Rule("/x", quota="1/minute")])
    assert (await call(mw, http_scope("/x"))).status == 200
    assert storage.calls == []
    assert mw.limiter is limiter


async def test_root_path_is_stripped_before_matching() -> None:
    mw = limited([Rule("/x", quota="1/minute")])
    scope = http_scope("/api/x", root_path="/api")
    assert (await call(mw, scope)).header(b"ratelimit") is not None


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"storage": MemoryStorage(), "limiter": RateLimiter(MemoryStorage())},
        {"limiter": RateLimiter(MemoryStorage()), "algorithm": "gcra"},
        {"storage": MemoryStorage(), "rules": []},
        {"storage": MemoryStorage(), "rules": Rule("/x", quota="1/s")},
        {"storage": MemoryStorage(), "rules": ["/x"]},
        {"storage": MemoryStorage(), "rules": [Rule("/x", quota="1/s"), Rule("/x", quota="2/s")]},
        {
            "storage": MemoryStorage(),
            "rules": [Rule("/x", tiers={"a": "1/s"})],
            "default_tier": "b",
        },
        {"storage": MemoryStorage(), "headers": "draft-6"},
        {"storage": MemoryStorage(), "key": "client_ip"},
        {"storage": MemoryStorage(), "exempt_paths": "/health"},
        {"storage": MemoryStorage(), "exempt_paths": ["health"]},
        {"storage": MemoryStorage(), "algorithm": "leaky"},
        {"storage": MemoryStorage(), "rules": [Rule("/x", quota=Quota(9, 1.0, burst=2), cost=5)]},
    ],
)
def test_invalid_configuration_is_rejected(
    options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("FINEFLOW_STORAGE_URL", "FINEFLOW_DSN"):  # {}: no default storage either
        monkeypatch.delenv(name, raising=False)
    options.setdefault("rules", [Rule("/x", quota="1/s")])
    with pytest.raises(ConfigurationError):
        RateLimitMiddleware(echo_app, **options)


HOSTILE_NAMES = st.one_of(
    st.binary(max_size=40),
    st.sampled_from(
        [b"x-forwarded-for", b"forwarded", b"x-api-key", b"x-tier", b"X-Forwarded-For"]
    ),
)


@settings(max_examples=100)
@given(
    headers=st.lists(st.tuples(HOSTILE_NAMES, st.binary(max_size=200)), max_size=20),
    path=st.text(max_size=50).map(lambda p: "/" + p),
    client=st.one_of(st.none(), st.tuples(st.text(max_size=45), st.integers(0, 65535))),
    huge=st.booleans(),
)
def test_hostile_requests_never_crash(
    headers: list[tuple[bytes, bytes]], path: str, client: tuple[str, int] | None, huge: bool
) -> None:
    if huge:
        headers.append((b"x-forwarded-for", b", ".join([b"10.1.2.3"] * 5000) + b"\xff" * 70000))
    key = keys.first(keys.header("x-api-key"), keys.client_ip(["10.0.0.0/8", "::1"]))

    def tier(scope: Scope) -> str | None:
        return keys.header("x-tier")(scope)

    mw = limited(
        [
            Rule("/{p:path}", quota="2/minute"),
            Rule("/api/*", tiers={"free": "1/minute", "pro": "5/minute"}),
        ],
        key=key,
        tier=tier,
    )

    async def run() -> None:
        for _ in range(3):
            response = await call(mw, http_scope(path, headers=headers, client=client))
            assert response.status in (200, 429)

    anyio.run(run)


@pytest.mark.parametrize(
    ("rules", "style", "names"),
    [
        (1, "ietf", [b"ratelimit-policy", b"ratelimit"]),  # the single-rule shortcut
        (2, "ietf", [b"ratelimit-policy", b"ratelimit"]),  # the general path
        (1, "legacy", [b"ratelimit-limit", b"ratelimit-remaining", b"ratelimit-reset"]),
    ],
)
@pytest.mark.parametrize("app_headers", [[(b"x-a", b"1")], None])
async def test_an_app_reusing_its_start_message_never_accumulates_headers(
    rules: int, style: str, names: list[bytes], app_headers: list[tuple[bytes, bytes]] | None
) -> None:
    start: Message = {"type": "http.response.start", "status": 200}
    if app_headers is not None:
        start["headers"] = app_headers
    before = {**start, "headers": list(app_headers or [])}

    async def reusing(scope: Scope, receive: Receive, send: Send) -> None:
        await send(start)
        await send({"type": "http.response.body", "body": b"ok"})

    all_rules = [Rule("/{path:path}", quota="5/minute"), Rule("/", quota="9/minute", name="b")]
    mw = limited(all_rules[:rules], app=reusing, headers=style)
    own = [n for n, _ in app_headers or []]
    for _ in range(3):
        response = await call(mw, http_scope("/"))
        assert [n for n, _ in response.headers] == own + names
    assert {**start, "headers": list(start.get("headers", []))} == before
    assert ("headers" in start) == (app_headers is not None)


@pytest.mark.parametrize("client", [("203.0.113.9", 1), ["203.0.113.9", 1], ("", 1), None])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"headers": None},
        {"headers": "legacy"},
        {"shadow": True},
        {"headers_for": lambda scope: scope["path"] != "/api/b"},
    ],
)
async def test_the_single_rule_path_answers_like_the_general_one(
    client: Any, options: dict[str, Any]
) -> None:
    """A rule alone, and with an extra rule that never matches, must answer every request
    the same."""
    rule = Rule("/api/*", quota="2/minute", name="api")
    never = Rule("/never", quota="1/minute", name="never")
    fast, general = limited([rule], **options), limited([rule, never], **options)
    for path in ["/api/a", "/api/b", "/other", "/api/c", "/api/d"]:
        a = await call(fast, http_scope(path, client=client))
        b = await call(general, http_scope(path, client=client))
        assert (a.status, a.headers, a.body) == (b.status, b.headers, b.body)
    assert fast.metrics() == general.metrics()


async def test_a_limiter_subclass_is_called_through_its_methods() -> None:
    calls: list[int] = []

    class Audited(RateLimiter):
        def decide_nowait(self, hits: Sequence[Hit]) -> Decisions | None:
            calls.append(len(hits))
            return super().decide_nowait(hits)

    limiter = Audited(MemoryStorage())
    mw = RateLimitMiddleware(echo_app, limiter=limiter, rules=[Rule("/x", quota="1/minute")])
    statuses = [(await call(mw, http_scope("/x"))).status for _ in range(2)]
    assert statuses == [200, 429]
    assert calls == [1, 1]


async def test_a_limiter_answering_the_wrong_number_of_decisions_is_named() -> None:
    """A subclass breaking the contract (no decision for a hit) gets an error naming it,
    whatever the rules and headers, not an IndexError from deep inside."""

    class Empty(RateLimiter):
        async def decide(self, hits: Sequence[Hit], *, now: int | None = None) -> Decisions:
            return Decisions(())

    two = [Rule("/x", quota="1/minute"), Rule("/{p:path}", quota="5/minute", name="all")]
    for rules in ([Rule("/x", quota="1/minute")], two):
        for headers in ("ietf", None):
            style: Literal["ietf"] | None = headers
            mw = RateLimitMiddleware(
                echo_app, limiter=Empty(MemoryStorage()), rules=rules, headers=style
            )
            with pytest.raises(TypeError, match="Empty returned 0 decisions for"):
                await call(mw, http_scope("/x"))


async def test_a_limiter_subclass_overriding_decide_alone_is_called() -> None:
    calls: list[int] = []

    class Audited(RateLimiter):
        async def decide(self, hits: Sequence[Hit], *, now: int | None = None) -> Decisions:
            calls.append(len(hits))
            return await super().decide(hits, now=now)

    mw = RateLimitMiddleware(
        echo_app, limiter=Audited(MemoryStorage()), rules=[Rule("/x", quota="1/minute")]
    )
    statuses = [(await call(mw, http_scope("/x"))).status for _ in range(2)]
    assert statuses == [200, 429]
    assert calls == [1, 1]


STEPS = st.lists(
    st.tuples(st.integers(0, 3), st.sampled_from([0.0, 0.4, 3.0, 6.0, 11.9, 12.0, 30.0])),
    min_size=1,
    max_size=40,
)


def ratelimit_headers(response: Response) -> list[tuple[bytes, bytes]]:
    return [(n, v) for n, v in response.headers if n in (b"ratelimit-policy", b"ratelimit")]


def rendered_afresh(name: str, decisions: Sequence[Decision]) -> list[tuple[bytes, bytes]]:
    """The IETF headers of ``decisions`` from policies that never rendered any."""
    fresh = [AppliedPolicy(name, Quota(d.limit, d.period)) for d in decisions]
    return list(render_headers("ietf", fresh, decisions))


@settings(max_examples=60)
@given(steps=STEPS, bound=st.sampled_from([1, 2, 1024]))
def test_cached_ratelimit_headers_match_freshly_rendered_ones(
    steps: list[tuple[int, float]], bound: int
) -> None:
    """Requests with one decision reuse rendered RateLimit headers: under any mix of
    callers and clock moves (same remaining with another reset, a cache cleared when
    full) they equal headers rendered afresh, with one rule or several."""
    clock = FakeClock()
    rule = Rule("/{path:path}", quota="5/minute", name="api")
    fast = limited([rule], clock)
    general = limited([rule, Rule("/never", quota="1/minute", name="never")], clock)

    async def run() -> None:
        for caller, seconds in steps:
            clock.advance(seconds)
            scope = http_scope("/a", client=(f"203.0.113.{caller}", 1))
            a, b = [await call(mw, scope) for mw in (fast, general)]
            assert (a.status, a.headers) == (b.status, b.headers)
            assert ratelimit_headers(a) == rendered_afresh("api", scope["state"]["fineflow"])

    with patch.object(_headers, "MAX_CACHED_RATES", bound):
        anyio.run(run)


@settings(max_examples=40)
@given(steps=STEPS, tiers=st.lists(st.sampled_from(["free", "pro", "gold", None]), min_size=4))
def test_tiered_rules_cache_headers_per_tier(
    steps: list[tuple[int, float]], tiers: list[str | None]
) -> None:
    """Each tier's policy keeps its own rendered headers: a caller's headers name their
    tier's quota, as rendered afresh (unknown and missing tiers take the default)."""
    clock = FakeClock()
    rule = Rule("/{path:path}", tiers={"free": "3/minute", "pro": "5/minute"}, name="api")
    quotas = {"free": 3, "pro": 5}

    def tier_of(scope: Scope) -> str | None:
        return tiers[int(scope["client"][0].rsplit(".", 1)[1])]

    cached = limited([rule], clock, tier=tier_of, default_tier="free")

    async def run() -> None:
        for caller, seconds in steps:
            clock.advance(seconds)
            scope = http_scope("/a", client=(f"203.0.113.{caller}", 1))
            response = await call(cached, scope)
            (decision,) = scope["state"]["fineflow"]
            assert decision.limit == quotas.get(tier_of(scope) or "free", 3)
            assert ratelimit_headers(response) == rendered_afresh("api", (decision,))

    with patch.object(_headers, "MAX_CACHED_RATES", 2):
        anyio.run(run)


async def test_cached_ratelimit_headers_name_their_own_rule_and_follow_remaining() -> None:
    clock = FakeClock()
    a = limited([Rule("/{path:path}", quota="3/minute", name="a")], clock)
    b = limited([Rule("/{path:path}", quota="3/minute", name="b")], clock)
    seen = []
    for mw in (a, b, a, b, a):
        response = await call(mw, http_scope("/"))
        seen.append(sf(response.header(b"ratelimit")))
    assert seen == [
        [("a", {"r": 2, "t": 20})],
        [("b", {"r": 2, "t": 20})],
        [("a", {"r": 1, "t": 40})],
        [("b", {"r": 1, "t": 40})],
        [("a", {"r": 0, "t": 60})],
    ]
    clock.advance(30)  # remaining 1 again, with another reset: not the cached t=40
    response = await call(a, http_scope("/"))
    assert sf(response.header(b"ratelimit")) == [("a", {"r": 0, "t": 50})]
    other = await call(a, http_scope("/", client=("198.51.100.1", 1)))
    assert sf(other.header(b"ratelimit")) == [("a", {"r": 2, "t": 20})]


async def test_the_rendered_header_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """(The bound itself: test_headers.py, where the cache lives.)"""
    monkeypatch.setattr(_headers, "MAX_CACHED_RATES", 4)
    mw = limited([Rule("/{path:path}", quota="50/minute", name="n")])
    for expected in range(49, 39, -1):  # ten distinct remaining counts, one caller
        response = await call(mw, http_scope("/"))
        assert sf(response.header(b"ratelimit"))[0][1]["r"] == expected
    monkeypatch.undo()
    assert _headers.MAX_CACHED_RATES == 1024


@pytest.mark.parametrize("headers", ["ietf", None])
async def test_an_admitted_websocket_on_the_single_rule_path_is_counted_and_passed(
    headers: str | None,
) -> None:
    seen: list[Any] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["state"]["fineflow"][0].remaining)
        await send({"type": "websocket.accept"})

    mw = limited([Rule("/ws", quota="3/minute")], app=app, headers=headers)
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "websocket.connect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "websocket", "path": "/ws", "headers": [], "client": ("1.2.3.4", 1)}
    await mw(scope, receive, send)
    assert sent == [{"type": "websocket.accept"}]
    assert seen == [2]
    assert (mw.metrics().requests, mw.metrics().allowed) == (1, 1)
