"""Test helpers for fineflow and for your own tests of code that uses it.

* :class:`FakeClock`: time that moves only when the test moves it.
* PostgreSQL: :func:`find_postgres` finds or starts a real server (``FINEFLOW_TEST_DSN``, the
  local default server, or a throwaway cluster) and :func:`temporary_database` makes a
  database for one test session (see :mod:`fineflow.testing.postgres`).
* :func:`free_port` and :class:`UvicornProcess`: a real server for end-to-end tests.
* :mod:`fineflow.testing.conformance`: the storage conformance suite, for a storage of
  your own (a pytest base class).

The PostgreSQL helpers import psycopg when first used, so ``from fineflow.testing import
FakeClock`` stays light.
"""

from __future__ import annotations

import typing as _typing

from .clock import FakeClock
from .processes import UvicornProcess, free_port

if _typing.TYPE_CHECKING:
    from .postgres import (
        PostgresNotFoundError,
        PostgresServer,
        ThrowawayCluster,
        find_postgres,
        find_postgres_bindir,
        temporary_database,
    )

__all__ = [
    "FakeClock",
    "PostgresNotFoundError",
    "PostgresServer",
    "ThrowawayCluster",
    "UvicornProcess",
    "find_postgres",
    "find_postgres_bindir",
    "free_port",
    "temporary_database",
]

_POSTGRES = frozenset(__all__) - {"FakeClock", "UvicornProcess", "free_port"}

if not _typing.TYPE_CHECKING:  # (type checkers see the imports above)

    def __getattr__(name: str) -> object:
        if name in _POSTGRES:
            from . import postgres

            value = getattr(postgres, name)
            globals()[name] = value
            return value
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
