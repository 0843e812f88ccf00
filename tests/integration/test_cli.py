"""The ``fineflow`` command against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from fineflow import PostgresStorage, RateLimiter
from fineflow.cli import main


def _seed(dsn: str, schema: str) -> None:
    async def run() -> None:
        async with PostgresStorage(dsn, schema=schema) as storage:
            limiter = RateLimiter(storage)
            for _ in range(3):
                await limiter.hit("alice", "2/minute", endpoint="/chat", tier="free")

    asyncio.run(run())


def test_migrate_status_stats_cleanup(
    pg_dsn: str, pg_schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--dsn", pg_dsn, "--schema", pg_schema]
    assert main(["migrate", *base]) == 0
    assert "up to date" in capsys.readouterr().out
    _seed(pg_dsn, pg_schema)
    assert main(["status", "alice", *base, "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["endpoint"] == "/chat"
    assert row["tier"] == "free"
    assert row["allowed_total"] == 2
    assert row["denied_total"] == 1
    assert row["decision"]["remaining"] == 0
    assert main(["status", "alice", *base]) == 0
    table = capsys.readouterr().out
    assert "/chat" in table
    assert "2-per-60s" in table
    assert main(["stats", *base, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"endpoint": "/chat", "tier": "free", "keys": 1, "allowed": 2, "denied": 1}
    ]
    assert main(["cleanup", *base, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"removed": 0}
    assert main(["status", "nobody", *base]) == 0
    assert "no live state" in capsys.readouterr().out


def test_bad_schema_and_unreachable_server_are_clear_errors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["migrate", "--schema", "no such schema"]) == 2
    assert "identifier" in capsys.readouterr().err


def test_python_dash_m_fineflow_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fineflow", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("migrate", "status", "reset", "cleanup", "stats", "demo"):
        assert command in out.stdout


def test_reset_forgets_one_key(
    pg_dsn: str, pg_schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--dsn", pg_dsn, "--schema", pg_schema]
    assert main(["migrate", *base]) == 0
    _seed(pg_dsn, pg_schema)
    assert main(["reset", "alice", *base, "--endpoint", "/other", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {"removed": 0}
    assert main(["reset", "alice", *base]) == 0
    assert "removed 1 rows" in capsys.readouterr().out
    assert main(["status", "alice", *base]) == 0
    assert "no live state" in capsys.readouterr().out
