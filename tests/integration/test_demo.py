"""``fineflow demo`` runs end to end on a real uvicorn server and stops by itself."""

from __future__ import annotations

import pytest

from fineflow.cli import main


def test_demo_with_postgresql(pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--dsn", pg_dsn]) == 0
    out = capsys.readouterr().out
    assert "PostgreSQL from --dsn" in out
    assert "alice  free        5/minute   12    5            7" in out
    assert "Retry-After:" in out
    assert "503     open" in out


def test_demo_in_memory(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--memory"]) == 0
    out = capsys.readouterr().out
    assert "in-memory storage" in out
    assert "Every user got exactly their tier's quota" in out
