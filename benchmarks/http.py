"""Suite 2: real HTTP through uvicorn on 127.0.0.1, requests/s and latency.

One uvicorn process per contender (bare Starlette, fineflow with memory, PostgreSQL and Redis
storage, slowapi, asgi-ratelimit), all started up front on free ports with the same uvicorn
options (``UvicornProcess``: one worker, no access log, the same loop and HTTP
implementation) and stopped in a ``finally``. Each round drives each server in turn with a
bounded load: a fixed number of connections, a time limit and a request cap, so it always
stops by itself. Rounds are short and many, in rotating order, and every ratio is the median
of per-round ratios, so a neighbour's burst hits a round, not a contender. A second bare
server (the A/A control) shows how far the method itself wanders from 1.0. The server's CPU
time per request (``/proc/<pid>/task/*/schedstat``) is reported too: it barely depends on
how much CPU neighbours leave over, so it shows the middleware's cost where req/s is noisy.

Client and servers are not pinned to cores: on a shared 2-core machine pinning every server
to one core lowered throughput and did not narrow the A/A spread (a busy neighbour on the
server's core can no longer be escaped).

Load generator: ``wrk`` when on PATH; else a built-in keep-alive HTTP/1.1 client on raw
asyncio streams (``--http-client raw``, the default). ``--http-client aiohttp`` uses an aiohttp
session instead; on a 2-core box the aiohttp client spends more CPU per request than the
server, so it measures mostly itself and compresses every ratio towards 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fineflow.testing import UvicornProcess

from ._apps import fineflow_name
from ._common import Context, Row, Stat, Table, at_least, interleave, percentile, ratios, stat

__all__ = ["run"]

SUITE = "http"
ROOT = Path(__file__).resolve().parent.parent
CLIENT = os.environ.get("BENCH_HTTP_CLIENT", "auto")  # set by --http-client
_REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: fineflow-bench\r\n\r\n"
_LENGTH = re.compile(rb"(?i)\r\ncontent-length:\s*(\d+)")

_CONTENDERS = [
    ("bare", "bare Starlette"),
    ("bare-aa", "bare Starlette, 2nd server (A/A control)"),
    ("fineflow-memory", "fineflow memory"),
    ("fineflow-memory-export", "fineflow memory, Prometheus export (scraped every 1 s)"),
    ("fineflow-postgres", "fineflow PostgreSQL"),
    ("fineflow-redis", "fineflow Redis"),
    ("slowapi", "slowapi (decorator + middleware)"),
    ("asgi-ratelimit", "asgi-ratelimit (memory)"),
]


class _Server(UvicornProcess):
    """A uvicorn subprocess serving one variant on 127.0.0.1; stopped by ``stop()``."""

    def __init__(self, variant: str, env: dict[str, str]) -> None:
        self.variant = variant
        app_variant = "bare" if variant == "bare-aa" else variant
        super().__init__(
            "benchmarks._apps:http_app",
            factory=True,
            cwd=ROOT,
            env={**os.environ, **env, "BENCH_VARIANT": app_variant},
        )

    def cpu_ns(self) -> int | None:
        """CPU time the server has used so far, in ns (``None`` where /proc cannot say)."""
        total = 0
        try:
            for task in Path(f"/proc/{self.process.pid}/task").iterdir():
                total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return total

    async def ready(self) -> None:
        """Wait up to 30 s until a request succeeds (or raise with the server's log)."""
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                result = await _raw_load(self.port, 1, 1.0, 1)
                if result["statuses"].get(200):
                    return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"uvicorn ({self.variant}) did not come up: {self.output(800)}")


async def _raw_load(port: int, connections: int, seconds: float, cap: int) -> dict[str, Any]:
    """Keep-alive HTTP/1.1 on raw asyncio streams: ``connections`` in parallel, each sending
    one request at a time, until ``seconds`` pass or ``cap`` requests were sent."""
    latencies: list[int] = []
    statuses: Counter[int] = Counter()
    budget = [cap]
    deadline = time.perf_counter_ns() + int(seconds * 1e9)
    clock = time.perf_counter_ns

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while budget[0] > 0:
                start = clock()
                if start >= deadline:
                    return
                budget[0] -= 1
                writer.write(_REQUEST)
                head = await reader.readuntil(b"\r\n\r\n")
                match = _LENGTH.search(head)
                if match:
                    await reader.readexactly(int(match.group(1)))
                else:
                    raise RuntimeError("response without Content-Length")
                latencies.append(clock() - start)
                statuses[int(head[9:12])] += 1
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    start, cpu = clock(), time.process_time()
    await asyncio.wait_for(
        asyncio.gather(*(worker() for _ in range(connections))), timeout=seconds + 30
    )
    return _summary(latencies, statuses, (clock() - start) / 1e9, time.process_time() - cpu)


