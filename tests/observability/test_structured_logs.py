"""Structured log records: the field names, key digests, error texts, every logger call of the
package carrying an ``event``, and the denied-request log that cannot flood."""

from __future__ import annotations

import ast
import importlib.util
import io
import json
import logging
import pathlib

import pytest

import fineflow as ff
from asgi_helpers import call, echo_app, http_scope
from fineflow import keys
from fineflow._logfields import DIGEST_SECRET_ENV, FIELDS, error_text, key_digest, log_extra
from fineflow._ratelimit.headers import AppliedPolicy
from fineflow.testing import FakeClock

pytestmark = pytest.mark.anyio

SRC = pathlib.Path(ff.__file__).parent
EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"
LEVELS = {"debug", "info", "warning", "error", "exception", "critical", "log"}


def test_a_key_digest_is_12_hex_digits_the_same_everywhere() -> None:
    digest = keys.digest("sk-live-abc")
    assert len(digest) == 12
    assert int(digest, 16) >= 0
    assert digest == key_digest("sk-live-abc") == keys.digest("sk-live-abc")
    assert digest != keys.digest("sk-live-abd")
    assert keys.digest("\udcff odd") != keys.digest("? odd")  # lone surrogates digest too


def test_a_secret_keys_the_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    plain = keys.digest("203.0.113.9")
    monkeypatch.setenv(DIGEST_SECRET_ENV, "s3cret")
    keyed = keys.digest("203.0.113.9")
    monkeypatch.setenv(DIGEST_SECRET_ENV, "other" * 40)  # longer than BLAKE2b's 64-byte keys
    assert len({plain, keyed, keys.digest("203.0.113.9")}) == 3


def test_error_text_keeps_the_first_line_and_replaces_keys() -> None:
    exc = ValueError("no room for alice in rule api\nDETAIL: Failing row contains (bob, api)")
    text = error_text(exc, ["alice", ""])
    assert text == f"ValueError: no room for <key {key_digest('alice')}> in rule api"
    assert error_text(TimeoutError()) == "TimeoutError"
    assert len(error_text(RuntimeError("x" * 1000))) == 200


def test_log_extra_digests_the_key_and_refuses_unknown_fields() -> None:
    extra = log_extra("ratelimit_denied", key="alice", rule="api", tier=None)
    assert extra == {"event": "ratelimit_denied", "key_digest": key_digest("alice"), "rule": "api"}
    with pytest.raises(ValueError, match="unknown log field 'rules'"):
        log_extra("x", rules="api")
    assert set(FIELDS) >= {"event", "rule", "tier", "policy", "key_digest", "breaker", "error"}


def logger_calls() -> list[tuple[str, int, ast.Call]]:
    calls = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in LEVELS
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "logger"
            ):
                calls.append((str(path.relative_to(SRC)), node.lineno, node))
    return calls


def test_every_logger_call_of_the_package_passes_structured_extras() -> None:
    calls = logger_calls()
    assert len(calls) >= 15  # the scan finds them (breaker, limiter, storages, middleware ...)
    missing = [
        f"{path}:{line}"
        for path, line, node in calls
        if not any(k.arg == "extra" for k in node.keywords)
    ]
    assert missing == []


def test_denied_log_writes_at_most_max_records_per_rule_then_a_summary(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock(start=0.0)
    log = ff.DeniedLog(max_records=2, interval=10.0, clock=clock)
    scope = http_scope("/x")
    hit = ff.Hit("alice", ff.Quota.parse("1/minute"), 1, "api", "free")
    denied = ff.Decisions([ff.Decision(False, 1, 0, 60.0, 60.0, "1-per-60s")])
    applied = [AppliedPolicy("api", hit.quota)]
    caplog.set_level(logging.INFO, logger="fineflow.middleware")

    def events() -> list[str]:
        return [r.event for r in caplog.records]  # type: ignore[attr-defined]

    for _ in range(5):
        log.record(scope, [hit], applied, denied, shadow=False)
    assert events() == ["ratelimit_denied"] * 2
    other = hit._replace(endpoint="other")
    log.record(scope, [other], applied, denied, shadow=False)  # rules have allowances of their own
    assert events()[-1] == "ratelimit_denied"
    clock.advance(10.0)
    log.record(scope, [hit], applied, denied, shadow=True)
    summary, record = caplog.records[-2:]
    assert (summary.event, summary.rule, summary.count) == ("ratelimit_denied_suppressed", "api", 3)  # type: ignore[attr-defined]
    assert "suppressed 3" in summary.getMessage()
    assert (record.event, record.rule, record.tier, record.policy) == (  # type: ignore[attr-defined]
        "ratelimit_shadow_denied",
        "api",
        "free",
        "1-per-60s",
    )
    assert (record.key_digest, record.method, record.path) == (keys.digest("alice"), "GET", "/x")  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_records": 0}, "max_records"),
        ({"max_records": True}, "max_records"),
        ({"interval": 0}, "interval"),
        ({"level": "INFO"}, "level"),
    ],
)
def test_denied_log_options_are_checked(options: dict[str, object], message: str) -> None:
    with pytest.raises(ff.ConfigurationError, match=message):
        ff.DeniedLog(**options)  # type: ignore[arg-type]


