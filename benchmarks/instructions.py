"""Suite ``instructions``: CPU instructions per operation, counted by callgrind.

Timings on a shared machine are noisy: the in-process ASGI figures often have ranges that
cross zero. The number of instructions a code path executes is exact and repeatable: the
same figure on a busy or an idle machine. Groups: the in-process ASGI contenders, the
memory-storage decision, the circuit breakers. One child process per group runs under
``valgrind --tool=callgrind``: it builds every contender and warms each up, then runs each
for N operations between two calls of ``os.getppid()``, where callgrind writes out its
counts (``--dump-before``), so each contender's N operations are counted alone, free of
start-up and imports. Python's hash seed is fixed so dict layouts repeat.

What a count cannot show: waiting (for PostgreSQL or the network) and how fast the CPU runs
the instructions (caches, branch prediction). The timed suites measure those; the ratios
here check that the timed ratios are not an artefact of noise.

Opt-in (``--only instructions``, under a minute). Needs ``valgrind`` on PATH and a Python
whose symbols callgrind can see (the table says so otherwise).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ._common import Context, Row, Table, optional, stat

__all__ = ["run"]

SUITE = "instructions"

# (group, name, label); the ASGI names are variants of benchmarks._apps.build.
CONTENDERS: list[tuple[str, str, str]] = [
    ("asgi", "bare", "bare Starlette"),
    ("asgi", "passthrough", "passthrough ASGI middleware"),
    ("asgi", "floor", "least middleware with fineflow's contract"),
    ("asgi", "fineflow-memory", "fineflow memory, allowed"),
    ("asgi", "fineflow-memory-429", "fineflow memory, 429 path"),
    ("asgi", "fineflow-memory-export", "fineflow memory, allowed, Prometheus export (1 scrape/1k)"),
    ("asgi", "fineflow-tiers", "fineflow memory, tiers, allowed"),
    ("asgi", "asgi-ratelimit", "asgi-ratelimit (memory)"),
    ("asgi", "slowapi-decorator", "slowapi decorator only"),
    ("asgi", "slowapi", "slowapi decorator + SlowAPIMiddleware"),
    ("asgi", "breaker", "fineflow CircuitBreakerMiddleware"),
    ("memory", "await", "await of a coroutine (the harness)"),
    ("memory", "floor", "bare GCRA step behind an await"),
    ("memory", "fineflow", "fineflow RateLimiter.hit"),
    ("memory", "limits-fixed", "limits.aio fixed window"),
    ("memory", "limits-moving", "limits.aio moving window"),
    ("breaker", "closed:bare await", "closed: bare await of the guarded call"),
    ("breaker", "closed:fineflow call", "closed: fineflow call"),
    ("breaker", "closed:circuitbreaker", "closed: circuitbreaker"),
    ("breaker", "open:fineflow execute(fallback=)", "open: fineflow execute(fallback=)"),
    ("breaker", "open:circuitbreaker raise+catch", "open: circuitbreaker raise+catch"),
]
_OPS = {"smoke": 20, "quick": 1_000, "full": 5_000}
# More than the memory group's 1,000 keys: each is inserted on first sight.
_WARM_UP = {"asgi": 200, "memory": 1_200, "breaker": 200}
# A smoke run counts these only (seconds, not a minute): every group's child runs, one peer.
_SMOKE = {
    "bare",
    "fineflow-memory",
    "fineflow-memory-export",
    "fineflow",
    "limits-fixed",
    "closed:fineflow call",
}
_EXPECTED_STATUS = {"fineflow-memory-429": 429}
_MARKER = "os_getppid*"  # the C function behind os.getppid(): callgrind dumps before it
_SUMMARY = re.compile(r"^summary:\s*(\d+)", re.MULTILINE)


async def run(ctx: Context) -> list[Table]:
    """Count every contender's instructions per operation; the tables and the reference ratios."""
    asgi = Table(SUITE, "Instructions per request, in-process ASGI (callgrind)", "added vs bare")
    memory = Table(SUITE, "Instructions per decision, memory storage (callgrind)", "x fineflow")
    breaker = Table(SUITE, "Instructions per call, circuit breakers (callgrind)")
    ratios_table = Table(SUITE, "Ratios on instruction counts (reference figures, no targets)")
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        ratios_table.notes.append(
            "valgrind not found: install it (Debian/Ubuntu: apt install valgrind) to count "
            "instructions"
        )
        return [ratios_table]
    ops = _OPS[ctx.profile.name]
    smoke = ctx.profile.name == "smoke"
    labels = {(g, n): label for g, n, label in CONTENDERS}
    found: dict[tuple[str, str], float] = {}
    groups = {"asgi": asgi, "memory": memory, "breaker": breaker}
    # Both children run to the end even if one fails, so none is left behind.
    results = await asyncio.gather(
        *(_count(valgrind, g, ops, smoke) for g in groups), return_exceptions=True
    )
    for (group, table), result in zip(groups.items(), results, strict=True):
        if isinstance(result, BaseException):
            raise result
        counts, notes = result
        table.notes.extend(notes)
        for name, value in counts.items():
            found[group, name] = value
            raw = {"name": name, "ops": ops}
            table.add(Row(labels[group, name], stat([value]), "instr", raw=raw))
    bare, mine = found.get(("asgi", "bare")), found.get(("memory", "fineflow"))
    for row in asgi.rows:
        if bare is not None:
            row.ratio = stat([found["asgi", row.raw["name"]] - bare])
    for row in memory.rows:
        if mine:
            row.ratio = stat([found["memory", row.raw["name"]] / mine])
    if any(name.startswith("slowapi") for _, name in found):
        asgi.notes.append(
            "slowapi's counts differ by up to 10% between runs: its windows follow the wall "
            "clock, which callgrind slows about fifty-fold"
        )
    _ratios(found, ratios_table)
    return [t for t in (*groups.values(), ratios_table) if t.rows or t.notes]


