"""The package's public names: all importable, PostgreSQL support loaded only when asked for."""

from __future__ import annotations

import subprocess
import sys

import pytest

import fineflow


def test_every_public_name_resolves() -> None:
    for name in fineflow.__all__:
        assert getattr(fineflow, name) is not None, name
    assert set(fineflow.__all__) <= set(dir(fineflow))


def test_star_import_includes_postgres_storage() -> None:
    namespace: dict[str, object] = {}
    exec("from fineflow import *", namespace)
    from fineflow._postgres import PostgresStorage

    assert namespace["PostgresStorage"] is PostgresStorage
    assert set(fineflow.__all__) <= set(namespace)


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'PostgresStorag'"):
        fineflow.PostgresStorag  # noqa: B018
    with pytest.raises(ImportError):
        exec("from fineflow import NoSuchThing", {})


def test_import_leaves_psycopg_until_postgres_storage_is_used() -> None:
    # A fresh interpreter: this one has psycopg loaded by other tests already.
    code = (
        "import sys, fineflow\n"
        "assert 'psycopg' not in sys.modules, 'import fineflow loaded psycopg'\n"
        "m = fineflow.MemoryStorage(); l = fineflow.RateLimiter(m)\n"
        "mw = fineflow.RateLimitMiddleware(lambda s, r, se: None, limiter=l,\n"
        "    rules=[fineflow.Rule('/', quota='1/second')])\n"
        "assert 'psycopg' not in sys.modules, 'memory storage loaded psycopg'\n"
        "from fineflow import PostgresStorage\n"
        "assert 'psycopg' in sys.modules\n"
        "print(PostgresStorage.__module__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "fineflow._postgres"
