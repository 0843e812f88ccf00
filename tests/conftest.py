"""Shared fixtures: a real PostgreSQL server for the session (from fineflow's own pytest plugin,
as users get it), Hypothesis profiles."""

from __future__ import annotations

import os
import secrets

import pytest
from hypothesis import HealthCheck, settings

from fineflow.testing import PostgresServer

settings.register_profile(
    "default", max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "ci",
    max_examples=200,
    deadline=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=10, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Async tests run on asyncio unless a module parametrizes ``anyio_backend`` itself."""
    return "asyncio"


@pytest.fixture(scope="session")
def pg_server(ff_postgres_server: PostgresServer) -> PostgresServer:
    """The PostgreSQL server of this test session (the plugin's: env DSN, local, or throwaway)."""
    return ff_postgres_server


@pytest.fixture(scope="session")
def pg_dsn(ff_postgres_dsn: str) -> str:
    """A database created for this test session and dropped after it (the plugin's)."""
    return ff_postgres_dsn


@pytest.fixture
def pg_schema() -> str:
    """A schema name unique to one test, so tests never see each other's state."""
    return f"ff_{secrets.token_hex(6)}"
