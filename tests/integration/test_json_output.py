"""``--json`` of ``fineflow demo`` and ``python -m benchmarks``: stdout is one JSON document,
errors included, in subprocesses as a script would run them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> tuple[int, Any, str]:
    """Run ``python args...`` in the repository; its exit status, stdout parsed as JSON
    (the whole of it) and stderr."""
    result = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    try:
        document = json.loads(result.stdout)
    except json.JSONDecodeError as exc:
        raise AssertionError(f"stdout is not one JSON document: {result.stdout!r}") from exc
    return result.returncode, document, result.stderr


def test_demo_json() -> None:
    status, report, stderr = run("-m", "fineflow", "demo", "--memory", "--json")
    assert status == 0, stderr
    assert report["ok"] is True and report["storage"].startswith("in-memory")
    rows = {row["user"]: row for row in report["rate_limiting"]}
    assert rows["alice"] == {
        "user": "alice",
        "tier": "free",
        "quota": "5/minute",
        "sent": 12,
        "allowed": 5,
        "limited": 7,
    }
    assert [rows[u]["allowed"] for u in ("bob", "carol")] == [20, 40]
    calls = report["circuit_breaking"]
    assert [c["status"] for c in calls] == [502] * 5 + [503] * 5
    assert calls[-1]["circuit_state"] == "open" and calls[0]["retry_after"] is None
    assert any("RateLimit-Policy" in line for line in report["sample_headers"])


def test_demo_json_usage_error() -> None:
    status, report, _ = run("-m", "fineflow", "demo", "--json", "--no-such-option")
    assert status == 2
    assert report["exit_code"] == 2 and "--no-such-option" in report["error"]


def test_benchmarks_json_smoke() -> None:
    status, report, stderr = run("-m", "benchmarks", "--smoke", "--only", "breaker", "--json")
    assert status == 0, stderr
    assert report["mode"] == "smoke" and report["errors"] == {}
    assert report["tables"] and {t["suite"] for t in report["tables"]} == {"breaker"}
    names = [row["name"] for table in report["tables"] for row in table["rows"]]
    assert any(name.startswith("fineflow") for name in names), names  # (peers: bench extra)
    assert "fineflow benchmarks, mode smoke" in stderr  # the tables went to stderr


def test_benchmarks_json_usage_error() -> None:
    status, report, _ = run("-m", "benchmarks", "--json", "--only", "no-such-suite")
    assert status == 2
    assert report["exit_code"] == 2 and "no-such-suite" in report["error"]
