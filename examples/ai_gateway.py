"""An AI gateway: a circuit breaker around the upstream AI API, rate limits per user tier.

One place through which every call to an AI model goes. ``POST /v1/chat`` forwards the prompt
to an upstream AI API over aiohttp, through ``fineflow.aiohttp.circuit_breaker_middleware``
(5 consecutive failures open the circuit for 30 s; then trial requests probe the upstream).
While the circuit is open the gateway answers at once with a fallback reply instead of
waiting on a broken upstream. Every answer says ``circuit_state`` and ``from_fallback``.
``RateLimitMiddleware`` limits each API key by its tier (free 5/minute, pro 50/minute,
enterprise 500/minute).

The upstream here is a fake AI API, a real aiohttp server on 127.0.0.1 that can be told to
fail (500), stall (answer after the gateway's timeout) or throttle (429 + Retry-After).

Run it with ``python examples/ai_gateway.py`` (gateway on http://127.0.0.1:8000, fake
upstream on http://127.0.0.1:8001), then::

    curl -s -X POST -H 'x-api-key: pro-key' -d '{"prompt": "hi"}' http://127.0.0.1:8000/v1/chat
    curl -s -X POST -d '{"mode": "fail"}' http://127.0.0.1:8001/control  # or stall, throttle
    # ... five failing chats later, replies come from the fallback:
    curl -s -X POST -H 'x-api-key: pro-key' -d '{"prompt": "hi"}' http://127.0.0.1:8000/v1/chat
    curl -s -X POST -d '{"mode": "ok"}' http://127.0.0.1:8001/control
    curl -s http://127.0.0.1:8000/v1/breakers

Rate-limit state lives in memory unless ``FINEFLOW_DSN`` names a PostgreSQL database; the
circuit breaker's state is per process, by design.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import aiohttp
from aiohttp import web
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fineflow import (
    BreakerRegistry,
    CircuitBreaker,
    CircuitOpenError,
    MemoryStorage,
    RateLimitMiddleware,
    Rule,
    Storage,
    keys,
)
from fineflow.aiohttp import circuit_breaker_middleware

# Demo accounts: API key -> tier. A real gateway looks keys up in its user store.
API_KEYS = {"free-key": "free", "pro-key": "pro", "enterprise-key": "enterprise"}
TIERS = {"free": "5/minute", "pro": "50/minute", "enterprise": "500/minute"}
BREAKER = "ai-service"
FALLBACK_REPLY = "The assistant is busy right now; here is a canned answer. Please retry soon."

Mode = Literal["ok", "fail", "stall", "throttle"]
MODES: tuple[Mode, ...] = ("ok", "fail", "stall", "throttle")

_api_key = keys.header("x-api-key")


def tier(scope: Any) -> str | None:
    """The caller's tier from its API key (``None``: the default tier, ``free``)."""
    return API_KEYS.get(_api_key(scope) or "")


def default_storage() -> Storage:
    """PostgreSQL when ``FINEFLOW_DSN`` is set, else memory (one process)."""
    if os.environ.get("FINEFLOW_DSN"):
        from fineflow import PostgresStorage

        return PostgresStorage(os.environ["FINEFLOW_DSN"])
    return MemoryStorage()


# -- the fake upstream AI API ---------------------------------------------------------------


