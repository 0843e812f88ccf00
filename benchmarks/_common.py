"""Shared machinery: profiles, interleaved rounds, statistics, tables and machine info."""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.metadata
import os
import platform
import shutil
import statistics
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "PEERS",
    "PROFILES",
    "Context",
    "Profile",
    "Row",
    "Stat",
    "Table",
    "at_least",
    "at_most",
    "diffs",
    "interleave",
    "machine_info",
    "optional",
    "percentile",
    "ratios",
    "stat",
]

#: Distributions whose versions go into the JSON (the peers and the stack under them).
PEERS = (
    "fineflow",
    "limits",
    "slowapi",
    "asgi-ratelimit",
    "pybreaker",
    "aiobreaker",
    "purgatory",
    "circuitbreaker",
    "starlette",
    "uvicorn",
    "aiohttp",
    "httpx",
    "anyio",
    "psycopg",
    "psycopg-pool",
    "matplotlib",
)


@dataclass(frozen=True, slots=True)
class Profile:
    """How long and how often each suite measures (``--smoke``, ``--quick``, ``--full``)."""

    name: str
    rounds: int  # interleaved rounds per comparison
    asgi_calls: int  # requests per batch, in-process, memory storage
    asgi_pg_calls: int  # requests per batch, in-process, PostgreSQL storage
    breaker_calls: int  # calls per batch
    memory_calls: int  # decisions per batch, memory storage
    storage_seconds: float  # per contender per round, PostgreSQL decisions
    storage_rounds: int
    storage_concurrency: tuple[int, ...]
    storage_durability: tuple[str, ...]  # "logged", "unlogged", "sync_off"
    durability_concurrency: tuple[int, ...]  # concurrencies measured for non-logged tables
    spread_keys: int
    pgbench_seconds: int  # 0: skip pgbench
    http_seconds: float  # per contender per round
    http_requests: int  # cap per contender per round
    http_concurrency: int
    http_rounds: int


PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke",
        rounds=2,
        asgi_calls=50,
        asgi_pg_calls=5,
        breaker_calls=200,
        memory_calls=200,
        storage_seconds=0.05,
        storage_rounds=1,
        storage_concurrency=(1, 16),
        storage_durability=("logged", "unlogged", "sync_off"),
        durability_concurrency=(16,),
        spread_keys=100,
        pgbench_seconds=0,
        http_seconds=0.15,
        http_requests=200,
        http_concurrency=4,
        http_rounds=1,
    ),
    "quick": Profile(
        name="quick",
        rounds=7,
        asgi_calls=2_000,
        asgi_pg_calls=150,
        breaker_calls=20_000,
        memory_calls=10_000,
        storage_seconds=0.5,
        storage_rounds=3,
        storage_concurrency=(1, 16, 64),
        storage_durability=("logged", "unlogged", "sync_off"),
        durability_concurrency=(64,),
        spread_keys=10_000,
        pgbench_seconds=1,
        http_seconds=0.5,
        http_requests=20_000,
        http_concurrency=32,
        http_rounds=9,
    ),
    "full": Profile(
        name="full",
        rounds=15,
        asgi_calls=10_000,
        asgi_pg_calls=1_000,
        breaker_calls=100_000,
        memory_calls=50_000,
        storage_seconds=2.0,
        storage_rounds=5,
        storage_concurrency=(1, 16, 64),
        storage_durability=("logged", "unlogged", "sync_off"),
        durability_concurrency=(1, 16, 64),
        spread_keys=10_000,
        pgbench_seconds=3,
        http_seconds=1.5,
        http_requests=150_000,
        http_concurrency=64,
        http_rounds=15,
    ),
}


@dataclass(frozen=True, slots=True)
class Stat:
    """Median and range of one figure over rounds."""

    median: float
    low: float
    high: float

    def text(self, digits: int = 3) -> str:
        """``median [low-high]`` with ``digits`` significant digits."""
        if self.low == self.high:
            return num(self.median, digits)
        return f"{num(self.median, digits)} [{num(self.low, digits)}-{num(self.high, digits)}]"


def stat(values: Sequence[float]) -> Stat:
    """The median and range of ``values`` (at least one)."""
    return Stat(statistics.median(values), min(values), max(values))


def ratios(values: Sequence[float], base: Sequence[float]) -> list[float]:
    """Per-round ratios ``values[i] / base[i]`` (the rounds were interleaved)."""
    return [v / b if b else float("inf") for v, b in zip(values, base, strict=True)]


def diffs(values: Sequence[float], base: Sequence[float]) -> list[float]:
    """Per-round differences ``values[i] - base[i]``."""
    return [v - b for v, b in zip(values, base, strict=True)]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of already sorted values, nearest rank."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def num(x: float, digits: int = 3) -> str:
    """A readable number: ``digits`` significant digits, thousands grouped."""
    if x != x:  # NaN
        return "n/a"
    if x in (float("inf"), float("-inf")):
        return "inf"
    if abs(x) >= 10 ** (digits - 1):
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def at_most(value: float, bound: float) -> bool:
    """Target check: ``value <= bound``."""
    return value <= bound


