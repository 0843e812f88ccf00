"""The ``fineflow`` command: ``migrate``, ``status KEY``, ``reset KEY``, ``cleanup``, ``stats``,
``demo``, ``bench``."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict

from ._errors import FineflowError
from ._storage.base import KeyStatus
from ._storage.postgres.storage import PostgresStorage

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fineflow",
        description="Distributed rate limiting and circuit breaking for ASGI apps.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def storage_command(name: str, help_text: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument(
            "--dsn",
            default=None,
            help="PostgreSQL DSN or URL (default: $FINEFLOW_DSN, else libpq's PG* variables)",
        )
        cmd.add_argument("--schema", default="fineflow", help="schema name (default: fineflow)")
        cmd.add_argument("--json", action="store_true", help="print JSON instead of a table")
        cmd.set_defaults(unlogged=False)
        return cmd

    migrate = storage_command("migrate", "create or upgrade fineflow's schema (idempotent)")
    migrate.add_argument("--unlogged", action="store_true", help="create the table UNLOGGED")
    migrate.add_argument(
        "--runtime-role",
        metavar="ROLE",
        help="create ROLE if missing and let it only execute the decision/status functions",
    )
    status = storage_command("status", "show the live rate-limit state of one key")
    status.add_argument("key", help="the key (user id, API key, client address)")
    reset = storage_command("reset", "forget the rate-limit state of one key")
    reset.add_argument("key", help="the key (user id, API key, client address)")
    reset.add_argument("--endpoint", default=None, help="only this endpoint's state")
    cleanup = storage_command("cleanup", "delete expired rate-limit state in bounded batches")
    cleanup.add_argument("--batch-size", type=int, default=1000, help="rows per batch")
    storage_command("stats", "allowed and denied counts by endpoint and tier")
    demo = sub.add_parser("demo", help="run the demo: a limited app driven by a scripted burst")
    demo.add_argument("--dsn", default=None, help="PostgreSQL to use (default: found or started)")
    demo.add_argument("--memory", action="store_true", help="use in-memory storage")
    sub.add_parser(
        "bench", help="run the benchmark suite from a clone (python -m benchmarks ARGS...)"
    )
    return parser


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


async def _storage_command(args: argparse.Namespace) -> int:
    storage = PostgresStorage(
        args.dsn, schema=args.schema, unlogged=args.unlogged, min_size=1, max_size=1
    )
    async with storage:
        await storage.pool.wait(timeout=storage.connect_timeout)
        await _COMMANDS[args.command](storage, args)
    return 0


async def _migrate(storage: PostgresStorage, args: argparse.Namespace) -> None:
    await storage.migrate()
    print(f"schema {args.schema!r} is up to date")
    if args.runtime_role:
        await storage.grant_runtime(args.runtime_role, create=True)
        print(f"role {args.runtime_role!r} may decide through the functions only")


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


async def _status(storage: PostgresStorage, args: argparse.Namespace) -> None:
    rows = await storage.status(args.key)
    if args.json:
        print(json.dumps([_status_dict(r) for r in rows], indent=2))
    elif not rows:
        print(f"no live state for key {args.key!r}")
    else:
        print(_table(_STATUS_COLUMNS, [_status_row(r) for r in rows]))


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


async def _reset(storage: PostgresStorage, args: argparse.Namespace) -> None:
    removed = await storage.reset(args.key, endpoint=args.endpoint)
    print(json.dumps({"removed": removed}) if args.json else f"removed {removed} rows")


async def _cleanup(storage: PostgresStorage, args: argparse.Namespace) -> None:
    removed = await storage.cleanup(batch_size=args.batch_size)
    print(json.dumps({"removed": removed}) if args.json else f"removed {removed} rows")


async def _stats(storage: PostgresStorage, args: argparse.Namespace) -> None:
    stats = await storage.stats()
    if args.json:
        print(json.dumps([asdict(r) for r in stats], indent=2))
        return
    rows = [[r.endpoint or "-", r.tier or "-", r.keys, r.allowed, r.denied] for r in stats]
    print(_table(["endpoint", "tier", "keys", "allowed", "denied"], rows))


_COMMANDS: dict[str, Callable[[PostgresStorage, argparse.Namespace], Awaitable[None]]] = {
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
        print(
            "fineflow: error: run `fineflow bench` from a clone of the repository "
            "(it runs its benchmarks/ folder), with the bench extra installed",
            file=sys.stderr,
        )
        return 2
    sys.argv = ["benchmarks", *args]
    try:
        runpy.run_module("benchmarks", run_name="__main__")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fineflow`` command line; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            from ._demo import run_demo

            return run_demo(dsn=args.dsn, memory=args.memory)
        return asyncio.run(_storage_command(args))
    except FineflowError as exc:
        print(f"fineflow: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # psycopg_pool.PoolTimeout and friends: say it plainly
        print(
            f"fineflow: error: could not reach PostgreSQL ({type(exc).__name__}: {exc}); "
            "check --dsn or FINEFLOW_DSN",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
