"""fineflow.aiohttp against a real local aiohttp server (asyncio only: aiohttp is asyncio)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from fineflow._breaker.config import CircuitState
from fineflow._breaker.registry import BreakerRegistry
from fineflow._errors import CircuitOpenError
from fineflow.aiohttp import CircuitOpenClientError, circuit_breaker_middleware

pytestmark = pytest.mark.anyio


class Upstream:
    """A misbehaving upstream on 127.0.0.1 that counts the requests it sees."""

    def __init__(self) -> None:
        self.hits = 0
        self.url = ""
        self.hanging = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        kind = request.match_info["kind"]
        if kind == "ok":
            return web.Response(text="fine")
        if kind == "500":
            return web.Response(status=500, text="broken")
        if kind == "429":
            return web.Response(status=429, headers={"Retry-After": "30"})
        if kind == "hang":
            self.hanging.set()
            await asyncio.sleep(3600)
        transport = request.transport
        assert transport is not None
        if kind == "drop":
            transport.abort()
            return web.Response()
        response = web.StreamResponse(headers={"Content-Length": "100000"})
        await response.prepare(request)
        await response.write(b"x" * 1000)
        if kind == "slow-body":
            await asyncio.sleep(3600)
        transport.abort()  # "drop-body": the connection dies halfway through the body
        return response


@asynccontextmanager
async def upstream() -> AsyncIterator[Upstream]:
    server = Upstream()
    app = web.Application()
    app.router.add_get("/{kind}", server.handle)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    server.url = f"http://{host}:{port}"
    try:
        yield server
    finally:
        await runner.cleanup()


@asynccontextmanager
async def client(registry: BreakerRegistry, **options: Any) -> AsyncIterator[aiohttp.ClientSession]:
    middleware = circuit_breaker_middleware(registry)
    async with aiohttp.ClientSession(middlewares=[middleware], **options) as session:
        yield session


async def test_5xx_trips_the_host_breaker_and_the_open_error_is_both_kinds() -> None:
    registry = BreakerRegistry(failure_threshold=2)
    async with upstream() as up, client(registry) as session:
        for _ in range(2):
            async with session.get(f"{up.url}/500") as response:
                assert response.status == 500
        with pytest.raises(CircuitOpenClientError) as info:
            await session.get(f"{up.url}/ok")
        assert isinstance(info.value, CircuitOpenError)
        assert isinstance(info.value, aiohttp.ClientError)
        assert info.value.retry_after == pytest.approx(30.0, abs=1.0)
        assert up.hits == 2
        name = up.url.removeprefix("http://")
        assert name in registry and registry.metrics()[name].state is CircuitState.OPEN


async def test_one_breaker_per_upstream_host() -> None:
    registry = BreakerRegistry(failure_threshold=1)
    async with upstream() as bad, upstream() as good, client(registry) as session:
        async with session.get(f"{bad.url}/500"):
            pass
        with pytest.raises(CircuitOpenClientError):
            await session.get(f"{bad.url}/ok")
        async with session.get(f"{good.url}/ok") as response:
            assert await response.text() == "fine"
    assert len(registry) == 2


async def test_429_hold_rejects_for_the_capped_retry_after_without_opening() -> None:
    registry = BreakerRegistry(on_throttle="hold", max_hold=5.0)
    async with upstream() as up, client(registry) as session:
        async with session.get(f"{up.url}/429") as response:
            assert response.status == 429
        with pytest.raises(CircuitOpenClientError) as info:
            await session.get(f"{up.url}/ok")
        assert 4.0 < (info.value.retry_after or 0) <= 5.0
        assert up.hits == 1
        (metrics,) = registry.metrics().values()
        assert metrics.times_opened == 0 and metrics.state is CircuitState.CLOSED


async def test_429_is_ignored_by_default() -> None:
    registry = BreakerRegistry(failure_threshold=1)
    async with upstream() as up, client(registry) as session:
        for _ in range(3):
            async with session.get(f"{up.url}/429") as response:
                assert response.status == 429
    (metrics,) = registry.metrics().values()
    assert (metrics.total_ignored, metrics.total_failures) == (3, 0)


@pytest.mark.parametrize(
    "limits",
    [aiohttp.ClientTimeout(total=0.2), aiohttp.ClientTimeout(sock_read=0.2)],
    ids=["total", "sock_read"],
)
async def test_a_hanging_upstream_times_out_and_counts(limits: aiohttp.ClientTimeout) -> None:
    registry = BreakerRegistry(failure_threshold=1)
    async with upstream() as up, client(registry, timeout=limits) as session:
        with pytest.raises(TimeoutError):
            await session.get(f"{up.url}/hang")
        with pytest.raises(CircuitOpenClientError):
            await session.get(f"{up.url}/ok")
    (metrics,) = registry.metrics().values()
    assert metrics.total_failures == 1 and metrics.total_ignored == 0


async def test_a_dropped_connection_is_a_failure() -> None:
    registry = BreakerRegistry(failure_threshold=1)
    async with upstream() as up, client(registry) as session:
        with pytest.raises(aiohttp.ClientError):
            await session.get(f"{up.url}/drop")
    (metrics,) = registry.metrics().values()
    assert metrics.state is CircuitState.OPEN


async def test_a_body_that_fails_mid_stream_is_a_failure() -> None:
    registry = BreakerRegistry(failure_threshold=1)
    async with (
        upstream() as up,
        client(registry) as session,
        session.get(f"{up.url}/drop-body") as response,
    ):
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    (metrics,) = registry.metrics().values()
    assert (metrics.total_failures, metrics.total_successes, metrics.in_flight) == (1, 0, 0)
    assert metrics.state is CircuitState.OPEN


async def test_success_is_recorded_once_the_body_is_complete() -> None:
    registry = BreakerRegistry()
    async with upstream() as up, client(registry) as session:
        response = await session.get(f"{up.url}/ok")
        assert await response.text() == "fine"
        response.release()
    (metrics,) = registry.metrics().values()
    assert (metrics.total_successes, metrics.in_flight) == (1, 0)


async def test_releasing_before_the_body_or_cancelling_is_ignored() -> None:
    registry = BreakerRegistry(failure_threshold=1)
    async with upstream() as up, client(registry) as session:
        async with session.get(f"{up.url}/slow-body") as response:
            assert response.status == 200
        task = asyncio.ensure_future(session.get(f"{up.url}/hang"))
        await up.hanging.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    (metrics,) = registry.metrics().values()
    assert (metrics.total_ignored, metrics.total_failures, metrics.in_flight) == (2, 0, 0)
    assert metrics.state is CircuitState.CLOSED