class FakeAIUpstream:
    """A local aiohttp server playing the AI API, with a switchable failure ``mode``.

    ``POST /v1/complete`` answers ``{"completion": ...}`` in mode ``"ok"``, 500 in
    ``"fail"``, waits ``stall_seconds`` in ``"stall"``, and 429 with ``Retry-After:
    retry_after`` in ``"throttle"``. ``GET``/``POST /control`` read or change the mode
    (``{"mode": "fail"}``); tests may also set ``mode`` directly.

    Args:
        host: interface to listen on.
        port: port to listen on (``0``: any free port; see ``url`` once started).
        stall_seconds: how long a stalled request waits before answering.
        retry_after: seconds announced by a throttled answer.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        stall_seconds: float = 60.0,
        retry_after: int = 7,
    ) -> None:
        self.host = host
        self.port = port
        self.stall_seconds = stall_seconds
        self.retry_after = retry_after
        self.mode: Mode = "ok"
        self.requests = 0
        self._runner: web.AppRunner | None = None
        self._unstall: asyncio.Event | None = None

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:8001``."""
        return f"http://{self.host}:{self.port}"

    async def __aenter__(self) -> FakeAIUpstream:
        app = web.Application()
        app.router.add_post("/v1/complete", self._complete)
        app.router.add_get("/control", self._get_control)
        app.router.add_post("/control", self._set_control)
        self._unstall = asyncio.Event()
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        self.port = int(self._runner.addresses[0][1])  # the bound port when 0 was asked
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._unstall is not None:
            self._unstall.set()  # release stalled handlers so shutdown does not wait
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        mode = self.mode
        if mode == "fail":
            return web.json_response({"error": "model crashed"}, status=500)
        if mode == "throttle":
            headers = {"Retry-After": str(self.retry_after)}
            return web.json_response({"error": "slow down"}, status=429, headers=headers)
        if mode == "stall" and self._unstall is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._unstall.wait(), self.stall_seconds)
        payload = await request.json()
        prompt = str(payload.get("prompt", ""))
        return web.json_response({"completion": f"You said: {prompt}"})

    async def _get_control(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"mode": self.mode, "requests": self.requests})

    async def _set_control(self, request: web.Request) -> web.StreamResponse:
        payload = await request.json()
        mode = payload.get("mode")
        if mode not in MODES:
            return web.json_response({"error": f"mode must be one of {MODES}"}, status=400)
        self.mode = mode
        return web.json_response({"mode": self.mode})


# -- the gateway ----------------------------------------------------------------------------


