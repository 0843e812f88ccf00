"""The ``fineflow`` command: ``migrate``, ``status KEY``, ``reset KEY``, ``cleanup``, ``stats``,
``demo``, ``bench``, ``--version``.

Exit status: 0 on success, 1 for a runtime failure (the database is unreachable or refuses,
the schema is missing or newer than this code), 2 for usage (arguments argparse refuses, an
invalid DSN or schema name), 130 when interrupted. With ``--json`` a storage command prints
exactly one JSON document on stdout, its result or, on failure,
``{"error": "...", "exit_code": N}``; nothing goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from typing import Any, NoReturn

from . import __version__
from ._errors import ConfigurationError, FineflowError
from ._storage.base import KeyStatus, StatsPoint
from ._storage.postgres.options import check_identifier
from ._storage.postgres.storage import PostgresStorage

__all__ = ["main"]

EXIT_FAILURE = 1  # the command could not do its work
EXIT_USAGE = 2  # the command line is wrong (argparse's own status for it)


class _Parser(argparse.ArgumentParser):
    """argparse's parser; under ``--json`` its usage errors are JSON documents too."""

    def __init__(self, *args: Any, json_errors: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.json_errors = json_errors

    def error(self, message: str) -> NoReturn:
        if not self.json_errors:
            super().error(message)
        _print_error(f"{self.prog}: {message}", EXIT_USAGE, as_json=True)
        raise SystemExit(EXIT_USAGE)


def _identifier(what: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        try:
            check_identifier(what, value)
        except ConfigurationError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return value

    return check


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {value!r}")
    return number


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _duration(value: str) -> float:
    """``90s``, ``15m``, ``1h``, ``7d``, ``2w`` or plain seconds, as seconds > 0."""
    match = _DURATION.match(value.lower())
    seconds = float(match[1]) * _UNITS[match[2]] if match else 0.0
    if not seconds > 0:
        raise argparse.ArgumentTypeError(
            f"must be a duration such as 90s, 15m, 1h, 7d (or seconds), got {value!r}"
        )
    return seconds


def _groups(value: str) -> tuple[str, ...]:
    """``endpoint,tier``, ``endpoint``, ``tier`` or ``none`` (totals)."""
    names = [] if value.strip().lower() in ("", "none") else value.split(",")
    names = [n.strip() for n in names]
    if any(n not in ("endpoint", "tier") for n in names):
        raise argparse.ArgumentTypeError(
            f"must be endpoint, tier, endpoint,tier or none, got {value!r}"
        )
    return tuple(names)


def _stats_arguments(stats: argparse.ArgumentParser) -> None:
    """The options of `fineflow stats`."""
    stats.add_argument(
        "--since",
        type=_duration,
        default=None,
        metavar="DURATION",
        help="only the last DURATION: 90s, 15m, 1h, 7d, ... (default: every minute kept)",
    )
    stats.add_argument(
        "--by",
        type=_groups,
        default=("endpoint", "tier"),
        metavar="GROUPS",
        help="group by endpoint,tier (default), endpoint, tier, or none (totals)",
    )
    stats.add_argument(
        "--per-minute",
        action="store_true",
        help="one row per minute and group instead of totals",
    )
    stats.add_argument(
        "--plot",
        metavar="PNG",
        default=None,
        help="also draw allowed and denied per minute to PNG (needs fineflow[plot])",
    )


def _parser(*, json_errors: bool = False) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fineflow",
        description="Distributed rate limiting and circuit breaking for ASGI apps.",
        epilog="Exit status: 0 success, 1 runtime failure, 2 usage error.",
        json_errors=json_errors,
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"fineflow {__version__}",
        help="print 'fineflow VERSION' and exit",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> _Parser:
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.json_errors = json_errors
        return cmd

    def storage_command(name: str, help_text: str) -> _Parser:
        cmd = command(name, help_text)
        cmd.add_argument(
            "--dsn",
            default=None,
            help="PostgreSQL DSN or URL (default: $FINEFLOW_DSN, else libpq's PG* variables)",
        )
        cmd.add_argument(
            "--schema",
            default="fineflow",
            type=_identifier("schema"),
            help="schema name (default: fineflow)",
        )
        cmd.add_argument(
            "--json",
            action="store_true",
            help="print one JSON document on stdout, errors included",
        )
        cmd.set_defaults(unlogged=False, stats_retention=None)
        return cmd

    migrate = storage_command("migrate", "create or upgrade fineflow's schema (idempotent)")
    migrate.add_argument("--unlogged", action="store_true", help="create the table UNLOGGED")
    migrate.add_argument(
        "--runtime-role",
        metavar="ROLE",
        type=_identifier("role"),
        help="create ROLE if missing and let it only execute the decision/status functions",
    )
    status = storage_command("status", "show the live rate-limit state of one key")
    status.add_argument("key", help="the key (user id, API key, client address)")
    reset = storage_command("reset", "forget the rate-limit state of one key")
    reset.add_argument("key", help="the key (user id, API key, client address)")
    reset.add_argument("--endpoint", default=None, help="only this endpoint's state")
    cleanup = storage_command("cleanup", "delete expired rate-limit state in bounded batches")
    cleanup.add_argument(
        "--batch-size", type=_positive_int, default=1000, help="rows per batch (default: 1000)"
    )
    cleanup.add_argument(
        "--stats-retention",
        type=_duration,
        default=None,
        metavar="DURATION",
        help="also delete per-minute stats older than DURATION (default: keep them all)",
    )
    _stats_arguments(
        storage_command(
            "stats",
            "allowed and denied requests by endpoint and tier, from the per-minute rollups",
        )
    )
    demo = command("demo", "run the demo: a limited app driven by a scripted burst")
    demo.add_argument("--dsn", default=None, help="PostgreSQL to use (default: found or started)")
    demo.add_argument("--memory", action="store_true", help="use in-memory storage")
    demo.add_argument(
        "--json", action="store_true", help="print one JSON document on stdout, errors included"
    )
    command("bench", "run the benchmark suite from a clone (python -m benchmarks ARGS...)")
    return parser


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# A storage command's outcome: what ``--json`` prints, and what a person reads.
Outcome = tuple[object, str]


async def _storage_command(args: argparse.Namespace) -> int:
    # Without --stats-retention a command deletes no per-minute stats: the retention is the
    # app's setting (PostgresStorage(stats_retention=...)), which this command cannot know.
    options: dict[str, Any] = {"stats_retention": args.stats_retention}
    storage = PostgresStorage(
        args.dsn,
        schema=args.schema,
        unlogged=args.unlogged,
        min_size=1,
        max_size=1,
        stats_flush_every=None,  # (it decides nothing: no requests to count)
        **options,
    )
    try:
        # Connect once first: an unreachable or refusing server fails at once with its
        # own reason, not after the pool's retries with a timeout.
        await storage.open(wait=True)
        payload, text = await _COMMANDS[args.command](storage, args)
    finally:
        await storage.close()
    print(json.dumps(payload, indent=2) if args.json else text)
    return 0


async def _migrate(storage: PostgresStorage, args: argparse.Namespace) -> Outcome:
    result = await storage.apply_migrations()
    schema = args.schema
    payload: dict[str, object] = {
        "schema": schema,
        "action": result.action,
        "before": result.before,
        "after": result.after,
    }
    if result.action == "created":
        text = f"created schema {schema!r} at version {result.after}"
    elif result.action == "upgraded":
        text = f"upgraded schema {schema!r} from version {result.before} to {result.after}"
    else:
        text = f"schema {schema!r} is already up to date (version {result.after})"
    if args.runtime_role:
        await storage.grant_runtime(args.runtime_role, create=True)
        payload["runtime_role"] = args.runtime_role
        text += f"\nrole {args.runtime_role!r} may decide through the functions only"
    return payload, text


_STATUS_COLUMNS = [
    "endpoint",
    "policy",
    "tier",
    "algorithm",
    "remaining",
    "limit",
    "reset_after_s",
    "allowed",
    "denied",
]


async def _status(storage: PostgresStorage, args: argparse.Namespace) -> Outcome:
    rows = await storage.status(args.key)
    if not rows:
        return [], f"no live state for key {args.key!r}"
    return [_status_dict(r) for r in rows], _table(_STATUS_COLUMNS, [_status_row(r) for r in rows])


def _status_row(status: KeyStatus) -> list[object]:
    decision = status.decision
    return [
        status.endpoint or "-",
        status.policy,
        status.tier or "-",
        status.algorithm,
        decision.remaining,
        decision.limit,
        f"{decision.reset_after:.3f}",
        status.allowed_total,
        status.denied_total,
    ]


def _status_dict(status: KeyStatus) -> dict[str, object]:
    out = asdict(status)
    out["decision"] = status.decision._asdict()
    return out


async def _reset(storage: PostgresStorage, args: argparse.Namespace) -> Outcome:
    removed = await storage.reset(args.key, endpoint=args.endpoint)
    return {"removed": removed}, f"removed {removed} rows"


async def _cleanup(storage: PostgresStorage, args: argparse.Namespace) -> Outcome:
    removed = await storage.cleanup(batch_size=args.batch_size)
    return {"removed": removed}, f"removed {removed} rows"


async def _stats(storage: PostgresStorage, args: argparse.Namespace) -> Outcome:
    points: list[StatsPoint] = []
    if args.per_minute or args.plot:
        points = await storage.stats_series(since=args.since, by=args.by)
    if args.plot:
        from ._statsplot import plot_series

        plot_series(points, args.plot, by=args.by)
    if args.per_minute:
        payload: object = [_point_dict(p) for p in points]
        text = _table(
            ["minute", "endpoint", "tier", "allowed", "denied"],
            [[_minute(p), p.endpoint or "-", p.tier or "-", p.allowed, p.denied] for p in points],
        )
    else:
        stats = await storage.stats(since=args.since, by=args.by)
        rows = [[r.endpoint or "-", r.tier or "-", r.keys, r.allowed, r.denied] for r in stats]
        payload = [asdict(r) for r in stats]
        text = _table(["endpoint", "tier", "keys", "allowed", "denied"], rows)
    if args.plot and not args.json:
        text += f"\nwrote {args.plot} ({len(points)} points)"
    return payload, text


def _minute(point: StatsPoint) -> str:
    return point.minute.strftime("%Y-%m-%dT%H:%MZ")


def _point_dict(point: StatsPoint) -> dict[str, object]:
    out = asdict(point)
    out["minute"] = point.minute.isoformat()
    return out


_COMMANDS: dict[str, Callable[[PostgresStorage, argparse.Namespace], Awaitable[Outcome]]] = {
    "migrate": _migrate,
    "status": _status,
    "reset": _reset,
    "cleanup": _cleanup,
    "stats": _stats,
}


def _bench(args: list[str]) -> int:
    import importlib.util
    import os
    import runpy

    sys.path.insert(0, os.getcwd())  # benchmarks/ lives in the repository, not in the wheel
    if importlib.util.find_spec("benchmarks") is None:
        _print_error(
            "run `fineflow bench` from a clone of the repository (it runs its benchmarks/ "
            "folder), with the bench extra installed",
            EXIT_FAILURE,
            as_json=False,
        )
        return EXIT_FAILURE
    sys.argv = ["benchmarks", *args]
    try:
        runpy.run_module("benchmarks", run_name="__main__")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0
    return 0


def _print_error(message: str, exit_code: int, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"error": message, "exit_code": exit_code}))
    else:
        print(f"fineflow: error: {message}", file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from ._demo import run_demo

        return run_demo(dsn=args.dsn, memory=args.memory, as_json=args.json)
    return asyncio.run(_storage_command(args))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fineflow`` command line; return the exit status (0 success, 1 runtime
    failure, 2 usage)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    as_json = "--json" in argv
    args = _parser(json_errors=as_json).parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        return 130
    except ConfigurationError as exc:  # a bad DSN, from --dsn or the environment
        _print_error(str(exc), EXIT_USAGE, as_json=as_json)
        return EXIT_USAGE
    except FineflowError as exc:
        _print_error(str(exc), EXIT_FAILURE, as_json=as_json)
        return EXIT_FAILURE
    except Exception as exc:
        if not as_json:
            raise  # a bug: the traceback is what to report (and Python exits with 1)
        _print_error(f"unexpected {type(exc).__name__}: {exc}", EXIT_FAILURE, as_json=True)
        return EXIT_FAILURE


if __name__ == "__main__":
    raise SystemExit(main())
