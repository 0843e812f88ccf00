"""Suite 4: circuit-breaker overhead per call, closed and open.

Closed: a batch of N guarded calls of a trivial coroutine, minus a batch of N bare awaits of
the same coroutine in the same round, is the overhead per call. Open: the time per rejected
call, fineflow's ``execute(fallback=...)`` (no exception) against each peer's usual
raise-and-catch. pybreaker's only async API runs on tornado (in the bench extra).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from ._apps import fineflow_name
from ._common import Context, Row, Table, at_most, diffs, interleave, optional, ratios, stat

__all__ = ["run"]

SUITE = "breaker"
Call = Callable[[], Awaitable[Any]]
_REPEAT = 3  # timed batches per round; the best one counts (filters out noisy neighbours)


async def work() -> int:
    """The guarded call: a coroutine that returns at once."""
    return 1


class _Boom(Exception):
    pass


async def fail() -> int:
    """A guarded call that fails (to trip the peers open)."""
    raise _Boom


def _caught(call: Call) -> Call:
    """``call`` with its failure caught (the failing calls are timed like the others)."""

    async def caught() -> int:
        try:
            return await call()
        except _Boom:
            return 0

    return caught


def _batch(call: Call, n: int) -> Callable[[], Awaitable[float]]:
    size = max(1, n // _REPEAT)

    async def measure() -> float:
        best = float("inf")
        for _ in range(_REPEAT):
            start = time.perf_counter_ns()
            for _ in range(size):
                await call()
            best = min(best, (time.perf_counter_ns() - start) / size)
        return best

    return measure


def _rejections(call: Call, n: int) -> Callable[[], Awaitable[float]]:
    size = max(1, n // _REPEAT)

    async def measure() -> float:
        best = float("inf")
        for _ in range(_REPEAT):
            start = time.perf_counter_ns()
            for _ in range(size):
                try:
                    await call()
                except Exception:
                    pass
            best = min(best, (time.perf_counter_ns() - start) / size)
        return best

    return measure


async def _trip(call: Call, times: int = 5) -> None:
    for _ in range(times):
        try:
            await call()
        except Exception:
            pass


async def _closed_contenders(notes: list[str]) -> dict[str, Call]:
    out: dict[str, Call] = {"bare await": work}
    breaker_cls = fineflow_name("CircuitBreaker")
    if breaker_cls is not None:
        ff = breaker_cls("bench-closed")
        out["fineflow call"] = lambda: ff.call(work)
        out["fineflow execute"] = lambda: ff.execute(work)
        # A shared breaker decides its closed calls in process like any other (no store is
        # touched): the store here is a MemoryStorage, the path is the same for any store.
        memory = fineflow_name("MemoryStorage")()
        shared = breaker_cls("bench-shared", shared=memory)
        out["fineflow call, shared="] = lambda: shared.call(work)
        # Counting failures across instances adds nothing to a success, and to a failure
        # only a flag (the outcomes are read off the totals every 0.1 s by a background
        # task). A rate policy that cannot trip keeps the failing breakers closed.
        counted = breaker_cls("bench-counted", shared=memory, shared_failures=True)
        out["fineflow call, shared_failures="] = lambda: counted.call(work)
        never = {"failure_threshold": None, "failure_rate_threshold": 1.0, "minimum_calls": 10**9}
        failing = breaker_cls("bench-failing", shared=memory, **never)
        failing_counted = breaker_cls(
            "bench-failing-counted", shared=memory, shared_failures=True, **never
        )
        out["fineflow failing call, shared="] = _caught(lambda: failing.call(fail))
        out["fineflow failing call, shared_failures="] = _caught(lambda: failing_counted.call(fail))
    else:
        notes.append("fineflow CircuitBreaker not available yet")
    cb = optional("circuitbreaker")
    if cb is not None:
        out["circuitbreaker"] = cb.CircuitBreaker(name="bench-closed")(work)
    ab = optional("aiobreaker")
    if ab is not None:
        aio = ab.CircuitBreaker(fail_max=5, timeout_duration=timedelta(seconds=30))
        out["aiobreaker"] = lambda: aio.call_async(work)
    pg = optional("purgatory")
    if pg is not None:
        factory = pg.AsyncCircuitBreakerFactory(default_threshold=5, default_ttl=30)
        await factory.initialize()
        out["purgatory"] = factory("bench-closed")(work)
    pb = _pybreaker(notes)
    if pb is not None:
        pbk = pb.CircuitBreaker(fail_max=5, reset_timeout=30)
        out["pybreaker (tornado)"] = lambda: pbk.call_async(work)
    return out


def _pybreaker(notes: list[str]) -> Any:
    """pybreaker when its async API can run (it needs tornado), else ``None`` with a note."""
    pb = optional("pybreaker")
    if pb is None:
        notes.append("pybreaker: not installed, skipped")
        return None
    if not getattr(pb, "HAS_TORNADO_SUPPORT", False):
        notes.append("pybreaker: its only async API (call_async) needs tornado, absent: skipped")
        return None
    return pb


async def _open_contenders(notes: list[str]) -> dict[str, Call]:
    out: dict[str, Call] = {}
    breaker_cls = fineflow_name("CircuitBreaker")
    if breaker_cls is not None:
        ff = breaker_cls("bench-open", failure_threshold=1, reset_timeout=3600.0)
        if hasattr(ff, "force_open"):
            ff.force_open()
        else:
            await _trip(lambda: ff.call(fail))

        def fallback() -> int:
            return 0

        out["fineflow execute(fallback=)"] = lambda: ff.execute(work, fallback=fallback)
        out["fineflow call, raise+catch"] = lambda: ff.call(work)
    cb = optional("circuitbreaker")
    if cb is not None:
        breaker = cb.CircuitBreaker(failure_threshold=1, recovery_timeout=3600, name="bench-open")
        tripper = breaker(fail)
        await _trip(tripper)
        out["circuitbreaker raise+catch"] = breaker(work)
    ab = optional("aiobreaker")
    if ab is not None:
        aio = ab.CircuitBreaker(fail_max=1, timeout_duration=timedelta(hours=1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # datetime.utcnow
            await _trip(lambda: aio.call_async(fail))
        out["aiobreaker raise+catch"] = lambda: aio.call_async(work)
    pg = optional("purgatory")
    if pg is not None:
        factory = pg.AsyncCircuitBreakerFactory(default_threshold=1, default_ttl=3600)
        await factory.initialize()
        await _trip(factory("bench-open")(fail))
        out["purgatory raise+catch"] = factory("bench-open")(work)
    pb = _pybreaker([])
    if pb is not None:
        pbk = pb.CircuitBreaker(fail_max=1, reset_timeout=3600)
        pbk.open()
        out["pybreaker (tornado) raise+catch"] = lambda: pbk.call_async(work)
    return out


async def _check_open(contenders: dict[str, Call], notes: list[str]) -> None:
    """Drop contenders whose breaker is not actually rejecting (a setup mistake)."""
    for name, call in list(contenders.items()):
        if "raise+catch" not in name:
            continue
        try:
            await call()
        except Exception:
            continue
        notes.append(f"{name}: the breaker did not reject; dropped")
        del contenders[name]


async def run(ctx: Context) -> list[Table]:
    """Closed-state overhead and open-state rejection cost, interleaved."""
    profile = ctx.profile
    n = profile.breaker_calls
    closed = Table(SUITE, "Breaker closed state: time per call", "overhead ns vs bare await")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # aiobreaker: datetime.utcnow
        contenders = await _closed_contenders(closed.notes)
        for call in contenders.values():
            await _batch(call, min(n, 500))()
        results = await interleave(
            {k: _batch(v, _calls(k, n)) for k, v in contenders.items()}, profile.rounds
        )
    bare = results["bare await"]
    over = {k: diffs(v, bare) for k, v in results.items()}
    for name, values in results.items():
        closed.add(Row(name, stat(values), "ns", ratio=stat(over[name]), raw={"rounds": values}))

    opened = Table(SUITE, "Breaker open state: time per rejected call", "x fineflow execute")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        rejecting = await _open_contenders(opened.notes)
        await _check_open(rejecting, opened.notes)
        for call in rejecting.values():
            await _rejections(call, min(n, 500))()
        rejected = await interleave(
            {k: _rejections(v, _calls(k, n)) for k, v in rejecting.items()}, profile.rounds
        )
    ff_open = rejected.get("fineflow execute(fallback=)")
    for name, values in rejected.items():
        opened.add(
            Row(
                name,
                stat(values),
                "ns",
                ratio=None if ff_open is None else stat(ratios(values, ff_open)),
                raw={"rounds": values},
            )
        )
    return [closed, opened, _ratios(over, rejected)]


def _calls(name: str, n: int) -> int:
    # pybreaker's tornado coroutines cost about 100x the others: fewer calls keep the
    # suite's time bounded (the per-call figure is as precise, over a shorter batch).
    return max(_REPEAT, n // 50) if name.startswith("pybreaker") else n


# pybreaker is not a candidate for "fastest async peer": its async API is tornado's.
_PEERS = ("circuitbreaker", "aiobreaker", "purgatory")


def _ratios(over: dict[str, list[float]], rejected: dict[str, list[float]]) -> Table:
    table = Table(SUITE, "Breaker ratios (per round; reference figures, no targets)")
    peers = {p: over[p] for p in _PEERS if p in over}
    ff = over.get("fineflow call")
    shared = over.get("fineflow call, shared=")
    if ff is not None and shared is not None:
        r = stat(ratios(shared, ff))
        table.add(
            Row(
                "fineflow closed-call overhead, shared= / without",
                r,
                "x",
                target="<= 1.10",
                met=at_most(r.median, 1.10),
            )
        )
    pairs = (
        ("fineflow call, shared_failures=", "fineflow call, shared=", "closed-call"),
        (
            "fineflow failing call, shared_failures=",
            "fineflow failing call, shared=",
            "failing-call",
        ),
    )
    for counted, plain, what in pairs:
        if counted in over and plain in over:
            r = stat(ratios(over[counted], over[plain]))
            table.add(
                Row(
                    f"fineflow {what} overhead, shared_failures= / shared=",
                    r,
                    "x",
                    target="<= 1.10",
                    met=at_most(r.median, 1.10),
                )
            )
    if ff is None or not peers:
        table.notes.append("fineflow CircuitBreaker or every peer missing: no ratios")
        return table
    fastest = min(peers, key=lambda p: stat(peers[p]).median)
    r = stat(ratios(ff, peers[fastest]))
    table.add(
        Row(
            f"fineflow call overhead / {fastest} (fastest async peer)",
            r,
            "x",
        )
    )
    ff_open = rejected.get("fineflow execute(fallback=)")
    peer_open = rejected.get(f"{fastest} raise+catch")
    if ff_open is not None and peer_open is not None:
        r = stat(ratios(ff_open, peer_open))
        table.add(
            Row(
                f"fineflow execute(fallback=) open / {fastest} raise+catch",
                r,
                "x",
            )
        )
    return table
