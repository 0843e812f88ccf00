"""The PostgreSQL test harness finds, starts and cleans up real servers."""

from __future__ import annotations

import os
from pathlib import Path

import psycopg
import pytest

from fineflow.testing import (
    PostgresNotFoundError,
    PostgresServer,
    find_postgres,
    find_postgres_bindir,
    temporary_database,
)


@pytest.fixture(autouse=True)
def _no_forced_throwaway(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests exercise the search order itself, whatever the session was told."""
    monkeypatch.delenv("FINEFLOW_TEST_THROWAWAY", raising=False)


def test_forced_throwaway_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINEFLOW_TEST_THROWAWAY", "1")
    with find_postgres() as server:
        assert server.source == "throwaway"


def test_session_server_answers(pg_server: PostgresServer, pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute("SELECT current_database()").fetchone()
    assert row is not None
    assert pg_server.source in {"env", "local", "throwaway"}
    if pg_dsn != pg_server.dsn:
        assert row[0].startswith("fineflow_test_")


def test_temporary_database_is_dropped(pg_server: PostgresServer) -> None:
    with temporary_database(pg_server) as dsn:
        with psycopg.connect(dsn) as conn:
            name = conn.execute("SELECT current_database()").fetchone()
        assert name is not None
    with psycopg.connect(pg_server.dsn) as conn:
        left = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name[0],))
        assert left.fetchone() is None


def test_throwaway_cluster_starts_even_where_a_server_runs() -> None:
    if find_postgres_bindir() is None:
        pytest.fail("PostgreSQL server binaries are required for this test (initdb, pg_ctl)")
    with find_postgres(throwaway=True) as server:
        assert server.source == "throwaway"
        assert server.cluster is not None
        root = server.cluster.root
        assert "host=/" in server.dsn  # a private Unix socket, no TCP listener
        with psycopg.connect(server.dsn) as conn:
            listen = conn.execute("SHOW listen_addresses").fetchone()
        assert listen == ("",)
        server.cluster.stop("immediate")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(server.dsn, connect_timeout=2)
        server.cluster.start()
        with psycopg.connect(server.dsn) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    assert not Path(root).exists()


def test_no_server_at_all_fails_with_the_three_ways(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FINEFLOW_TEST_DSN", raising=False)
    monkeypatch.setenv("PGHOST", "/nonexistent-fineflow")
    monkeypatch.setattr(
        "fineflow.testing.postgres.LOCAL_FALLBACK_DSN", "host=/nonexistent-fineflow"
    )
    monkeypatch.setattr("fineflow.testing.postgres.find_postgres_bindir", lambda: None)
    with pytest.raises(PostgresNotFoundError) as info:
        find_postgres()
    message = str(info.value)
    assert "FINEFLOW_TEST_DSN" in message
    assert "127.0.0.1:5432" in message
    assert "initdb" in message


def test_env_dsn_that_does_not_answer_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINEFLOW_TEST_DSN", "host=/nonexistent-fineflow dbname=x")
    with pytest.raises(PostgresNotFoundError, match="does not answer"):
        find_postgres()


def test_env_dsn_is_preferred(monkeypatch: pytest.MonkeyPatch, pg_server: PostgresServer) -> None:
    monkeypatch.setenv("FINEFLOW_TEST_DSN", pg_server.dsn or "dbname=postgres")
    if not pg_server.dsn:
        monkeypatch.setenv("PGDATABASE", os.environ.get("PGDATABASE", "postgres"))
    server = find_postgres()
    assert server.source == "env"
