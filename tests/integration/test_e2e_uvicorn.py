"""End to end: real uvicorn processes on 127.0.0.1 sharing one PostgreSQL schema.

Three independent uvicorn processes (distinct ports, so every one of them certainly serves
part of the load) each run ``tests/e2e_app.py`` with its own ``PostgresStorage`` pool, all
on one schema of the session's database. 200 concurrent requests from one client against a
``50/minute`` rule: exactly 50 are admitted, 150 get 429 with ``Retry-After`` and
``RateLimit`` / ``RateLimit-Policy`` Structured Field headers.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from asgi_helpers import sf
from fineflow.testing import UvicornProcess

pytestmark = pytest.mark.postgres

TESTS = Path(__file__).resolve().parent
WORKERS = 3
REQUESTS = 200
LIMIT = 50
START_DEADLINE = 60.0  # seconds for every worker to answer /ping (bounds a broken start)


@pytest.fixture
def workers(pg_dsn: str, pg_schema: str) -> Iterator[list[UvicornProcess]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINEFLOW_")}
    env.update(
        FINEFLOW_E2E_DSN=pg_dsn,
        FINEFLOW_E2E_SCHEMA=pg_schema,
        FINEFLOW_E2E_QUOTA=f"{LIMIT}/minute",
        PYTHONUNBUFFERED="1",
    )
    started: list[UvicornProcess] = []
    try:
        for _ in range(WORKERS):
            started.append(
                UvicornProcess("e2e_app:create_app", factory=True, app_dir=TESTS, env=env)
            )
        for worker in started:
            try:
                worker.wait_listening(START_DEADLINE)
            except RuntimeError as exc:
                pytest.fail(str(exc))
            assert httpx.get(worker.url + "/ping", timeout=5).status_code == 200
        yield started
    finally:
        for worker in started:
            worker.stop()


@dataclass
class Reply:
    """One HTTP/1.1 response as read off the socket."""

    status: int
    headers: dict[str, str]
    body: bytes


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def read_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Reply:
    try:
        data = await reader.read()  # "Connection: close": the server ends the stream
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        headers[name] = f"{headers[name]}, {value.strip()}" if name in headers else value.strip()
    return Reply(int(status_line.split()[1]), headers, body)


async def burst(ports: list[int], path: str, client: str = "one-client") -> list[Reply]:
    """``REQUESTS`` concurrent requests, round robin over ``ports``, sent back to back.

    Raw asyncio streams: every connection is open before the first request is written,
    so the burst takes as little time as the machine allows (a client like httpx spends
    more CPU per request than the servers do).
    """
    streams = await asyncio.gather(*(connect(ports[i % len(ports)]) for i in range(REQUESTS)))
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Client: {client}\r\nConnection: close\r\n\r\n"
    ).encode()
    for _, writer in streams:
        writer.write(request)
    return await asyncio.gather(*(read_reply(r, w) for r, w in streams))


def test_several_uvicorn_workers_share_one_limit(workers: list[UvicornProcess]) -> None:
    ports = [w.port for w in workers]
    pings = asyncio.run(burst(ports, "/ping"))
    assert {p.status for p in pings} == {200}
    assert len({p.headers["x-worker"] for p in pings}) == WORKERS  # three processes serve
    # GCRA frees one slot every 60/50 = 1.2 s: the count is exact because the whole burst
    # is decided well within that (raw sockets, connections opened beforehand).
    responses = asyncio.run(burst(ports, "/limited"))
    statuses = Counter(r.status for r in responses)
    assert statuses == {200: LIMIT, 429: REQUESTS - LIMIT}, (
        statuses,
        [w.output() for w in workers],
    )
    for response in responses:
        policy = sf(response.headers.get("ratelimit-policy"))
        assert policy == [("/limited", {"q": LIMIT, "w": 60})]
        [(name, params)] = sf(response.headers.get("ratelimit"))
        assert name == "/limited"
        assert isinstance(params["r"], int) and 0 <= params["r"] < LIMIT
        assert isinstance(params["t"], int) and params["t"] >= 0
        if response.status == 429:
            retry_after = response.headers.get("retry-after")
            assert retry_after is not None and retry_after.isdigit(), retry_after
            assert int(retry_after) >= 1
            assert response.headers["content-type"].startswith("application/problem+json")
            assert json.loads(response.body)["violated-policies"] == ["/limited"]
        else:
            assert "retry-after" not in response.headers
            assert response.body == b"ok"