class Gateway:
    """The upstream client: one aiohttp session whose requests go through the breaker.

    Args:
        upstream_url: the AI API's base URL.
        breaker: guards every upstream request.
        timeout: seconds an upstream request may take in total (a timeout is a failure).
    """

    def __init__(self, upstream_url: str, breaker: CircuitBreaker, *, timeout: float) -> None:
        self.upstream_url = upstream_url.rstrip("/")
        self.breaker = breaker
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Gateway:
        self._session = aiohttp.ClientSession(
            middlewares=[circuit_breaker_middleware(breaker=self.breaker)],
            timeout=self.timeout,
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def chat(self, prompt: str) -> tuple[int, dict[str, Any], dict[str, str]]:
        """Ask the upstream; returns the gateway's status, JSON body and extra headers."""
        if self._session is None:
            raise RuntimeError("Gateway is not open; use it as 'async with Gateway(...)'")
        url = f"{self.upstream_url}/v1/complete"
        try:
            async with self._session.post(url, json={"prompt": prompt}) as upstream:
                if upstream.status == 429:
                    # The upstream throttles us: not a failure of its health (the breaker's
                    # on_throttle policy "ignore"), but this caller must wait.
                    retry = upstream.headers.get("Retry-After", "1")
                    body = self._body(error="upstream is throttling requests")
                    return 503, body, {"Retry-After": retry}
                if upstream.status >= 400:
                    return 502, self._body(error=f"upstream answered {upstream.status}"), {}
                payload = await upstream.json()
        except CircuitOpenError as exc:
            # The breaker rejected the call before any connection: answer with the fallback.
            seconds = exc.retry_after
            headers = {} if seconds is None else {"Retry-After": str(max(1, round(seconds)))}
            return 200, self._body(reply=FALLBACK_REPLY, from_fallback=True), headers
        except TimeoutError:
            return 504, self._body(error="upstream timed out"), {}
        except aiohttp.ClientError as exc:
            return 502, self._body(error=f"upstream unreachable: {exc!r}"), {}
        return 200, self._body(reply=str(payload.get("completion", ""))), {}

    def _body(
        self,
        *,
        reply: str | None = None,
        error: str | None = None,
        from_fallback: bool = False,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "reply": reply,
            "circuit_state": self.breaker.state.value,
            "from_fallback": from_fallback,
        }
        if error is not None:
            body["error"] = error
        return body


def create_app(
    upstream_url: str | None = None,
    *,
    storage: Storage | None = None,
    upstream_port: int = 0,
    timeout: float = 10.0,
    failure_threshold: int = 5,
    reset_timeout: float = 30.0,
    half_open_max_calls: int = 3,
    clock: Callable[[], float] = time.monotonic,
) -> Starlette:
    """The gateway app.

    Args:
        upstream_url: the AI API's base URL; ``None`` starts a ``FakeAIUpstream`` on
            127.0.0.1:``upstream_port`` with the app's lifespan.
        storage: the rate limiter's storage (default: ``default_storage()``).
        upstream_port: the port of the fake upstream the app starts itself.
        timeout: seconds an upstream request may take.
        failure_threshold: consecutive upstream failures that open the circuit.
        reset_timeout: seconds the circuit stays open before trial requests.
        half_open_max_calls: trial requests, all of which must succeed to close it.
        clock: the breaker's monotonic clock (tests inject a fake one).
    """
    registry = BreakerRegistry(
        failure_threshold=failure_threshold,
        reset_timeout=reset_timeout,
        half_open_max_calls=half_open_max_calls,
        clock=clock,
    )
    breaker = registry.get_or_create(BREAKER)
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            url = upstream_url
            if url is None:
                fake = FakeAIUpstream(port=upstream_port)
                url = (await stack.enter_async_context(fake)).url
                state["upstream"] = fake
            state["gateway"] = await stack.enter_async_context(
                Gateway(url, breaker, timeout=timeout)
            )
            yield

    async def chat(request: Request) -> Response:
        if tier(request.scope) is None:
            return JSONResponse({"error": "unknown or missing x-api-key"}, status_code=401)
        try:
            payload = await request.json()
        except ValueError:
            payload = None
        if not isinstance(payload, dict) or not isinstance(payload.get("prompt"), str):
            return JSONResponse({"error": 'send {"prompt": "..."}'}, status_code=422)
        gateway: Gateway | None = state.get("gateway")
        if gateway is None:
            return JSONResponse({"error": "gateway not started (no lifespan)"}, status_code=503)
        status, body, headers = await gateway.chat(payload["prompt"])
        return JSONResponse(body, status_code=status, headers=headers)

    async def breakers(request: Request) -> Response:
        metrics = registry.metrics()
        return JSONResponse(
            {
                name: {
                    "state": m.state.value,
                    "consecutive_failures": m.consecutive_failures,
                    "total_calls": m.total_calls,
                    "total_successes": m.total_successes,
                    "total_failures": m.total_failures,
                    "total_ignored": m.total_ignored,
                    "total_rejections": m.total_rejections,
                    "times_opened": m.times_opened,
                }
                for name, m in metrics.items()
            }
        )

    app = Starlette(
        routes=[
            Route("/v1/chat", chat, methods=["POST"]),
            Route("/v1/breakers", breakers),
        ],
        middleware=[
            Middleware(
                RateLimitMiddleware,
                storage=storage if storage is not None else default_storage(),
                rules=[Rule("/v1/chat", tiers=TIERS)],
                key=_api_key,
                tier=tier,
                default_tier="free",
            ),
        ],
        lifespan=lifespan,
    )
    app.state.registry = registry
    app.state.breaker = breaker
    return app


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(
        create_app(upstream_port=int(os.environ.get("UPSTREAM_PORT", "8001"))),
        host="127.0.0.1",
        port=int(os.environ.get("PORT", "8000")),
    )
