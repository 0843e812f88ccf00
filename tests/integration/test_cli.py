"""The ``fineflow`` command against a real PostgreSQL, run as users run it: in a subprocess,
with its exit status and messages asserted (0 success, 1 runtime failure, 2 usage)."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

import fineflow
from fineflow import PostgresStorage, RateLimiter
from fineflow._storage.postgres import migrations
from fineflow.cli import main
from fineflow.testing import free_port

STORAGE_COMMANDS = [["migrate"], ["status", "alice"], ["reset", "alice"], ["cleanup"], ["stats"]]


def fineflow_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m fineflow ARGS`` with no FINEFLOW_DSN of the caller's, and its outcome."""
    env = {k: v for k, v in os.environ.items() if k != "FINEFLOW_DSN"}
    return subprocess.run(
        [sys.executable, "-m", "fineflow", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env=env,
    )


def _seed(dsn: str, schema: str) -> None:
    async def run() -> None:
        async with PostgresStorage(dsn, schema=schema) as storage:
            limiter = RateLimiter(storage)
            for _ in range(3):
                await limiter.hit("alice", "2/minute", endpoint="/chat", tier="free")

    asyncio.run(run())


def test_migrate_status_stats_cleanup(pg_dsn: str, pg_schema: str) -> None:
    base = ["--dsn", pg_dsn, "--schema", pg_schema]
    done = fineflow_cli("migrate", *base)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == f"created schema {pg_schema!r} at version {migrations.LATEST_VERSION}\n"
    _seed(pg_dsn, pg_schema)
    done = fineflow_cli("status", "alice", *base, "--json")
    assert done.returncode == 0
    (row,) = json.loads(done.stdout)
    assert row["endpoint"] == "/chat"
    assert row["tier"] == "free"
    assert row["allowed_total"] == 2
    assert row["denied_total"] == 1
    assert row["decision"]["remaining"] == 0
    table = fineflow_cli("status", "alice", *base).stdout
    assert "/chat" in table
    assert "2-per-60s" in table
    done = fineflow_cli("stats", *base, "--json")
    assert json.loads(done.stdout) == [
        {"endpoint": "/chat", "tier": "free", "keys": 1, "allowed": 2, "denied": 1}
    ]
    assert json.loads(fineflow_cli("cleanup", *base, "--json").stdout) == {"removed": 0}
    assert fineflow_cli("cleanup", *base, "--batch-size", "10").stdout == "removed 0 rows\n"
    assert fineflow_cli("status", "nobody", *base).stdout == "no live state for key 'nobody'\n"
    assert json.loads(fineflow_cli("status", "nobody", *base, "--json").stdout) == []


def test_migrate_says_what_it_did(pg_dsn: str, pg_schema: str) -> None:
    base = ["--dsn", pg_dsn, "--schema", pg_schema, "--json"]
    latest = migrations.LATEST_VERSION
    created = json.loads(fineflow_cli("migrate", *base).stdout)
    assert created == {"schema": pg_schema, "action": "created", "before": 0, "after": latest}
    done = fineflow_cli("migrate", *base[:-1])
    assert done.stdout == f"schema {pg_schema!r} is already up to date (version {latest})\n"
    again = json.loads(fineflow_cli("migrate", *base).stdout)
    assert again == {"schema": pg_schema, "action": "up to date", "before": latest, "after": latest}


def test_migrate_reports_an_upgrade(
    pg_dsn: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A version this code adds after the schema's: ``upgraded from N to N+1``. (In process:
    the extra version is patched in, re-running one function file, which is idempotent.)"""
    base = ["--dsn", pg_dsn, "--schema", pg_schema]
    assert main(["migrate", *base]) == 0
    capsys.readouterr()
    latest = migrations.LATEST_VERSION
    extra = migrations.Migration(latest + 1, ("functions/peek.sql",), compatible_with=1)
    monkeypatch.setattr(migrations, "MIGRATIONS", (*migrations.MIGRATIONS, extra))
    monkeypatch.setattr(migrations, "LATEST_VERSION", latest + 1)
    assert main(["migrate", *base]) == 0
    upgraded = f"upgraded schema {pg_schema!r} from version {latest} to {latest + 1}\n"
    assert capsys.readouterr().out == upgraded
    assert main(["migrate", *base, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["action"] == "up to date"


def test_reset_forgets_one_key(pg_dsn: str, pg_schema: str) -> None:
    base = ["--dsn", pg_dsn, "--schema", pg_schema]
    assert fineflow_cli("migrate", *base).returncode == 0
    _seed(pg_dsn, pg_schema)
    done = fineflow_cli("reset", "alice", *base, "--endpoint", "/other", "--json")
    assert (done.returncode, json.loads(done.stdout)) == (0, {"removed": 0})
    done = fineflow_cli("reset", "alice", *base, "--endpoint", "/chat")
    assert (done.returncode, done.stdout) == (0, "removed 1 rows\n")
    assert "no live state" in fineflow_cli("status", "alice", *base).stdout


def test_version_from_the_script_and_from_python_dash_m() -> None:
    script = shutil.which("fineflow", path=str(Path(sys.executable).parent))
    assert script is not None
    for done in (
        fineflow_cli("--version"),
        subprocess.run([script, "--version"], capture_output=True, text=True, check=False),
    ):
        assert (done.returncode, done.stdout) == (0, f"fineflow {fineflow.__version__}\n")


def test_help_lists_every_command() -> None:
    done = fineflow_cli("--help")
    assert done.returncode == 0
    for command in ("migrate", "status", "reset", "cleanup", "stats", "demo", "bench"):
        assert command in done.stdout
    assert "1 runtime failure, 2 usage" in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["status"], "the following arguments are required: key"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["stats", "--no-such-option"], "unrecognized arguments: --no-such-option"),
        (["migrate", "--schema", "no such schema"], "schema must be a plain SQL identifier"),
        (["migrate", "--runtime-role", "x; DROP"], "role must be a plain SQL identifier"),
        (["cleanup", "--batch-size", "0"], "--batch-size: must be a whole number >= 1"),
        (["stats", "--dsn", "host=db port"], "invalid PostgreSQL DSN"),
    ],
)
def test_usage_errors_exit_2(args: list[str], message: str) -> None:
    done = fineflow_cli(*args)
    assert done.returncode == 2
    assert message in done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["status", "--json"], "fineflow status: the following arguments are required: key"),
        (["cleanup", "--json", "--batch-size", "x"], "--batch-size: must be a whole number"),
        (["stats", "--json", "--dsn", "host=db port"], "invalid PostgreSQL DSN"),
    ],
)
def test_usage_errors_under_json_are_json_on_stdout(args: list[str], message: str) -> None:
    done = fineflow_cli(*args)
    assert (done.returncode, done.stderr) == (2, "")
    error = json.loads(done.stdout)
    assert error["exit_code"] == 2
    assert message in error["error"]


@pytest.mark.parametrize("command", STORAGE_COMMANDS, ids=lambda c: c[0])
def test_an_unreachable_server_fails_at_once_with_its_reason(command: list[str]) -> None:
    """Nothing listens on the port: the connection is refused, and the message says so
    (one attempt; not the pool's retries ending in a PoolTimeout)."""
    done = fineflow_cli(*command, "--dsn", f"host=127.0.0.1 port={free_port()} connect_timeout=30")
    assert done.returncode == 1
    assert done.stderr.startswith("fineflow: error: could not connect to PostgreSQL: ")
    assert "Connection refused" in done.stderr
    assert "PoolTimeout" not in done.stderr
    assert "couldn't get a connection" not in done.stderr
    assert done.stderr.count("\n") == 1  # one line


def test_a_refusing_server_fails_with_its_reason(pg_dsn: str) -> None:
    """The server answers and refuses: no such database, no such role."""
    database = f"no_such_db_{secrets.token_hex(4)}"
    done = fineflow_cli("stats", "--dsn", psycopg.conninfo.make_conninfo(pg_dsn, dbname=database))
    assert done.returncode == 1
    assert f'database "{database}" does not exist' in done.stderr
    assert "PoolTimeout" not in done.stderr
    role = f"no_such_role_{secrets.token_hex(4)}"
    done = fineflow_cli("status", "k", "--dsn", psycopg.conninfo.make_conninfo(pg_dsn, user=role))
    assert done.returncode == 1
    assert role in done.stderr  # 'role "…" does not exist' or '… authentication failed for user'
    assert "PoolTimeout" not in done.stderr


@pytest.mark.parametrize("command", STORAGE_COMMANDS[1:], ids=lambda c: c[0])
def test_a_missing_schema_says_to_run_migrate(
    pg_dsn: str, pg_schema: str, command: list[str]
) -> None:
    done = fineflow_cli(*command, "--dsn", pg_dsn, "--schema", pg_schema)
    assert done.returncode == 1
    assert pg_schema in done.stderr
    assert "run `fineflow migrate`" in done.stderr
    assert "explicit type casts" not in done.stderr  # the server's hint, which misleads here


def test_runtime_errors_under_json_are_json_on_stdout(pg_dsn: str, pg_schema: str) -> None:
    done = fineflow_cli("stats", "--dsn", pg_dsn, "--schema", pg_schema, "--json")
    assert (done.returncode, done.stderr) == (1, "")
    error = json.loads(done.stdout)
    assert error["exit_code"] == 1
    assert "run `fineflow migrate`" in error["error"]
    port = free_port()
    done = fineflow_cli("migrate", "--dsn", f"host=127.0.0.1 port={port}", "--json")
    assert (done.returncode, done.stderr) == (1, "")
    assert "Connection refused" in json.loads(done.stdout)["error"]


def test_bench_outside_a_clone_is_a_runtime_failure(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fineflow", "bench"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert done.returncode == 1
    assert "from a clone of the repository" in done.stderr


def test_stats_since_by_per_minute_and_plot(pg_dsn: str, pg_schema: str, tmp_path: Path) -> None:
    """The durable stats through the command: totals by the groups asked for, one row per
    minute, and a PNG of allowed and denied per minute."""
    base = ["--dsn", pg_dsn, "--schema", pg_schema]
    assert fineflow_cli("migrate", *base).returncode == 0
    _seed(pg_dsn, pg_schema)  # 2 allowed, 1 denied on /chat, tier free
    done = fineflow_cli("stats", *base, "--since", "1h", "--by", "endpoint,tier", "--json")
    assert (done.returncode, done.stderr) == (0, "")
    assert json.loads(done.stdout) == [
        {"endpoint": "/chat", "tier": "free", "keys": 1, "allowed": 2, "denied": 1}
    ]
    done = fineflow_cli("stats", *base, "--by", "tier", "--json")
    assert json.loads(done.stdout) == [
        {"endpoint": "", "tier": "free", "keys": 1, "allowed": 2, "denied": 1}
    ]
    done = fineflow_cli("stats", *base, "--per-minute", "--since", "15m", "--json")
    (point,) = json.loads(done.stdout)
    assert (point["endpoint"], point["tier"], point["allowed"], point["denied"]) == (
        "/chat",
        "free",
        2,
        1,
    )
    assert point["minute"].endswith("+00:00")
    png = tmp_path / "stats.png"
    done = fineflow_cli("stats", *base, "--since", "1h", "--plot", str(png))
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.splitlines()[-1] == f"wrote {png} (1 points)"
    assert "/chat" in done.stdout.splitlines()[2]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"  # a PNG: its signature, then its IHDR chunk
    assert data[12:16] == b"IHDR"
    assert (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) == (1000, 600)
    done = fineflow_cli("stats", *base, "--by", "none", "--plot", str(png), "--json")
    assert json.loads(done.stdout) == [
        {"endpoint": "", "tier": "", "keys": 1, "allowed": 2, "denied": 1}
    ]
    done = fineflow_cli("stats", *base, "--plot", str(tmp_path / "no" / "such" / "dir.png"))
    assert done.returncode == 1
    assert done.stderr.startswith("fineflow: error: cannot write the plot to ")
    done = fineflow_cli("cleanup", *base, "--stats-retention", "1d", "--json")
    assert json.loads(done.stdout) == {"removed": 0}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["stats", "--since", "1x"], "must be a duration such as 90s, 15m, 1h, 7d"),
        (["stats", "--since", "0"], "must be a duration"),
        (["stats", "--by", "user"], "must be endpoint, tier, endpoint,tier or none"),
        (["cleanup", "--stats-retention", "30s"], "stats_retention must be seconds >= 60"),
    ],
)
def test_bad_stats_arguments_are_usage_errors(args: list[str], message: str) -> None:
    done = fineflow_cli(*args, "--dsn", "host=127.0.0.1")
    assert done.returncode == 2
    assert message in done.stderr
