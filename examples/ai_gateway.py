"""An AI gateway: a circuit breaker around the upstream AI API, rate limits per user tier.

One place through which every call to an AI model goes. ``POST /v1/chat`` forwards the prompt
to an upstream AI API over aiohttp, through ``fineflow.aiohttp.circuit_breaker_middleware``
(5 consecutive failures open the circuit for 30 s; then trial requests probe the upstream).
While the circuit is open the gateway answers at once with a fallback reply instead of
waiting on a broken upstream. Every answer says ``circuit_state`` and ``from_fallback``.
``POST /v1/chat/stream`` answers with server-sent events relayed from the upstream's stream,
through the same breaker: the call's outcome is recorded when the stream ends (success) or
breaks off (failure), not when its first bytes arrive. Each call logs one usage record
(tier, status, tokens, ``circuit_state`` once the call settled) on the ``ai_gateway.usage``
logger.
``RateLimitMiddleware`` limits each API key by its tier (free 5/minute, pro 50/minute,
enterprise 500/minute), on each endpoint.

The upstream here is a fake AI API, a real aiohttp server on 127.0.0.1 that can be told to
fail (500), stall (answer after the gateway's timeout), throttle (429 + Retry-After) or
cut (drop the connection partway through an answer).

Run it with ``python examples/ai_gateway.py`` (gateway on http://127.0.0.1:8000, fake
upstream on http://127.0.0.1:8001), then::

    curl -s -X POST -H 'x-api-key: pro-key' -d '{"prompt": "hi"}' http://127.0.0.1:8000/v1/chat
    curl -sN -X POST -H 'x-api-key: pro-key' -d '{"prompt": "hi there"}' \
        http://127.0.0.1:8000/v1/chat/stream
    curl -s -X POST -d '{"mode": "fail"}' http://127.0.0.1:8001/control  # or stall, throttle, cut
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
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import aiohttp
from aiohttp import web
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
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

Mode = Literal["ok", "fail", "stall", "throttle", "cut"]
MODES: tuple[Mode, ...] = ("ok", "fail", "stall", "throttle", "cut")
SSE = "text/event-stream"

usage_log = logging.getLogger("ai_gateway.usage")

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


def sse(data: dict[str, Any], event: str | None = None) -> bytes:
    """One server-sent event whose data is ``data`` as JSON."""
    head = "" if event is None else f"event: {event}\n"
    return f"{head}data: {json.dumps(data)}\n\n".encode()


# -- the fake upstream AI API ---------------------------------------------------------------


class FakeAIUpstream:
    """A local aiohttp server playing the AI API, with a switchable failure ``mode``.

    ``POST /v1/complete`` answers ``{"completion": ..., "usage": ...}`` in mode ``"ok"``, 500
    in ``"fail"``, waits ``stall_seconds`` in ``"stall"``, 429 with ``Retry-After:
    retry_after`` in ``"throttle"``, and drops the connection in ``"cut"``.
    ``POST /v1/stream`` sends the completion as server-sent events, a word each
    (``data: {"delta": ...}``), then ``data: {"usage": ...}`` and ``data: [DONE]``; in
    ``"cut"`` the connection drops after two words. ``GET``/``POST /control`` read or change
    the mode (``{"mode": "fail"}``); tests may also set ``mode`` directly.

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
        app.router.add_post("/v1/stream", self._stream)
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

    async def _refusal(self, request: web.Request) -> web.StreamResponse | None:
        """The answer of a failing ``mode``, or ``None`` to answer normally."""
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
        return None

    @staticmethod
    async def _completion(request: web.Request) -> tuple[str, dict[str, int]]:
        prompt = str((await request.json()).get("prompt", ""))
        completion = f"You said: {prompt}"
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(completion.split())}
        return completion, usage

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        refusal = await self._refusal(request)
        if refusal is not None:
            return refusal
        completion, usage = await self._completion(request)
        if self.mode == "cut" and request.transport is not None:
            request.transport.abort()
        return web.json_response({"completion": completion, "usage": usage})

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        refusal = await self._refusal(request)
        if refusal is not None:
            return refusal
        completion, usage = await self._completion(request)
        response = web.StreamResponse(headers={"Content-Type": SSE, "Cache-Control": "no-cache"})
        await response.prepare(request)
        for index, word in enumerate(completion.split()):
            await response.write(sse({"delta": word if index == 0 else f" {word}"}))
            if self.mode == "cut" and index == 1 and request.transport is not None:
                request.transport.abort()  # the upstream dies partway through its answer
                return response
        await response.write(sse({"usage": usage}) + b"data: [DONE]\n\n")
        await response.write_eof()
        return response

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

    def _open_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("Gateway is not open; use it as 'async with Gateway(...)'")
        return self._session

    async def chat(self, prompt: str, tier: str) -> tuple[int, dict[str, Any], dict[str, str]]:
        """Ask the upstream; returns the gateway's status, JSON body and extra headers."""
        session = self._open_session()
        started = time.monotonic()
        usage: dict[str, int] | None = None
        try:
            async with session.post(
                f"{self.upstream_url}/v1/complete", json={"prompt": prompt}
            ) as upstream:
                if upstream.status != 200:
                    status, body, headers = self._refused(upstream)
                else:
                    payload = await upstream.json()
                    usage = payload.get("usage")
                    status, headers = 200, {}
                    body = self._body(reply=str(payload.get("completion", "")), usage=usage)
        except CircuitOpenError as exc:
            # The breaker rejected the call before any connection: answer with the fallback.
            status, headers = 200, _retry_after(exc.retry_after)
            body = self._body(reply=FALLBACK_REPLY, from_fallback=True)
        except TimeoutError:
            status, body, headers = 504, self._body(error="upstream timed out"), {}
        except aiohttp.ClientError as exc:
            status, body, headers = 502, self._body(error=f"upstream unreachable: {exc!r}"), {}
        # The permit was settled when the response was released: the state is the verdict's.
        body["circuit_state"] = self.breaker.state.value
        self.log_usage(
            "/v1/chat", tier, status, usage, started, from_fallback=body["from_fallback"]
        )
        return status, body, headers

    async def stream(self, prompt: str, tier: str) -> Response:
        """Relay the upstream's event stream; the breaker records its outcome when it ends."""
        session = self._open_session()
        started = time.monotonic()
        try:
            upstream = await session.post(f"{self.upstream_url}/v1/stream", json={"prompt": prompt})
        except CircuitOpenError as exc:
            self.log_usage("/v1/chat/stream", tier, 200, None, started, from_fallback=True)
            answer = self._body(reply=FALLBACK_REPLY, from_fallback=True)
            events = sse(answer) + b"data: [DONE]\n\n"
            return Response(events, media_type=SSE, headers=_retry_after(exc.retry_after))
        except (TimeoutError, aiohttp.ClientError) as exc:
            status = 504 if isinstance(exc, TimeoutError) else 502
            self.log_usage("/v1/chat/stream", tier, status, None, started)
            return JSONResponse(self._body(error=f"upstream failed: {exc!r}"), status_code=status)
        if upstream.status != 200:
            upstream.release()
            status, body, headers = self._refused(upstream)
            self.log_usage("/v1/chat/stream", tier, status, None, started)
            return JSONResponse(body, status_code=status, headers=headers)
        return StreamingResponse(self._relay(upstream, tier, started), media_type=SSE)

    async def _relay(
        self, upstream: aiohttp.ClientResponse, tier: str, started: float
    ) -> AsyncIterator[bytes]:
        usage: dict[str, int] | None = None
        ended = "abandoned"  # the client went away before the end
        try:
            async for line in upstream.content:  # one SSE line at a time
                if line.startswith(b"data: {") and b'"usage"' in line:
                    usage = json.loads(line[6:])["usage"]
                yield line
            ended = "complete"
        except (TimeoutError, aiohttp.ClientError):
            ended = "broken"
        finally:
            # Releasing settles the breaker's permit: a success once the body reached its
            # end, a failure if it broke off, neither if the client left first.
            upstream.release()
            self.log_usage("/v1/chat/stream", tier, 200, usage, started, stream=ended)
        if ended == "broken":
            yield sse(self._body(error="the upstream's stream broke off"), event="error")

    def _refused(
        self, upstream: aiohttp.ClientResponse
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        """The gateway's answer to an upstream error status."""
        if upstream.status == 429:
            # The upstream throttles us: not a failure of its health (the breaker's
            # on_throttle policy "ignore"), but this caller must wait.
            retry = upstream.headers.get("Retry-After", "1")
            body = self._body(error="upstream is throttling requests")
            return 503, body, {"Retry-After": retry}
        return 502, self._body(error=f"upstream answered {upstream.status}"), {}

    def log_usage(
        self,
        endpoint: str,
        tier: str,
        status: int,
        usage: dict[str, int] | None,
        started: float,
        *,
        from_fallback: bool = False,
        stream: str | None = None,
    ) -> None:
        """Log one call's usage record, with the circuit's state once the call settled."""
        record: dict[str, Any] = {
            "endpoint": endpoint,
            "tier": tier,
            "status": status,
            "prompt_tokens": (usage or {}).get("prompt_tokens", 0),
            "completion_tokens": (usage or {}).get("completion_tokens", 0),
            "from_fallback": from_fallback,
            "circuit_state": self.breaker.state.value,
            "latency_ms": round(1000 * (time.monotonic() - started), 1),
        }
        if stream is not None:
            record["stream"] = stream  # "complete", "broken" or "abandoned"
        usage_log.info("usage %s", json.dumps(record), extra={"usage": record})

    def _body(
        self,
        *,
        reply: str | None = None,
        error: str | None = None,
        from_fallback: bool = False,
        usage: dict[str, int] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "reply": reply,
            "circuit_state": self.breaker.state.value,
            "from_fallback": from_fallback,
            "usage": usage,
        }
        if error is not None:
            body["error"] = error
        return body


def _retry_after(seconds: float | None) -> dict[str, str]:
    return {} if seconds is None else {"Retry-After": str(max(1, round(seconds)))}


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
        caller = tier(request.scope) or "free"
        if request.url.path.endswith("/stream"):
            return await gateway.stream(payload["prompt"], caller)
        status, body, headers = await gateway.chat(payload["prompt"], caller)
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
            Route("/v1/chat/stream", chat, methods=["POST"]),
            Route("/v1/breakers", breakers),
        ],
        middleware=[
            Middleware(
                RateLimitMiddleware,
                storage=storage if storage is not None else default_storage(),
                rules=[Rule("/v1/chat", tiers=TIERS), Rule("/v1/chat/stream", tiers=TIERS)],
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
