"""fineflow.httpx with the real httpx client against a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from fineflow._breaker.breaker import CircuitBreaker
from fineflow._breaker.config import CircuitState
from fineflow._breaker.registry import BreakerRegistry
from fineflow._errors import CircuitOpenError, ConfigurationError
from fineflow.httpx import CircuitBreakerTransport, CircuitOpenTransportError, host_key
from fineflow.testing import UvicornProcess, free_port

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    """The base URL of ``httpx_upstream:app`` served by uvicorn."""
    server = UvicornProcess("httpx_upstream:app", app_dir=Path(__file__).parent)
    with server:
        server.wait_listening()
        yield server.url


@asynccontextmanager
async def client(
    upstream: str, registry: BreakerRegistry | None = None, **options: Any
) -> AsyncIterator[httpx.AsyncClient]:
    transport = CircuitBreakerTransport(httpx.AsyncHTTPTransport(), registry=registry)
    async with httpx.AsyncClient(transport=transport, base_url=upstream, **options) as http:
        yield http


async def hits(upstream: str) -> int:
    async with httpx.AsyncClient(base_url=upstream) as http:
        return int((await http.get("/hits")).json()["hits"])


def breaker_of(registry: BreakerRegistry, upstream: str) -> CircuitBreaker:
    breaker = registry.get(host_key(httpx.Request("GET", upstream)))
    assert breaker is not None
    return breaker


def totals(breaker: CircuitBreaker) -> tuple[int, int, int, int]:
    m = breaker.metrics()
    return m.total_successes, m.total_failures, m.total_ignored, m.in_flight


async def test_5xx_trips_and_open_rejects_fast_with_an_error_of_both_kinds(upstream: str) -> None:
    registry = BreakerRegistry(failure_threshold=3, reset_timeout=60.0)
    async with client(upstream, registry) as http:
        assert (await http.get("/ok")).text == "fine"
        for _ in range(3):
            assert (await http.get("/500")).status_code == 500
        breaker = breaker_of(registry, upstream)
        assert breaker.state is CircuitState.OPEN
        before = await hits(upstream)
        with pytest.raises(CircuitOpenTransportError) as caught:
            await http.get("/ok")
        assert await hits(upstream) == before  # rejected before any connection
        error = caught.value
        assert isinstance(error, CircuitOpenError) and isinstance(error, httpx.TransportError)
        assert error.name == breaker.name and error.retry_after == pytest.approx(60.0, abs=5)
        assert error.request.url.path == "/ok"
        with pytest.raises(httpx.HTTPError):  # what httpx users already catch
            await http.get("/ok")
        assert totals(breaker) == (1, 3, 0, 0)
        assert breaker.metrics().total_rejections == 2


async def test_one_breaker_per_upstream_host_and_port(upstream: str) -> None:
    registry = BreakerRegistry(failure_threshold=1)
    async with client(upstream, registry) as http:
        await http.get("/500")
        other = upstream.replace("127.0.0.1", "localhost")
        assert (await http.get(f"{other}/ok")).status_code == 200
    assert sorted(registry.metrics()) == sorted(
        [host_key(httpx.Request("GET", upstream)), host_key(httpx.Request("GET", other))]
    )
    assert host_key(httpx.Request("GET", "https://api.example.com/v1")) == "api.example.com:443"
    assert host_key(httpx.Request("GET", "http://api.example.com:8080/")) == "api.example.com:8080"


@pytest.mark.parametrize(
    ("policy", "expected"),
    [("ignore", (0, 0, 4, 0)), ("failure", (0, 4, 0, 0)), ("hold", (0, 0, 1, 0))],
)
async def test_429_policies(upstream: str, policy: str, expected: tuple[int, ...]) -> None:
    registry = BreakerRegistry(failure_threshold=10, on_throttle=policy, max_hold=5.0)
    async with client(upstream, registry) as http:
        for attempt in range(4):
            if policy == "hold" and attempt > 0:
                with pytest.raises(CircuitOpenTransportError) as caught:
                    await http.get("/429")
                assert caught.value.retry_after == pytest.approx(5.0, abs=1.0)  # capped 30
            else:
                assert (await http.get("/429")).status_code == 429
        breaker = breaker_of(registry, upstream)
        assert totals(breaker) == expected
        assert breaker.state is CircuitState.CLOSED and breaker.metrics().times_opened == 0


async def test_timeouts_and_connection_errors_are_failures(upstream: str) -> None:
    registry = BreakerRegistry(failure_threshold=10)
    async with client(upstream, registry, timeout=0.2) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.get("/hang")
        with pytest.raises(httpx.ReadTimeout):
            await http.get("/slow-body")  # the body stalls after its first chunk
        assert totals(breaker_of(registry, upstream)) == (0, 2, 0, 0)
        nowhere = f"http://127.0.0.1:{free_port()}"
        with pytest.raises(httpx.ConnectError):
            await http.get(f"{nowhere}/ok")
        assert totals(breaker_of(registry, nowhere)) == (0, 1, 0, 0)


async def test_a_body_that_fails_mid_stream_is_a_failure(upstream: str) -> None:
    registry = BreakerRegistry()
    async with client(upstream, registry) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get("/drop-body")
        breaker = breaker_of(registry, upstream)
        assert totals(breaker) == (0, 1, 0, 0)
        async with http.stream("GET", "/drop-body") as response:
            assert response.status_code == 200
            assert totals(breaker) == (0, 1, 0, 1)  # headers alone decide nothing
            with pytest.raises(httpx.RemoteProtocolError):
                await response.aread()
        assert totals(breaker) == (0, 2, 0, 0)


async def test_success_waits_for_the_body_and_an_early_close_is_ignored(upstream: str) -> None:
    registry = BreakerRegistry()
    seen: list[str] = []

    async def listener(event: Any) -> None:  # async listeners run as the body settles
        seen.append(event.kind)

    async with client(upstream, registry) as http:
        await http.get("/ok")
        breaker = breaker_of(registry, upstream)
        breaker.add_listener("success", listener)
        async with http.stream("GET", "/ok") as response:
            assert totals(breaker) == (1, 0, 0, 1)
            assert await response.aread() == b"fine"
            assert totals(breaker) == (2, 0, 0, 0)
        assert seen == ["success"]
        async with http.stream("GET", "/slow-body") as response:
            assert response.status_code == 200  # and leave before the body ended
        assert totals(breaker) == (2, 0, 1, 0)


async def test_one_breaker_for_every_request_and_option_conflicts(upstream: str) -> None:
    breaker = CircuitBreaker("upstream", failure_threshold=1)
    transport = CircuitBreakerTransport(breaker=breaker)  # its own AsyncHTTPTransport
    async with httpx.AsyncClient(transport=transport, base_url=upstream) as http:
        await http.get("/500")
        with pytest.raises(CircuitOpenTransportError, match="'upstream' is open"):
            await http.get("/ok")
        assert transport.breaker_for(httpx.Request("GET", "http://elsewhere/")) is breaker
    with pytest.raises(ConfigurationError, match="not both"):
        CircuitBreakerTransport(breaker=breaker, registry=BreakerRegistry())
    with pytest.raises(ConfigurationError, match="not both"):
        CircuitBreakerTransport(breaker=breaker, key=host_key)
