"""fineflow's pytest plugin: fixtures for the tests of an app that uses fineflow.

pytest loads it by itself once fineflow is installed (the ``pytest11`` entry point), so the
fixtures are there without a ``conftest.py`` line:

* ``ff_clock``: a :class:`~fineflow.testing.FakeClock`; ``ff_clock.advance(60)`` moves
  time at once.
* ``ff_limiter``: a :class:`~fineflow.RateLimiter` over a fresh
  :class:`~fineflow.MemoryStorage`, both on ``ff_clock``. Making it needs no event loop,
  so sync tests (Starlette's ``TestClient``) can hand it to a middleware as well as async
  tests can ``await`` it.
* ``ff_postgres_server``: the PostgreSQL server of the test session: the one
  ``FINEFLOW_TEST_DSN`` names, else the local default server, else a throwaway cluster
  (see :func:`fineflow.testing.find_postgres`).
* ``ff_postgres_dsn``: the DSN of a database made on it for this test session and dropped
  after it. Session-scoped: give each test its own ``schema=`` of ``PostgresStorage`` to
  keep tests apart.

PostgreSQL is imported only when ``ff_postgres_dsn`` is used.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from .._ratelimit.limiter import RateLimiter
from .._storage.memory import MemoryStorage
from .clock import FakeClock

if TYPE_CHECKING:
    from .postgres import PostgresServer

__all__ = ["ff_clock", "ff_limiter", "ff_postgres_dsn", "ff_postgres_server"]


@pytest.fixture
def ff_clock() -> FakeClock:
    """A fake clock, standing still until the test moves it."""
    return FakeClock()


@pytest.fixture
def ff_limiter(ff_clock: FakeClock) -> RateLimiter:
    """A memory-backed rate limiter whose time is ``ff_clock``."""
    return RateLimiter(MemoryStorage(clock=ff_clock.time_ns), clock=ff_clock)


@pytest.fixture(scope="session")
def ff_postgres_server() -> Iterator[PostgresServer]:
    """The PostgreSQL server of this test session (found, or started and removed after)."""
    from .postgres import find_postgres

    with find_postgres() as server:
        yield server


@pytest.fixture(scope="session")
def ff_postgres_dsn(ff_postgres_server: PostgresServer) -> Iterator[str]:
    """A database made for this test session on ``ff_postgres_server``, dropped after it."""
    from .postgres import temporary_database

    with temporary_database(ff_postgres_server) as dsn:
        yield dsn
