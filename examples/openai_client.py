"""Calling an OpenAI-compatible API through a circuit breaker, with plain httpx.

The AI SDKs (openai, anthropic) are built on httpx, so the breaker goes where they send
requests: an httpx transport. ``fineflow.httpx.CircuitBreakerTransport`` wraps the usual
``httpx.AsyncHTTPTransport`` and keeps one breaker per upstream host: 5xx answers,
connection errors and timeouts count as failures, a 429 goes through the breaker's
``on_throttle`` policy, and while the circuit is open a request fails at once with
``CircuitOpenTransportError`` (an ``httpx.TransportError`` too) instead of waiting on a
broken upstream. With the openai SDK, hand it the same client::

    transport = CircuitBreakerTransport(httpx.AsyncHTTPTransport(retries=1), registry=registry)
    client = openai.AsyncOpenAI(base_url=..., http_client=httpx.AsyncClient(transport=transport))

(an open circuit then surfaces as ``openai.APIConnectionError``, whose ``__cause__`` is the
``CircuitOpenTransportError``; set the SDK's ``max_retries=0`` to leave retrying to you.)

The upstream here is a local stub of the chat completions endpoint, a Starlette app served
by uvicorn on 127.0.0.1, that can be told to fail. Run it with
``python examples/openai_client.py``: a few healthy completions, then the stub fails, the
circuit opens after three failures, and later calls are answered by a fallback without
reaching the stub.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fineflow import BreakerRegistry, CircuitOpenError
from fineflow.httpx import CircuitBreakerTransport

FALLBACK = "(the model is unavailable right now; this is a canned answer)"

# -- the stub upstream ----------------------------------------------------------------------


def create_stub() -> Starlette:
    """An OpenAI-compatible ``POST /v1/chat/completions`` that echoes the last message.

    ``app.state.mode`` is ``"ok"``, ``"fail"`` (500) or ``"throttle"`` (429 +
    ``Retry-After: 5``); ``app.state.requests`` counts the completions asked for.
    """

    async def completions(request: Request) -> Response:
        state = request.app.state
        state.requests += 1
        if state.mode == "fail":
            error = {"message": "The server had an error", "type": "server_error"}
            return JSONResponse({"error": error}, status_code=500)
        if state.mode == "throttle":
            error = {"message": "Rate limit reached", "type": "rate_limit_error"}
            return JSONResponse({"error": error}, status_code=429, headers={"Retry-After": "5"})
        body = await request.json()
        prompt = str(body["messages"][-1]["content"])
        reply = f"You said: {prompt}"
        return JSONResponse(
            {
                "id": f"chatcmpl-{state.requests}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "stub-model"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": reply},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": len(prompt.split()),
                    "completion_tokens": len(reply.split()),
                    "total_tokens": len(prompt.split()) + len(reply.split()),
                },
            }
        )

    app = Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])
    app.state.mode = "ok"
    app.state.requests = 0
    return app


@contextlib.asynccontextmanager
async def serve(app: Starlette) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1 and a free port; yield its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()  # startup failed: raise its error
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


# -- the client -----------------------------------------------------------------------------


class ChatClient:
    """A minimal chat-completions client on httpx, its requests guarded by a breaker.

    Args:
        base_url: the API's base URL (``.../v1`` is appended).
        registry: where the per-host breakers come from (their options).
        api_key: sent as ``Authorization: Bearer ...``.
        model: the model to ask.
    """

    def __init__(
        self,
        base_url: str,
        *,
        registry: BreakerRegistry,
        api_key: str = "sk-local-stub",
        model: str = "stub-model",
    ) -> None:
        self.model = model
        self.transport = CircuitBreakerTransport(
            httpx.AsyncHTTPTransport(retries=1), registry=registry
        )
        self.http = httpx.AsyncClient(
            base_url=f"{base_url.rstrip('/')}/v1",
            transport=self.transport,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=httpx.Timeout(30.0, connect=5.0),
        )

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.http.aclose()

    async def complete(self, prompt: str) -> dict[str, Any]:
        """One chat completion: the response JSON.

        Raises:
            CircuitOpenTransportError: the upstream's circuit is open (nothing was sent).
            httpx.HTTPStatusError: the upstream answered with an error status.
            httpx.TransportError: the upstream could not be reached or timed out.
        """
        messages = [{"role": "user", "content": prompt}]
        response = await self.http.post(
            "/chat/completions", json={"model": self.model, "messages": messages}
        )
        response.raise_for_status()
        payload: dict[str, Any] = response.json()
        return payload

    async def reply(self, prompt: str) -> str:
        """The assistant's answer, or ``FALLBACK`` while the circuit is open."""
        try:
            payload = await self.complete(prompt)
        except CircuitOpenError:
            return FALLBACK
        return str(payload["choices"][0]["message"]["content"])


async def main() -> None:
    """Healthy calls, an outage that opens the circuit, fallbacks while it is open."""
    stub = create_stub()
    registry = BreakerRegistry(failure_threshold=3, reset_timeout=30.0)
    async with serve(stub) as url, ChatClient(url, registry=registry) as chat:
        for prompt in ("hello", "how are you?"):
            print(f"{prompt!r} -> {await chat.reply(prompt)!r}")
        stub.state.mode = "fail"
        for attempt in range(1, 4):
            try:
                await chat.complete("are you there?")
            except httpx.HTTPStatusError as exc:
                print(f"attempt {attempt}: upstream answered {exc.response.status_code}")
        (breaker,) = registry
        print(f"circuit {breaker.name!r} is {breaker.state.value}")
        seen = stub.state.requests
        print(f"'still there?' -> {await chat.reply('still there?')!r}")
        print(f"requests the stub saw while the circuit was open: {stub.state.requests - seen}")


if __name__ == "__main__":
    asyncio.run(main())