def test_the_middleware_checks_log_denied() -> None:
    with pytest.raises(ff.ConfigurationError, match="log_denied"):
        ff.RateLimitMiddleware(
            echo_app,
            storage=ff.MemoryStorage(),
            rules=[ff.Rule("/x", quota="1/minute")],
            log_denied="yes",  # type: ignore[arg-type]
        )


@pytest.mark.parametrize("log_denied", [False, True])
async def test_denials_are_logged_only_when_asked(
    log_denied: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="fineflow")
    mw = ff.RateLimitMiddleware(
        echo_app,
        storage=ff.MemoryStorage(),
        rules=[ff.Rule("/x", quota="1/minute", name="x")],
        log_denied=log_denied,
    )
    statuses = [(await call(mw, http_scope("/x"))).status for _ in range(3)]
    assert statuses == [200, 429, 429]
    denied = [r for r in caplog.records if getattr(r, "event", None) == "ratelimit_denied"]
    assert len(denied) == (2 if log_denied else 0)


async def test_an_unknown_tier_is_logged_with_rule_and_tier(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="fineflow.middleware")
    mw = ff.RateLimitMiddleware(
        echo_app,
        storage=ff.MemoryStorage(),
        rules=[ff.Rule("/x", tiers={"free": "1/minute"}, name="x")],
        tier=lambda scope: "gold",
    )
    await call(mw, http_scope("/x"))
    [record] = caplog.records
    assert (record.event, record.rule, record.tier) == ("ratelimit_unknown_tier", "x", "gold")  # type: ignore[attr-defined]


async def test_the_json_logging_example_prints_one_json_object_per_record() -> None:
    spec = importlib.util.spec_from_file_location("json_logging", EXAMPLES / "json_logging.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = io.StringIO()
    level = logging.getLogger("fineflow").level
    try:
        await example.main(out)
    finally:
        logging.getLogger("fineflow").setLevel(level)
    denied, opened = (json.loads(line) for line in out.getvalue().splitlines())
    assert denied["event"] == "ratelimit_denied"
    assert (denied["rule"], denied["key_digest"]) == ("items", keys.digest("sk-live-example"))
    assert (opened["event"], opened["breaker"], opened["to_state"]) == (
        "circuit_breaker_transition",
        "upstream",
        "open",
    )
    assert "sk-live-example" not in out.getvalue()


async def test_route_limits_log_their_denials_when_asked(caplog: pytest.LogCaptureFixture) -> None:
    """``log_denied`` on the FastAPI dependency and on ``@ff.limit``, as on the middleware."""
    import httpx
    from fastapi import Depends, FastAPI
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    from fineflow.fastapi import RateLimit, install

    limiter = ff.RateLimiter(ff.MemoryStorage())
    api = FastAPI()
    install(api)
    quiet = RateLimit("1/minute", name="quiet", limiter=limiter)
    logged = RateLimit("1/minute", name="fastapi", limiter=limiter, log_denied=True)

    @api.get("/quiet", dependencies=[Depends(quiet)])
    async def quiet_route() -> str:
        return "ok"

    @api.get("/logged", dependencies=[Depends(logged)])
    async def logged_route() -> str:
        return "ok"

    once = ff.DeniedLog(max_records=1)

    @ff.limit("1/minute", name="starlette", limiter=limiter, log_denied=once)
    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("ok")

    site = Starlette(routes=[Route("/limited", endpoint)])
    caplog.set_level(logging.INFO, logger="fineflow.middleware")
    for app, path in ((api, "/quiet"), (api, "/logged"), (site, "/limited")):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            statuses = [(await client.get(path)).status_code for _ in range(4)]
        assert statuses == [200, 429, 429, 429]
    records = [(r.event, r.rule, r.path) for r in caplog.records if hasattr(r, "event")]  # type: ignore[attr-defined]
    assert records == [
        ("ratelimit_denied", "fastapi", "/logged"),
        ("ratelimit_denied", "fastapi", "/logged"),
        ("ratelimit_denied", "fastapi", "/logged"),
        ("ratelimit_denied", "starlette", "/limited"),  # then suppressed, by its DeniedLog
    ]
    with pytest.raises(ff.ConfigurationError, match="log_denied"):
        ff.limit("1/minute", log_denied="yes")  # type: ignore[arg-type]
