"""Per-request quotas: ``Rule(path, quota=callable)``, as an app sees them."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_helpers import call, echo_app, http_scope, sf
from fineflow import (
    ConfigurationError,
    MemoryStorage,
    Quota,
    RateLimitMiddleware,
    Rule,
    keys,
)
from fineflow._asgi.types import Scope
from fineflow._ratelimit import ruleset
from fineflow._ratelimit.quota import Quota as _Quota
from fineflow.testing import FakeClock

pytestmark = pytest.mark.anyio

PLANS = {"free": "2/minute", "pro": "5/minute"}


def plan_of(scope: Scope) -> str | None:
    """The caller's plan, as an app would read it from a token."""
    headers = dict(scope["headers"])
    plan = headers.get(b"x-plan", b"free").decode()
    return None if plan == "internal" else PLANS[plan]


async def hello(request: Request) -> Response:
    return PlainTextResponse("hello")


def create_app(quota: Any, clock: FakeClock) -> Starlette:
    return Starlette(
        routes=[Route("/api/hello", hello)],
        middleware=[
            Middleware(
                RateLimitMiddleware,
                storage=MemoryStorage(clock=clock.time_ns),
                rules=[Rule("/api/*", quota=quota, name="api")],
                key=keys.header("x-api-key"),
            )
        ],
    )


async def get_statuses(app: Starlette, n: int, plan: str = "free") -> list[httpx.Response]:
    headers = {"x-api-key": "a", "x-plan": plan}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return [await client.get("/api/hello", headers=headers) for _ in range(n)]


async def test_the_quota_follows_the_callers_plan_in_headers_and_state() -> None:
    clock = FakeClock()
    app = create_app(plan_of, clock)
    free = await get_statuses(app, 3)
    assert [r.status_code for r in free] == [200, 200, 429]
    assert sf(free[0].headers["ratelimit-policy"].encode()) == [("api", {"q": 2, "w": 60})]
    pro = await get_statuses(app, 6, "pro")
    # The pro quota keeps its own state (its policy name keys it): 5 more for the same key.
    assert [r.status_code for r in pro] == [200] * 5 + [429]
    assert sf(pro[0].headers["ratelimit"].encode()) == [("api", {"r": 4, "t": 12})]
    internal = await get_statuses(app, 10, "internal")
    assert [r.status_code for r in internal] == [200] * 10  # None exempts
    assert all("ratelimit" not in r.headers for r in internal)
    clock.advance(60)
    assert (await get_statuses(app, 1))[0].status_code == 200


async def test_an_async_function_returning_a_list_of_quotas() -> None:
    async def quotas(scope: Scope) -> list[str | Quota]:
        return ["1/second", Quota.parse("3/minute", name="minute")]

    mw = RateLimitMiddleware(
        echo_app, storage=MemoryStorage(), rules=[Rule("/x", quota=quotas, name="x")]
    )
    response = await call(mw, http_scope("/x"))
    assert response.status == 200
    policies = sf(response.header(b"ratelimit-policy"))
    assert [name for name, _ in policies] == ["x:1-per-1s", "x:minute"]
    assert (await call(mw, http_scope("/x"))).status == 429


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (42, TypeError, "rule 'x' returned 42; return a quota string"),
        ({"q": "1/s"}, TypeError, "rule 'x' returned"),
        ([1, 2], TypeError, "rule 'x' returned"),
        ("ten per minute", ConfigurationError, "rule 'x' returned 'ten per minute': invalid"),
        ([], ConfigurationError, "rule 'x' returned \\(\\): the value must be"),
    ],
)
async def test_a_bad_return_value_fails_the_request_loudly_naming_the_rule(
    value: object, error: type[Exception], message: str
) -> None:
    mw = RateLimitMiddleware(
        echo_app,
        storage=MemoryStorage(),
        rules=[Rule("/x", quota=lambda s: value, name="x")],  # type: ignore[arg-type,return-value]
    )
    with pytest.raises(error, match=message):
        await call(mw, http_scope("/x"))


async def test_returned_strings_are_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[object] = []
    real_parse = _Quota.parse

    def counting_parse(text: str | Quota, *, name: str | None = None) -> Quota:
        parsed.append(text)
        return real_parse(text, name=name)

    mw = RateLimitMiddleware(
        echo_app, storage=MemoryStorage(), rules=[Rule("/x", quota=lambda s: "100/minute")]
    )
    monkeypatch.setattr(_Quota, "parse", counting_parse)
    for _ in range(5):
        assert (await call(mw, http_scope("/x"))).status == 200
    assert parsed == ["100/minute"]


async def test_the_cache_of_parsed_values_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ruleset, "QUOTA_CACHE_SIZE", 4)
    count = iter(range(1, 100))
    rule = Rule("/x", quota=lambda s: f"{next(count)}/minute")
    compiled = ruleset.CompiledRule(rule, None)
    for _ in range(10):
        assert await compiled.plan_of(rule.quota_fn, http_scope("/x")) is not None  # type: ignore[arg-type]
    info = compiled.cache_info()
    assert (info.currsize, info.maxsize) == (4, 4)


def test_a_quota_function_is_a_rule_of_its_own_kind(caplog: pytest.LogCaptureFixture) -> None:
    rule = Rule("/x", quota=plan_of, cost=10)  # no fixed quota to check the cost against
    assert rule.quota_fn is plan_of
    assert rule.quotas == ()
    assert rule.all_quotas() == ()
    assert "quota=<function plan_of" in repr(rule)
    with caplog.at_level(logging.WARNING):
        RateLimitMiddleware(echo_app, storage=MemoryStorage(), rules=[rule])
    assert not caplog.records