def _ratios(found: dict[tuple[str, str], float], table: Table) -> None:
    def over(group: str, name: str, base: str) -> float | None:
        value, floor = found.get((group, name)), found.get((group, base))
        return None if value is None or floor is None else value - floor

    def added(name: str) -> float | None:
        return over("asgi", name, "bare")

    ff, peer, least = added("fineflow-memory"), added("asgi-ratelimit"), added("floor")
    exported = found.get(("asgi", "fineflow-memory-export"))
    slowapi, decorator = added("slowapi"), added("slowapi-decorator")
    denied, allowed = (
        found.get(("asgi", "fineflow-memory-429")),
        found.get(("asgi", "fineflow-memory")),
    )
    hit, gcra = found.get(("memory", "fineflow")), found.get(("memory", "floor"))
    fixed, moving = found.get(("memory", "limits-fixed")), found.get(("memory", "limits-moving"))
    call = over("breaker", "closed:fineflow call", "closed:bare await")
    peer_call = over("breaker", "closed:circuitbreaker", "closed:bare await")
    fallback = found.get(("breaker", "open:fineflow execute(fallback=)"))
    peer_open = found.get(("breaker", "open:circuitbreaker raise+catch"))
    # (name, numerator, denominator): reference ratios, no targets (figures to compare
    # across changes, not thresholds: fineflow's own floor is set by its contract).
    ratios_: list[tuple[str, float | None, float | None]] = [
        ("fineflow allowed added / asgi-ratelimit added", ff, peer),
        ("fineflow allowed added / slowapi added", ff, slowapi),
        ("fineflow allowed added / slowapi decorator-only added", ff, decorator),
        ("fineflow 429 path / allowed path (per request)", denied, allowed),
        ("fineflow with Prometheus export / without (per request)", exported, allowed),
        ("fineflow tiers added / asgi-ratelimit added", added("fineflow-tiers"), peer),
        # How low the ratios can go for any middleware with fineflow's contract.
        ("least middleware added / asgi-ratelimit added", least, peer),
        ("least middleware added / slowapi decorator-only added", least, decorator),
        ("limits.aio fixed window / fineflow RateLimiter.hit", fixed, hit),
        ("limits.aio moving window / fineflow RateLimiter.hit", moving, hit),
        ("limits.aio fixed window / bare GCRA step", fixed, gcra),
        ("fineflow call overhead / circuitbreaker's (closed)", call, peer_call),
        ("fineflow execute(fallback=) / circuitbreaker raise+catch (open)", fallback, peer_open),
    ]
    for name, num, den in ratios_:
        if num is not None and den:
            table.add(Row(name, stat([num / den]), "x"))