async def _aiohttp_load(port: int, connections: int, seconds: float, cap: int) -> dict[str, Any]:
    import aiohttp

    latencies: list[int] = []
    statuses: Counter[int] = Counter()
    budget = [cap]
    deadline = time.perf_counter_ns() + int(seconds * 1e9)
    clock = time.perf_counter_ns
    url = f"http://127.0.0.1:{port}/"
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while budget[0] > 0:
                start = clock()
                if start >= deadline:
                    return
                budget[0] -= 1
                async with session.get(url) as response:
                    await response.read()
                latencies.append(clock() - start)
                statuses[response.status] += 1

        start, cpu = clock(), time.process_time()
        await asyncio.wait_for(
            asyncio.gather(*(worker() for _ in range(connections))), timeout=seconds + 30
        )
    return _summary(latencies, statuses, (clock() - start) / 1e9, time.process_time() - cpu)


def _unit_ms(value: str, unit: str) -> float:
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


async def _wrk_load(port: int, connections: int, seconds: float, cap: int) -> dict[str, Any]:
    exe = shutil.which("wrk")
    assert exe is not None
    cmd = [exe, "-t", "1", "-c", str(connections), "-d", f"{max(1, round(seconds))}s"]
    cmd += ["--latency", f"http://127.0.0.1:{port}/"]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=seconds + 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = out.decode(errors="replace")
    rps = re.search(r"Requests/sec:\s*([0-9.]+)", text)
    sent = re.search(r"(\d+) requests in", text)
    p50 = re.search(r"50%\s+([0-9.]+)(us|ms|s)", text)
    p99 = re.search(r"99%\s+([0-9.]+)(us|ms|s)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    if rps is None:
        raise RuntimeError(f"wrk failed: {text[-500:]}")
    return {
        "rps": float(rps.group(1)),
        "p50_ms": _unit_ms(*p50.groups()) if p50 else float("nan"),
        "p99_ms": _unit_ms(*p99.groups()) if p99 else float("nan"),
        "statuses": {"non_2xx": int(non2xx.group(1))} if non2xx else {},
        "requests": int(sent.group(1)) if sent else 0,
    }


def _summary(
    latencies: list[int], statuses: Counter[int], elapsed: float, cpu: float
) -> dict[str, Any]:
    latencies.sort()
    return {
        "client_cpu": cpu / elapsed if elapsed else float("nan"),
        "rps": len(latencies) / elapsed if elapsed else 0.0,
        "p50_ms": percentile(latencies, 0.5) / 1e6,
        "p99_ms": percentile(latencies, 0.99) / 1e6,
        "requests": len(latencies),
        "statuses": dict(statuses),
    }


def _implementations() -> str:
    # What uvicorn's ``--loop auto --http auto`` picks; every server runs this interpreter.
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return f"{loop} loop, {http}"


def _client() -> str:
    if CLIENT != "auto":
        return CLIENT
    return "wrk" if shutil.which("wrk") else "raw"


_LOADERS = {"raw": _raw_load, "aiohttp": _aiohttp_load, "wrk": _wrk_load}


@contextlib.contextmanager
def _servers(variants: list[str], env: dict[str, str]) -> Iterator[dict[str, _Server]]:
    started: dict[str, _Server] = {}
    try:
        for variant in variants:
            started[variant] = _Server(variant, env)
        yield started
    finally:
        for server in started.values():
            server.stop()


async def run(ctx: Context) -> list[Table]:
    """Start the servers, drive them round-robin, return the table and the targets."""
    profile = ctx.profile
    client = _client()
    table = Table(SUITE, f"HTTP through uvicorn (client: {client})", "x bare req/s")
    table.notes.append(
        f"{profile.http_concurrency} keep-alive connections, {profile.http_seconds:g}s or "
        f"{profile.http_requests:,} requests per contender per round, "
        f"{profile.http_rounds} rounds in rotating order; every server: one uvicorn worker, "
        f"{_implementations()}, no access log"
    )
    variants = [v for v, _ in _CONTENDERS]
    if fineflow_name("RateLimitMiddleware") is None:
        variants = [v for v in variants if not v.startswith("fineflow")]
        table.notes.append("fineflow RateLimitMiddleware not available yet: skipped")
    async with contextlib.AsyncExitStack() as stack:
        env: dict[str, str] = {}
        if "fineflow-postgres" in variants:
            if ctx.postgres() is None:
                variants.remove("fineflow-postgres")
                table.notes.append(f"no PostgreSQL ({ctx.pg_error}): fineflow-postgres skipped")
            else:
                env["BENCH_DSN"] = stack.enter_context(ctx.database())
                env["BENCH_SCHEMA"] = "bench_http"
        if "fineflow-redis" in variants:
            redis_url = _redis_url(stack)
            if redis_url is None:
                variants.remove("fineflow-redis")
                table.notes.append("no Redis server (or no redis-py): fineflow-redis skipped")
            else:
                env["BENCH_REDIS_URL"] = redis_url
                env["BENCH_REDIS_PREFIX"] = _REDIS_PREFIX
        servers = stack.enter_context(_servers(variants, env))
        for server in servers.values():
            await server.ready()
        load = _LOADERS[client]
        details: dict[str, list[dict[str, Any]]] = {v: [] for v in servers}

        def measure(variant: str) -> Any:
            async def once() -> float:
                server = servers[variant]
                cpu = server.cpu_ns()
                result = await load(
                    server.port,
                    profile.http_concurrency,
                    profile.http_seconds,
                    profile.http_requests,
                )
                after = server.cpu_ns()
                if cpu is not None and after is not None and result.get("requests"):
                    result["server_us"] = (after - cpu) / 1e3 / result["requests"]
                details[variant].append(result)
                return float(result["rps"])

            return once

        warm_up = min(0.5, profile.http_seconds)
        for variant in servers:  # warm up every server (caches, pools, lazy imports)
            await load(servers[variant].port, profile.http_concurrency, warm_up, 5_000)
        results = await interleave({v: measure(v) for v in servers}, profile.http_rounds)
    labels = dict(_CONTENDERS)
    bare = results["bare"]
    for variant, rps in results.items():
        per = details[variant]
        statuses: Counter[Any] = Counter()
        for d in per:
            statuses.update(d.get("statuses", {}))
        row = table.add(
            Row(
                labels[variant],
                stat(rps),
                "req/s",
                extra={
                    "p50 ms": stat([d["p50_ms"] for d in per]).text(),
                    "p99 ms": stat([d["p99_ms"] for d in per]).text(),
                    "server CPU us/req": _server_us(per),
                    "client CPU": (
                        f"{stat([d['client_cpu'] for d in per]).median:.0%}"
                        if "client_cpu" in per[0]
                        else ""
                    ),
                },
                ratio=stat(ratios(rps, bare)),
                raw={"variant": variant, "rounds": per},
            )
        )
        bad = {k: v for k, v in statuses.items() if k != 200}
        if bad:
            row.note = f"non-200 responses: {bad}"
    if client != "wrk":
        table.notes.append(
            "client CPU: the load generator's share of one core; well under 100% means the "
            "server, not the client, set the pace"
        )
    targets = Table(SUITE, "HTTP targets (per-round ratios)")
    for variant, bound in (
        ("fineflow-memory", 0.9),
        ("fineflow-postgres", 0.6),
        ("fineflow-redis", 0.6),  # at least PostgreSQL's share
    ):
        if variant in results:
            r = stat(ratios(results[variant], bare))
            targets.add(
                Row(
                    f"{labels[variant]} req/s / bare",
                    r,
                    "x",
                    target=f">= {bound:g}",
                    met=at_least(r.median, bound),
                )
            )
    if "fineflow-memory-export" in results and "fineflow-memory" in results:
        r = stat(ratios(results["fineflow-memory-export"], results["fineflow-memory"]))
        targets.add(
            Row(
                "fineflow memory with Prometheus export / without, req/s",
                r,
                "x",
                target=">= 0.95",
                met=at_least(r.median, 0.95),
            )
        )
    for peer in ("bare-aa", "slowapi", "asgi-ratelimit"):
        if peer in results:
            targets.add(Row(f"{labels[peer]} req/s / bare", stat(ratios(results[peer], bare)), "x"))
    extra = _extra_cpu(details, "fineflow-memory")
    if extra is not None:
        targets.add(Row("fineflow memory: server CPU per request over bare", extra, "us"))
    return [table, targets]


_REDIS_PREFIX = "bench-http"


def _redis_url(stack: contextlib.AsyncExitStack) -> str | None:
    """The URL of a Redis server for the fineflow-redis contender (``None``: none found).

    Its keys live under a prefix of their own, deleted when the suite ends."""
    try:
        from fineflow.testing.redis import delete_prefix, find_redis
    except ImportError:  # redis-py not installed
        return None
    try:
        url: str = stack.enter_context(find_redis()).url
    except Exception:
        return None
    stack.push_async_callback(delete_prefix, url, _REDIS_PREFIX)
    return url


def _server_us(per: list[dict[str, Any]]) -> str:
    values = [d["server_us"] for d in per if "server_us" in d]
    return stat(values).text() if values else ""


def _extra_cpu(details: dict[str, list[dict[str, Any]]], variant: str) -> Stat | None:
    """Per-round server CPU per request of ``variant`` minus bare's, when both are known."""
    pairs = [
        (d["server_us"], b["server_us"])
        for d, b in zip(details.get(variant, []), details.get("bare", []), strict=False)
        if "server_us" in d and "server_us" in b
    ]
    return stat([v - b for v, b in pairs]) if pairs else None