def at_least(value: float, bound: float) -> bool:
    """Target check: ``value >= bound``."""
    return value >= bound


@dataclass(slots=True)
class Row:
    """One contender's line in a table.

    ``value`` is the measured figure (unit in ``unit``), ``ratio`` the per-round ratio (or
    other comparison named by the table's ``ratio_label``), ``extra`` more columns.
    """

    name: str
    value: Stat | None
    unit: str = ""
    extra: dict[str, str] = field(default_factory=dict)
    ratio: Stat | None = None
    target: str = ""
    met: bool | None = None
    note: str = ""
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Table:
    """A titled comparison: rows measured side by side in one interleaved run."""

    suite: str
    title: str
    ratio_label: str = ""
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, row: Row) -> Row:
        """Append ``row`` and return it."""
        self.rows.append(row)
        return row

    def render(self) -> str:
        """The table as aligned text."""
        extra_cols: list[str] = []
        for row in self.rows:
            for key in row.extra:
                if key not in extra_cols:
                    extra_cols.append(key)
        header = ["contender", "median [min-max]", *extra_cols]
        if self.ratio_label:
            header.append(self.ratio_label)
        header += ["target", "met?"]
        lines: list[list[str]] = []
        for row in self.rows:
            value = "-" if row.value is None else f"{row.value.text()} {row.unit}".rstrip()
            cells = [row.name, value, *(row.extra.get(k, "") for k in extra_cols)]
            if self.ratio_label:
                cells.append("" if row.ratio is None else row.ratio.text())
            met = "" if row.met is None else ("yes" if row.met else "NO")
            cells += [row.target, met]
            lines.append(cells)
        widths = [max(len(c) for c in col) for col in zip(header, *lines, strict=True)]
        out = [f"== {self.title}"]
        out.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
        out.append("  ".join("-" * w for w in widths))
        for cells in lines:
            out.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
        for row in self.rows:
            if row.note:
                out.append(f"   * {row.name}: {row.note}")
        out.extend(f"   * {note}" for note in self.notes)
        return "\n".join(out)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "suite": self.suite,
            "title": self.title,
            "ratio_label": self.ratio_label,
            "notes": self.notes,
            "rows": [asdict(r) for r in self.rows],
        }


@dataclass(slots=True)
class Context:
    """What every suite gets: the profile, a PostgreSQL server (found once, lazily)."""

    profile: Profile
    _server: Any = None
    _server_error: str | None = None
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    pg_info: dict[str, str] = field(default_factory=dict)

    def postgres(self) -> Any:
        """The ``fineflow.testing.PostgresServer``, or ``None`` (reason in ``pg_error``)."""
        if self._server is None and self._server_error is None:
            try:
                from fineflow.testing import find_postgres

                self._server = self._stack.enter_context(find_postgres())
                self.pg_info = _pg_info(self._server.dsn)
            except Exception as exc:
                self._server_error = f"{type(exc).__name__}: {exc}"
        return self._server

    @property
    def pg_error(self) -> str:
        """Why there is no PostgreSQL server (empty if there is one)."""
        return self._server_error or ""

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """A fresh temporary database on the server (dropped afterwards)."""
        from fineflow.testing import temporary_database

        with temporary_database(self.postgres()) as dsn:
            yield dsn

    def close(self) -> None:
        """Stop a throwaway server, if one was started."""
        self._stack.close()


def _pg_info(dsn: str) -> dict[str, str]:
    import psycopg

    names = ("server_version", "fsync", "synchronous_commit", "shared_buffers", "max_connections")
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        info = {n: str(conn.execute(f"SHOW {n}").fetchone()[0]) for n in names}  # type: ignore[index]
        row = conn.execute("SELECT version()").fetchone()
        info["version"] = str(row[0]) if row else ""
    return info


async def interleave(
    contenders: Mapping[str, Callable[[], Awaitable[float]]],
    rounds: int,
    *,
    collect: bool = True,
) -> dict[str, list[float]]:
    """Run each contender once per round, round-robin, rotating who goes first.

    Returns each contender's figures, one per round, so ratios can be taken per round.
    """
    names = list(contenders)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            if collect:
                gc.collect()
            out[name].append(await contenders[name]())
    return out


def optional(module: str) -> Any:
    """Import ``module`` or return ``None``."""
    try:
        return importlib.import_module(module)
    except Exception:
        return None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(ctx: Context) -> dict[str, Any]:
    """CPU, platform, Python, versions of fineflow and every peer, PostgreSQL, tools."""
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "versions": {d: _version(d) for d in PEERS},
        "tools": {t: shutil.which(t) for t in ("wrk", "pgbench")},
        "profile": asdict(ctx.profile),
    }
    if ctx.pg_info:
        info["postgresql"] = ctx.pg_info
    elif ctx.pg_error:
        info["postgresql"] = {"error": ctx.pg_error}
    return info


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()