async def _count(
    valgrind: str, group: str, ops: int, smoke: bool
) -> tuple[dict[str, float], list[str]]:
    """One child for ``group``: instructions per operation by contender, and notes."""
    names = [n for g, n, _ in CONTENDERS if g == group and (not smoke or n in _SMOKE)]
    with tempfile.TemporaryDirectory(prefix="fineflow-callgrind-") as tmp:
        proc = await asyncio.create_subprocess_exec(
            valgrind,
            "--tool=callgrind",
            f"--callgrind-out-file={tmp}/cg.%p",
            f"--log-file={tmp}/valgrind.log",  # stderr stays the child's own
            f"--dump-before={_MARKER}",
            sys.executable,
            "-m",
            "benchmarks.instructions",
            group,
            str(ops),
            *names,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            # A contender answering wrong, or a child that cannot run: the suite fails
            # (the runner reports it and exits 1) rather than dropping a group's ratios.
            lines = err.decode(errors="replace").strip().splitlines()
            raise RuntimeError(
                f"{group} child exited {proc.returncode}: {lines[-1] if lines else '?'}"
            )
        report = json.loads(out.decode().strip().splitlines()[-1])
        notes = [f"{name}: {why}" for name, why in report["skipped"].items()]
        counts, problem = _read_dumps(Path(tmp), report["measured"], ops)
        return counts, [*notes, *([f"{group}: {problem}"] if problem else [])]


def _read_dumps(folder: Path, measured: list[str], ops: int) -> tuple[dict[str, float], str]:
    """Per-operation counts from the dumps: ``cg.<pid>.1`` holds start-up, and
    ``cg.<pid>.<k+1>`` the k-th contender's operations."""
    dumps = sorted(folder.glob("cg.*.*"), key=lambda p: int(p.suffix[1:]))
    if len(dumps) != len(measured) + 1:
        return {}, (
            f"callgrind wrote {len(dumps)} dumps for {len(measured)} contenders; it may not "
            "see the C function behind os.getppid() in this Python (a stripped binary?)"
        )
    counts = {}
    for name, dump in zip(measured, dumps[1:], strict=True):
        match = _SUMMARY.search(dump.read_text())
        if match is None:
            return {}, f"no summary line in {dump.name}"
        counts[name] = int(match.group(1)) / ops
    return counts, ""


# The child: build the contenders, run each ``ops`` times between two markers, check that
# each still answers right.

Contender = tuple[Callable[[], Awaitable[Any]], Callable[[], Awaitable[bool]]]


class _Unavailable(Exception):
    pass


async def _asgi(name: str) -> Contender:
    from ._apps import build
    from .asgi import _BASE_SCOPE, _drop, _receive, _status

    try:
        app = build(name)
    except ImportError as exc:
        raise _Unavailable(f"not installed ({exc.name})") from exc
    if app is None:
        raise _Unavailable("not available")
    scope = _BASE_SCOPE

    def once() -> Awaitable[Any]:
        return app(scope.copy(), _receive, _drop)

    registry = getattr(app.state, "metrics_registry", None)
    if registry is not None:
        once = _scraping(once, registry)

    async def check() -> bool:
        return await _status(app) == _EXPECTED_STATUS.get(name, 200)

    return once, check


def _scraping(once: Callable[[], Awaitable[Any]], registry: Any) -> Callable[[], Awaitable[Any]]:
    """``once``, with a scrape of ``registry`` every ``SCRAPE_EVERY`` calls (counted in)."""
    from prometheus_client import generate_latest

    from ._apps import SCRAPE_EVERY

    generate_latest(registry)  # the first scrape's one-time set-up stays out of the counts
    calls = [0]

    def scraping() -> Awaitable[Any]:
        calls[0] += 1
        if calls[0] % SCRAPE_EVERY == 0:
            generate_latest(registry)
        return once()

    return scraping


async def _memory(name: str) -> Contender:
    from fineflow import MemoryStorage, Quota, RateLimiter

    from ._floors import bare_gcra, bare_gcra_hit

    keys = [f"user{i}" for i in range(1000)]
    quota = Quota.parse("1000000/second")
    i = 0

    def key() -> str:
        nonlocal i
        i += 1
        return keys[i % 1000]

    once: Callable[[], Awaitable[Any]]
    if name == "await":

        async def nothing(key: str, quota: Quota) -> bool:
            return True

        once = lambda: nothing(key(), quota)  # noqa: E731
    elif name == "floor":
        decide = bare_gcra(quota)
        once = lambda: bare_gcra_hit(decide, key())  # noqa: E731
    elif name == "fineflow":
        limiter = RateLimiter(MemoryStorage())
        once = lambda: limiter.hit(key(), quota)  # noqa: E731
    else:
        strategies = optional("limits.aio.strategies")
        if strategies is None:
            raise _Unavailable("limits not installed")
        import limits
        from limits.aio.storage import MemoryStorage as LimitsMemory

        item = limits.parse("1000000/second")
        kind = (
            strategies.FixedWindowRateLimiter
            if name == "limits-fixed"
            else strategies.MovingWindowRateLimiter
        )
        peer = kind(LimitsMemory())
        once = lambda: peer.hit(item, key())  # noqa: E731

    async def check() -> bool:
        # Admitted: limits answers True, fineflow a Decision whose ``allowed`` is True.
        answer = await once()
        return answer is True or getattr(answer, "allowed", None) is True

    return once, check


_breakers: dict[str, dict[str, Callable[[], Awaitable[Any]]]] = {}


async def _breaker(name: str) -> Contender:
    from .breaker import _closed_contenders, _open_contenders

    state, _, label = name.partition(":")
    if not _breakers:
        _breakers["closed"] = await _closed_contenders([])
        _breakers["open"] = await _open_contenders([])
    call = _breakers[state].get(label)
    if call is None:
        raise _Unavailable("not installed")
    once: Callable[[], Awaitable[Any]] = call
    if "raise+catch" in label:

        async def rejected() -> None:
            try:
                await call()
            except Exception:
                pass

        async def check() -> bool:
            try:
                await call()
            except Exception:
                return True
            return False  # the breaker let the call through: not open

        return rejected, check
    # The guarded call returns 1; fineflow's open-state execute() a BreakerResult whose
    # value is the fallback's 0.
    expected = 1 if state == "closed" else 0

    async def answered() -> bool:
        answer = await call()
        return bool(getattr(answer, "from_fallback", False) or answer == expected)

    return once, answered


async def _child(group: str, ops: int, names: list[str]) -> None:
    build = {"asgi": _asgi, "memory": _memory, "breaker": _breaker}[group]
    ready: dict[str, Contender] = {}
    skipped: dict[str, str] = {}
    for name in names:
        try:
            ready[name] = await build(name)
        except _Unavailable as exc:
            skipped[name] = str(exc)
    # Not counted: every key seen once (memory storages insert on first sight), lazy set-up
    # done, the interpreter's specialisations in place.
    for once, _ in ready.values():
        for _ in range(_WARM_UP[group]):
            await once()
    for once, _ in ready.values():
        os.getppid()  # the marker: callgrind dumps the counts so far
        for _ in range(ops):
            await once()
    os.getppid()
    wrong = [name for name, (_, check) in ready.items() if not await check()]
    if wrong:
        raise SystemExit(f"wrong answers after {ops} operations: {wrong}")
    print(json.dumps({"measured": list(ready), "skipped": skipped}))


if __name__ == "__main__":
    asyncio.run(_child(sys.argv[1], int(sys.argv[2]), sys.argv[3:]))
