"""CircuitBreakerMiddleware through raw ASGI, Starlette, FastAPI and Quart."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any, cast

import httpx
import pytest
from fastapi import FastAPI
from quart import Quart
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from fineflow._asgi.types import Message, Scope
from fineflow._breaker.breaker import CircuitBreaker
from fineflow._breaker.config import CircuitState
from fineflow._breaker.middleware import CircuitBreakerMiddleware
from fineflow._breaker.registry import BreakerRegistry
from fineflow._errors import ConfigurationError
from fineflow.testing import FakeClock

Sent = list[Message]


def state_of(breaker: CircuitBreaker) -> CircuitState:
    return breaker.state


async def no_receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


def http_scope(path: str = "/") -> Scope:
    return {"type": "http", "method": "GET", "path": path, "headers": [], "root_path": ""}


async def run(app: Any, scope: Scope) -> Sent:
    sent: Sent = []

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, no_receive, send)
    return sent


def status_app(status: int) -> Any:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"x"})

    return app


@pytest.mark.anyio
async def test_5xx_trips_then_503_with_retry_after_and_problem_json() -> None:
    breaker = CircuitBreaker("route", failure_threshold=2, reset_timeout=12.5)
    mw = CircuitBreakerMiddleware(status_app(502), breaker=breaker, state_header="X-Circuit-State")
    for _ in range(2):
        assert (await run(mw, http_scope()))[0]["status"] == 502
    assert state_of(breaker) is CircuitState.OPEN
    start, body = await run(mw, http_scope())
    headers = dict(start["headers"])
    assert start["status"] == 503
    assert headers[b"retry-after"] == b"13"
    assert headers[b"content-type"] == b"application/problem+json"
    assert headers[b"x-circuit-state"] == b"open"
    problem = json.loads(body["body"])
    assert problem["status"] == 503 and problem["type"] and "route" in problem["detail"]


@pytest.mark.anyio
async def test_lifespan_and_other_scopes_pass_through_untouched() -> None:
    seen: list[tuple[Scope, Any, Any]] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        seen.append((scope, receive, send))

    mw = CircuitBreakerMiddleware(app)
    scope: Scope = {"type": "lifespan"}

    async def send(message: Message) -> None:
        pass

    await mw(scope, no_receive, send)
    assert seen == [(scope, no_receive, send)]
    assert len(mw.registry or ()) == 0


@pytest.mark.anyio
async def test_streaming_outcome_is_recorded_when_the_stream_ends() -> None:
    breaker = CircuitBreaker("stream")
    during: list[int] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        during.append(breaker.metrics().total_successes)
        await send({"type": "http.response.body", "body": b"b", "more_body": False})

    await run(CircuitBreakerMiddleware(app, breaker=breaker), http_scope())
    assert during == [0]
    assert breaker.metrics().total_successes == 1


@pytest.mark.anyio
async def test_a_stream_failing_halfway_is_a_failure_and_is_reraised() -> None:
    breaker = CircuitBreaker("stream")

    async def chunks() -> AsyncIterator[bytes]:
        yield b"first"
        raise RuntimeError("upstream died")

    async def endpoint(request: Request) -> Response:
        return StreamingResponse(chunks())

    app = Starlette(
        routes=[Route("/s", endpoint)],
        middleware=[Middleware(CircuitBreakerMiddleware, breaker=breaker)],
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        with pytest.raises(RuntimeError, match="upstream died"):
            await client.get("/s")
    m = breaker.metrics()
    assert (m.total_failures, m.total_successes, m.in_flight) == (1, 0, 0)


@pytest.mark.anyio
async def test_client_disconnect_during_send_is_ignored() -> None:
    breaker = CircuitBreaker("svc")
    mw = CircuitBreakerMiddleware(status_app(200), breaker=breaker)

    async def broken_send(message: Message) -> None:
        raise OSError("client went away")

    with pytest.raises(OSError):
        await mw(http_scope(), no_receive, broken_send)
    m = breaker.metrics()
    assert (m.total_ignored, m.total_failures) == (1, 0)


@pytest.mark.anyio
async def test_app_exception_before_response_is_a_failure_and_reraised() -> None:
    breaker = CircuitBreaker("svc", failure_threshold=1)

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        raise LookupError("bug")

    with pytest.raises(LookupError):
        await run(CircuitBreakerMiddleware(app, breaker=breaker), http_scope())
    assert state_of(breaker) is CircuitState.OPEN


@pytest.mark.anyio
async def test_starlette_per_route_keys_fallback_and_state_header() -> None:
    async def bad(request: Request) -> Response:
        return PlainTextResponse("no", status_code=500)

    async def good(request: Request) -> Response:
        return PlainTextResponse("yes")

    fallback = PlainTextResponse("cached answer", headers={"x-fallback": "1"})
    registry = BreakerRegistry(failure_threshold=2)
    app = Starlette(
        routes=[Route("/bad", bad), Route("/good", good)],
        middleware=[
            Middleware(
                CircuitBreakerMiddleware,
                registry=registry,
                key=lambda scope: scope["path"],
                fallback=fallback,
                state_header="x-circuit-state",
            )
        ],
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        statuses = [(await client.get("/bad")).status_code for _ in range(3)]
        assert statuses == [500, 500, 200]
        rejected = await client.get("/bad")
        assert rejected.text == "cached answer" and rejected.headers["x-fallback"] == "1"
        assert rejected.headers["x-circuit-state"] == "open"
        assert (await client.get("/good")).headers["x-circuit-state"] == "closed"
    metrics = registry.metrics()
    assert metrics["/bad"].total_rejections == 2 and metrics["/good"].total_successes == 1


@pytest.mark.anyio
async def test_fastapi_and_quart_apps() -> None:
    api = FastAPI()

    @api.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        if item_id == 0:
            raise ValueError("zero")
        return {"id": item_id}

    breaker = CircuitBreaker("api", failure_threshold=1)
    api.add_middleware(CircuitBreakerMiddleware, breaker=breaker)
    transport = httpx.ASGITransport(app=api)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/items/3")).json() == {"id": 3}
        with pytest.raises(ValueError, match="zero"):
            await client.get("/items/0")
        assert (await client.get("/items/3")).status_code == 503

    quart = Quart(__name__)

    @quart.route("/")
    async def index() -> tuple[str, int]:
        return "down", 503

    qbreaker = CircuitBreaker("quart", failure_threshold=2)
    qtransport = httpx.ASGITransport(
        app=CircuitBreakerMiddleware(cast(Any, quart), breaker=qbreaker)
    )
    async with httpx.AsyncClient(transport=qtransport, base_url="http://t") as client:
        assert [(await client.get("/")).status_code for _ in range(3)] == [503, 503, 503]
    assert qbreaker.metrics().total_failures == 2 and qbreaker.metrics().total_rejections == 1


@pytest.mark.anyio
async def test_key_none_exempts_the_request() -> None:
    mw = CircuitBreakerMiddleware(status_app(500), key=lambda scope: None)
    assert (await run(mw, http_scope()))[0]["status"] == 500
    assert len(mw.registry or ()) == 0


def test_conflicting_options() -> None:
    with pytest.raises(ConfigurationError, match="not both"):
        CircuitBreakerMiddleware(status_app(200), breaker=CircuitBreaker("x"), key=lambda s: "k")


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text(await websocket.receive_text())
    await websocket.close()


async def websocket_session(app: Any, *, denial_extension: bool = True) -> Sent:
    """Drive one websocket connection (connect, one text frame) through ``app``."""
    incoming: list[Message] = [
        {"type": "websocket.connect"},
        {"type": "websocket.receive", "text": "hi"},
        {"type": "websocket.disconnect", "code": 1000},
    ]
    extensions: dict[str, Any] = {"websocket.http.response": {}} if denial_extension else {}
    scope: Scope = {
        "type": "websocket",
        "path": "/ws",
        "raw_path": b"/ws",
        "root_path": "",
        "headers": [],
        "query_string": b"",
        "scheme": "ws",
        "server": ("t", 80),
        "subprotocols": [],
        "extensions": extensions,
    }

    async def receive() -> Message:
        return incoming.pop(0)

    return await run_with(app, scope, receive)


async def run_with(app: Any, scope: Scope, receive: Any) -> Sent:
    sent: Sent = []

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


@pytest.mark.anyio
async def test_websocket_passthrough_and_denial_when_open() -> None:
    breaker = CircuitBreaker("ws")
    app = Starlette(
        routes=[WebSocketRoute("/ws", echo)],
        middleware=[Middleware(CircuitBreakerMiddleware, breaker=breaker)],
    )
    sent = await websocket_session(app)
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert sent[1]["text"] == "hi"
    assert breaker.metrics().total_successes == 1
    breaker.force_open()
    denied = await websocket_session(app)
    assert denied[0]["type"] == "websocket.http.response.start"
    assert denied[0]["status"] == 503
    assert dict(denied[0]["headers"])[b"retry-after"] == b"1"
    assert breaker.metrics().total_rejections == 1


@pytest.mark.anyio
async def test_websocket_close_1013_without_the_denial_extension() -> None:
    breaker = CircuitBreaker("ws")
    breaker.force_open()
    called = False

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        nonlocal called
        called = True

    sent = await websocket_session(
        CircuitBreakerMiddleware(app, breaker=breaker), denial_extension=False
    )
    assert not called
    assert sent == [{"type": "websocket.close", "code": 1013, "reason": "circuit open"}]


@pytest.mark.anyio
async def test_websocket_app_refusing_by_itself_is_ignored() -> None:
    async def refuse(websocket: WebSocket) -> None:
        await websocket.close(code=1008)

    breaker = CircuitBreaker("ws")
    app = Starlette(
        routes=[WebSocketRoute("/ws", refuse)],
        middleware=[Middleware(CircuitBreakerMiddleware, breaker=breaker)],
    )
    sent = await websocket_session(app)
    assert sent[0]["type"] == "websocket.close"
    m = breaker.metrics()
    assert (m.total_ignored, m.total_failures, m.in_flight) == (1, 0, 0)


def throttling_app(retry_after: bytes | None) -> Any:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        headers = [] if retry_after is None else [(b"Retry-After", retry_after)]
        await send({"type": "http.response.start", "status": 429, "headers": headers})
        await send({"type": "http.response.body", "body": b"slow down"})

    return app


@pytest.mark.anyio
async def test_429_goes_through_the_throttle_policy() -> None:
    clock = FakeClock(start=50.0)
    ignoring = CircuitBreaker("ignore", failure_threshold=1, clock=clock)
    mw = CircuitBreakerMiddleware(throttling_app(b"5"), breaker=ignoring)
    for _ in range(3):
        assert (await run(mw, http_scope()))[0]["status"] == 429
    m = ignoring.metrics()
    assert (m.state, m.total_ignored, m.total_failures) == (CircuitState.CLOSED, 3, 0)

    holding = CircuitBreaker("hold", on_throttle="hold", clock=clock)
    mw = CircuitBreakerMiddleware(throttling_app(b"5"), breaker=holding)
    assert (await run(mw, http_scope()))[0]["status"] == 429
    held = await run(mw, http_scope())  # rejected for the upstream's Retry-After
    assert held[0]["status"] == 503 and dict(held[0]["headers"])[b"retry-after"] == b"5"
    clock.now += 5.0
    assert (await run(mw, http_scope()))[0]["status"] == 429
    assert holding.metrics().times_opened == 0

    failing = CircuitBreaker("fail", on_throttle="failure", failure_threshold=1)
    mw = CircuitBreakerMiddleware(throttling_app(None), breaker=failing)
    await run(mw, http_scope())
    assert state_of(failing) is CircuitState.OPEN


@pytest.mark.anyio
async def test_success_metrics_pathsend_and_async_keys() -> None:
    clock = FakeClock(start=50.0)
    registry = BreakerRegistry(clock=clock)

    async def key(scope: Scope) -> str:
        return "k:" + str(scope["path"])

    async def pathsend_app(scope: Scope, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.pathsend", "path": "/tmp/file"})

    mw = CircuitBreakerMiddleware(status_app(200), registry=registry, key=key)
    clock.now = 51.0
    await run(mw, http_scope("/a"))
    clock.now = 52.0
    await run(mw, http_scope("/a"))
    m = registry.metrics()["k:/a"]
    assert (m.total_calls, m.total_successes, m.in_flight) == (2, 2, 0)
    assert (m.consecutive_successes, m.last_success_time) == (2, 52.0)

    streamed = CircuitBreaker("pathsend")
    sent = await run(CircuitBreakerMiddleware(pathsend_app, breaker=streamed), http_scope())
    assert [message["type"] for message in sent][-1] == "http.response.pathsend"
    assert streamed.metrics().total_successes == 1


@pytest.mark.anyio
async def test_success_listener_sees_middleware_successes() -> None:
    breaker = CircuitBreaker("listened")
    seen: list[str] = []
    breaker.add_listener("success", lambda event: seen.append(event.kind))
    await run(CircuitBreakerMiddleware(status_app(204), breaker=breaker), http_scope())
    assert seen == ["success"]


@pytest.mark.anyio
async def test_each_request_is_settled_exactly_once() -> None:
    breaker = CircuitBreaker("svc")

    async def chatty_app(scope: Scope, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 500, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})
        await send({"type": "http.response.body", "body": b"late"})  # after the end

    async def send_then_break(message: Message) -> None:
        if message.get("body") == b"late":
            raise OSError("client went away")

    with pytest.raises(OSError):
        await CircuitBreakerMiddleware(chatty_app, breaker=breaker)(
            http_scope(), no_receive, send_then_break
        )
    m = breaker.metrics()
    assert (m.total_calls, m.total_failures, m.total_ignored, m.in_flight) == (1, 1, 0, 0)

    async def stubborn_app(scope: Scope, receive: Any, send: Any) -> None:
        with contextlib.suppress(OSError):
            await send({"type": "http.response.start", "status": 200, "headers": []})

    async def broken_send(message: Message) -> None:
        raise OSError("client went away")

    await CircuitBreakerMiddleware(stubborn_app, breaker=breaker)(
        http_scope(), no_receive, broken_send
    )
    m = breaker.metrics()  # returned without finishing the response: a failure
    assert (m.total_calls, m.total_failures, m.total_ignored, m.in_flight) == (2, 2, 0, 0)
