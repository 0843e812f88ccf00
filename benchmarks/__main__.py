"""``python -m benchmarks``: run the suites, print the tables, write JSON (and PNG charts).

Usage::

    python -m benchmarks                 # --quick: about two minutes
    python -m benchmarks --full          # longer runs, more rounds
    python -m benchmarks --smoke         # seconds; every code path, no thresholds (CI)
    python -m benchmarks --only asgi breaker --json out.json --plot
    python -m benchmarks --smoke --json  # the report as JSON on stdout (tables on stderr)
    python -m benchmarks --only instructions   # instructions per operation (valgrind)

With ``--json`` and no path, stdout is one JSON document, even when the run fails: the
report (``errors`` names the suites that crashed), or ``{"error": ..., "exit_code": N}``
for a usage error (2) or a run that could not start (1).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
STDOUT = Path("-")  # --json with no path: the report goes to stdout


class _Parser(argparse.ArgumentParser):
    """argparse's parser; with ``--json`` on stdout its usage errors are JSON too."""

    json_errors = False

    def error(self, message: str) -> Any:
        if not self.json_errors:
            super().error(message)
        _print_error(f"{self.prog}: {message}", 2)
        sys.exit(2)


def _print_error(message: str, exit_code: int) -> None:
    print(json.dumps({"error": message, "exit_code": exit_code}))


def _parse(argv: list[str] | None, *, json_errors: bool = False) -> argparse.Namespace:
    parser = _Parser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.json_errors = json_errors
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
        nargs="?",
        const=STDOUT,
        default=DEFAULT_JSON,
        metavar="PATH",
        help=f"where the results go (default {DEFAULT_JSON}); with no PATH (or -), "
        "stdout, the tables going to stderr",
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
    """Run the selected suites; exit status 1 only if a suite crashed (2 for bad usage)."""
    words = list(sys.argv[1:] if argv is None else argv)
    to_stdout = "--json" in words and _parse(words, json_errors=True).json == STDOUT
    args = _parse(words)
    if not to_stdout:
        return _run(args, words)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout: the JSON document alone
            report, status = _run_report(args, words)
    except Exception as exc:
        _print_error(f"the benchmarks could not run: {type(exc).__name__}: {exc}", 1)
        return 1
    print(json.dumps(report, indent=2, default=str))
    return status


def _run(args: argparse.Namespace, words: list[str]) -> int:
    """Run, write the report to ``args.json``; the exit status."""
    report, status = _run_report(args, words)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"\nwrote {args.json} ({report['seconds']}s)")
    return status


def _run_report(args: argparse.Namespace, words: list[str]) -> tuple[dict[str, Any], int]:
    """Run the selected suites, print their tables; the report and the exit status."""
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
        "command": " ".join(["python", "-m", "benchmarks", *words]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.perf_counter() - started, 1),
        "suite_seconds": {k: round(v, 1) for k, v in timings.items()},
        "machine": info,
        "errors": errors,
        "tables": [t.to_json() for t in tables],
    }
    if args.plot:
        from ._plot import plot

        target = DEFAULT_JSON if args.json == STDOUT else args.json
        print(plot(tables, target.with_suffix("")))
    return report, 1 if errors else 0


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
