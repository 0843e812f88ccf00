"""examples/ai_gateway.py in-process, against its fake upstream AI API on a real local port."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from fineflow import MemoryStorage
from fineflow.testing import FakeClock

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ai_gateway.py"
PRO = {"x-api-key": "pro-key"}
FREE = {"x-api-key": "free-key"}

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("memory_only")]


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_ai_gateway", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gateway = load()


@pytest.fixture
def memory_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FINEFLOW_DSN", raising=False)


@contextlib.asynccontextmanager
async def running(upstream: Any, **options: Any) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """The gateway app with its lifespan run, and a client for it."""
    options.setdefault("storage", MemoryStorage(clock=FakeClock().time_ns))
    app = gateway.create_app(upstream.url, **options)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
            yield app, http


@pytest.fixture
async def upstream() -> AsyncIterator[Any]:
    async with gateway.FakeAIUpstream() as fake:
        yield fake


async def chat(http: httpx.AsyncClient, headers: dict[str, str] = PRO) -> httpx.Response:
    return await http.post("/v1/chat", json={"prompt": "hello"}, headers=headers)


async def test_full_circuit_lifecycle_with_fallback(upstream: Any) -> None:
    clock = FakeClock(start=1000.0)
    async with running(upstream, clock=clock, reset_timeout=30.0) as (_, http):
        healthy = await chat(http)
        assert healthy.status_code == 200
        assert healthy.json() == {
            "reply": "You said: hello",
            "circuit_state": "closed",
            "from_fallback": False,
            "usage": {"prompt_tokens": 1, "completion_tokens": 3},
        }

        upstream.mode = "fail"
        for attempt in range(1, 6):
            failed = await chat(http)
            assert failed.status_code == 502
            assert failed.json()["from_fallback"] is False
            assert failed.json()["circuit_state"] == ("open" if attempt == 5 else "closed")
        calls_before = upstream.requests

        fallback = await chat(http)
        assert fallback.status_code == 200
        assert fallback.json() == {
            "reply": gateway.FALLBACK_REPLY,
            "circuit_state": "open",
            "from_fallback": True,
            "usage": None,
        }
        assert fallback.headers["retry-after"] == "30"
        assert upstream.requests == calls_before  # rejected without reaching the upstream

        upstream.mode = "ok"  # recovered, but the breaker waits out its reset timeout
        clock.advance(29.0)
        assert (await chat(http)).json()["from_fallback"] is True
        assert upstream.requests == calls_before

        clock.advance(1.0)  # the reset timeout elapsed: three trial requests close it
        states = [(await chat(http)).json()["circuit_state"] for _ in range(3)]
        assert states == ["half_open", "half_open", "closed"]
        assert upstream.requests == calls_before + 3

        metrics = (await http.get("/v1/breakers")).json()["ai-service"]
        assert metrics["state"] == "closed"
        assert metrics["times_opened"] == 1
        assert metrics["total_failures"] == 5
        assert metrics["total_rejections"] == 2


async def test_a_failing_trial_reopens_the_circuit(upstream: Any) -> None:
    clock = FakeClock(start=1000.0)
    async with running(upstream, clock=clock, failure_threshold=2) as (app, http):
        upstream.mode = "fail"
        for _ in range(2):
            assert (await chat(http)).status_code == 502
        assert app.state.breaker.state.value == "open"
        clock.advance(30.0)
        trial = await chat(http)
        assert (trial.status_code, trial.json()["circuit_state"]) == (502, "open")
        assert (await chat(http)).json()["from_fallback"] is True
        assert app.state.breaker.metrics().times_opened == 2


async def test_upstream_throttling_is_not_a_failure(upstream: Any) -> None:
    async with running(upstream) as (app, http):
        upstream.mode = "throttle"
        for _ in range(8):  # more than the failure threshold
            throttled = await chat(http)
            assert throttled.status_code == 503
            assert throttled.headers["retry-after"] == "7"
            assert throttled.json()["circuit_state"] == "closed"
            assert throttled.json()["from_fallback"] is False
        metrics = app.state.breaker.metrics()
        assert (metrics.total_failures, metrics.total_ignored) == (0, 8)
        upstream.mode = "ok"
        assert (await chat(http)).json()["reply"] == "You said: hello"


async def test_a_stalled_upstream_times_out_and_counts_as_a_failure(upstream: Any) -> None:
    async with running(upstream, timeout=0.2, failure_threshold=1) as (app, http):
        upstream.mode = "stall"  # answers only after the gateway gave up
        stalled = await chat(http)
        assert stalled.status_code == 504
        assert stalled.json()["circuit_state"] == "open"
        assert app.state.breaker.metrics().total_failures == 1
        assert (await chat(http)).json()["from_fallback"] is True


async def test_the_upstream_control_endpoint(upstream: Any) -> None:
    async with httpx.AsyncClient(base_url=upstream.url) as http:
        assert (await http.post("/control", json={"mode": "fail"})).json() == {"mode": "fail"}
        assert upstream.mode == "fail"
        assert (await http.post("/control", json={"mode": "nope"})).status_code == 400
        assert (await http.get("/control")).json()["mode"] == "fail"
        assert (await http.post("/v1/complete", json={"prompt": "x"})).status_code == 500


async def test_rate_limit_per_tier(upstream: Any) -> None:
    async with running(upstream) as (_, http):
        statuses = [(await chat(http, FREE)).status_code for _ in range(6)]
        assert statuses == [200] * 5 + [429]
        limited = await chat(http, FREE)
        assert limited.status_code == 429
        assert limited.headers["content-type"].startswith("application/problem+json")
        # Another key has its own bucket, and the pro tier a larger quota.
        pro = [(await chat(http, PRO)).status_code for _ in range(6)]
        assert pro == [200] * 6
        assert upstream.requests == 11  # denied requests never reached the upstream
        # A request without a key is not limited, but the gateway refuses it.
        assert (await http.post("/v1/chat", json={"prompt": "x"})).status_code == 401
        assert (await chat(http, {"x-api-key": "made-up"})).status_code == 401


async def test_bad_requests_and_the_example_defaults(upstream: Any) -> None:
    async with running(upstream) as (app, http):
        bad = await http.post("/v1/chat", content=b"not json", headers=PRO)
        assert bad.status_code == 422
    assert isinstance(gateway.default_storage(), MemoryStorage)
    app = gateway.create_app(upstream_port=0)  # starts its own fake upstream
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
            assert (await chat(http)).json()["reply"] == "You said: hello"


def events(text: str) -> list[tuple[str, Any]]:
    """The server-sent events of a body: ``(event type, data)``, data parsed as JSON."""
    found = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        data = fields["data"]
        found.append(
            (fields.get("event", "message"), data if data == "[DONE]" else json.loads(data))
        )
    return found


async def stream_chat(http: httpx.AsyncClient, prompt: str = "hello there") -> httpx.Response:
    return await http.post("/v1/chat/stream", json={"prompt": prompt}, headers=PRO)


def usage_records(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.usage for r in caplog.records if r.name == "ai_gateway.usage"]  # type: ignore[attr-defined]


async def test_streaming_relays_events_and_records_success_when_the_stream_ends(
    upstream: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ai_gateway.usage")
    async with running(upstream) as (app, http):
        async with http.stream(
            "POST", "/v1/chat/stream", json={"prompt": "hello there"}, headers=PRO
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            body = (await response.aread()).decode()
        got = events(body)
        deltas = "".join(data["delta"] for kind, data in got if "delta" in data)
        assert deltas == "You said: hello there"
        assert got[-2] == ("message", {"usage": {"prompt_tokens": 2, "completion_tokens": 4}})
        assert got[-1] == ("message", "[DONE]")
        m = app.state.breaker.metrics()
        assert (m.total_successes, m.total_failures, m.in_flight) == (1, 0, 0)
    (record,) = usage_records(caplog)
    assert record["endpoint"] == "/v1/chat/stream" and record["tier"] == "pro"
    assert (record["stream"], record["circuit_state"], record["completion_tokens"]) == (
        "complete",
        "closed",
        4,
    )


async def test_a_stream_that_breaks_off_is_a_failure_and_opens_the_circuit(
    upstream: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ai_gateway.usage")
    async with running(upstream, failure_threshold=2) as (app, http):
        upstream.mode = "cut"  # two words, then the connection drops
        for attempt in (1, 2):
            broken = await stream_chat(http)
            assert broken.status_code == 200  # the headers had been sent already
            got = events(broken.text)
            assert [d["delta"] for _, d in got[:2]] == ["You", " said:"]
            kind, error = got[-1]
            assert kind == "error" and error["circuit_state"] == (
                "open" if attempt == 2 else "closed"
            )
        calls = upstream.requests
        fallback = await stream_chat(http)
        assert fallback.status_code == 200 and fallback.headers["retry-after"] == "30"
        got = events(fallback.text)
        assert got[0][1]["from_fallback"] is True and got[0][1]["reply"] == gateway.FALLBACK_REPLY
        assert got[-1] == ("message", "[DONE]")
        assert upstream.requests == calls
        m = app.state.breaker.metrics()
        assert (m.total_failures, m.total_rejections, m.times_opened) == (2, 1, 1)
    records = usage_records(caplog)
    assert [(r["stream"], r["circuit_state"]) for r in records[:2]] == [
        ("broken", "closed"),
        ("broken", "open"),
    ]
    assert records[2]["from_fallback"] is True and records[2]["circuit_state"] == "open"


async def test_stream_errors_before_the_first_event_are_http_errors(upstream: Any) -> None:
    async with running(upstream, timeout=0.2) as (app, http):
        upstream.mode = "fail"
        assert (await stream_chat(http)).status_code == 502
        upstream.mode = "throttle"
        throttled = await stream_chat(http)
        assert (throttled.status_code, throttled.headers["retry-after"]) == (503, "7")
        upstream.mode = "stall"
        assert (await stream_chat(http)).status_code == 504
        m = app.state.breaker.metrics()
        assert (m.total_failures, m.total_ignored) == (2, 1)


async def test_every_chat_logs_its_usage_with_the_circuit_state(
    upstream: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ai_gateway.usage")
    async with running(upstream, failure_threshold=1) as (_, http):
        await chat(http)
        await chat(http, FREE)
        upstream.mode = "fail"
        await chat(http)
        await chat(http)
    records = usage_records(caplog)
    assert [(r["tier"], r["status"], r["circuit_state"], r["from_fallback"]) for r in records] == [
        ("pro", 200, "closed", False),
        ("free", 200, "closed", False),
        ("pro", 502, "open", False),
        ("pro", 200, "open", True),
    ]
    assert records[0]["prompt_tokens"] == 1 and records[0]["completion_tokens"] == 3
    assert "circuit_state" in caplog.records[0].getMessage()
