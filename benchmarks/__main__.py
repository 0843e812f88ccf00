"""``python -m benchmarks``: run the suites, print the tables, write JSON (and PNG charts).

Usage::

    python -m benchmarks                 # --quick: about two minutes
    python -m benchmarks --full          # longer runs, more rounds
    python -m benchmarks --smoke         # seconds; every code path, no thresholds (CI)
    python -m benchmarks --only asgi breaker --json out.json --plot
    python -m benchmarks --only instructions   # instructions per operation (valgrind)
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from ._common import PROFILES, Context, Table, machine_info

SUITES = (
    "asgi",
    "http",
    "storage",
    "redis_storage",
    "breaker",
    "breaker_shared",
    "load",
    "instructions",
)
DEFAULT_SUITES = SUITES[:-1]  # instructions: opt-in, it needs valgrind and two minutes
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "latest.json"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[0]
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        dest="mode",
        action="store_const",
        const="quick",
        help="the default: every suite in about two minutes",
    )
    mode.add_argument(
        "--full",
        dest="mode",
        action="store_const",
        const="full",
        help="more and longer rounds than --quick: narrower ranges, several times longer",
    )
    mode.add_argument(
        "--smoke",
        dest="mode",
        action="store_const",
        const="smoke",
        help="tiny counts, runs every suite path in seconds, never fails on a target",
    )
    parser.set_defaults(mode="quick")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=SUITES,
        metavar="SUITE",
        help=f"{SUITES} (default: all but instructions, which counts CPU instructions "
        "with valgrind)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=DEFAULT_JSON,
        metavar="PATH",
        help=f"where the results go (default {DEFAULT_JSON})",
    )
    parser.add_argument("--plot", action="store_true", help="PNG charts (needs matplotlib)")
    parser.add_argument(
        "--http-client",
        choices=("auto", "wrk", "raw", "aiohttp"),
        default="auto",
        help="load generator for the http suite (auto: wrk if on PATH, else raw asyncio)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the selected suites; exit status 1 only if a suite crashed."""
    args = _parse(argv)
    # Breaker transitions and storage warnings are expected here; keep the tables readable.
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    profile = PROFILES[args.mode]
    ctx = Context(profile)
    tables: list[Table] = []
    errors: dict[str, str] = {}
    timings: dict[str, float] = {}
    started = time.perf_counter()
    print(f"fineflow benchmarks, mode {profile.name}", flush=True)
    try:
        for name in args.only or DEFAULT_SUITES:
            module = importlib.import_module(f"benchmarks.{name}")
            if name == "http":
                module.CLIENT = args.http_client
            t0 = time.perf_counter()
            try:
                produced = asyncio.run(module.run(ctx))
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {exc}"
                print(f"\n!! suite {name} failed:\n{traceback.format_exc()}", file=sys.stderr)
                continue
            finally:
                timings[name] = time.perf_counter() - t0
            for table in produced:
                if profile.name == "smoke":
                    _no_verdicts(table)
                print("\n" + table.render(), flush=True)
            tables.extend(produced)
            print(f"   ({name}: {timings[name]:.1f}s)", flush=True)
        info = machine_info(ctx)
    finally:
        ctx.close()
    _summary(tables)
    report: dict[str, Any] = {
        "mode": profile.name,
        "command": " ".join(["python", "-m", "benchmarks", *(argv or sys.argv[1:])]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.perf_counter() - started, 1),
        "suite_seconds": {k: round(v, 1) for k, v in timings.items()},
        "machine": info,
        "errors": errors,
        "tables": [t.to_json() for t in tables],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"\nwrote {args.json} ({report['seconds']}s)")
    if args.plot:
        from ._plot import plot

        print(plot(tables, args.json.with_suffix("")))
    return 1 if errors else 0


def _no_verdicts(table: Table) -> None:
    """Smoke runs measure too little to judge: keep the targets, drop the verdicts."""
    for row in table.rows:
        row.met = None
    if not any("smoke" in n for n in table.notes):
        table.notes.append("smoke run: counts too small to mean anything, no verdicts")


def _summary(tables: list[Table]) -> None:
    rows = [(t, r) for t in tables for r in t.rows if r.met is not None]
    if not rows:
        return
    met = sum(1 for _, r in rows if r.met)
    print(f"\n== Targets: {met}/{len(rows)} met")
    for table, row in rows:
        value = "-" if row.value is None else f"{row.value.text()} {row.unit}".rstrip()
        mark = "met   " if row.met else "MISSED"
        print(f"  {mark} [{table.suite}] {row.name}: {value} (target {row.target})")


if __name__ == "__main__":
    sys.exit(main())
