"""A misbehaving upstream for the fineflow.httpx tests, served by uvicorn in its own process.

``GET /<kind>``: ``ok``; ``500``; ``429`` (``Retry-After: 30``); ``hang`` (never answers);
``drop-body`` (a chunk of the body, then the connection dies); ``slow-body`` (a chunk, then
nothing). ``GET /hits`` says how many other requests it has seen.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

hits = 0


class Dropped(Exception):
    """Raised mid-body: uvicorn then closes the connection before the body is complete."""


async def body(kind: str) -> AsyncIterator[bytes]:
    yield b"x" * 1000
    if kind == "slow-body":
        await anyio.sleep_forever()
    raise Dropped


async def misbehave(request: Request) -> Response:
    global hits
    hits += 1
    kind = request.path_params["kind"]
    if kind == "ok":
        return PlainTextResponse("fine")
    if kind == "500":
        return PlainTextResponse("broken", status_code=500)
    if kind == "429":
        return PlainTextResponse("slow down", status_code=429, headers={"Retry-After": "30"})
    if kind == "hang":
        await anyio.sleep_forever()
    return StreamingResponse(body(kind), headers={"Content-Length": "100000"})


async def count(request: Request) -> Response:
    return JSONResponse({"hits": hits})


app = Starlette(routes=[Route("/hits", count), Route("/{kind}", misbehave)])
