"""The package's public names: all importable, PostgreSQL support loaded only when asked for."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import fineflow


def test_every_public_name_resolves() -> None:
    for name in fineflow.__all__:
        assert getattr(fineflow, name) is not None, name
    public = {n for n in dir(fineflow) if not n.startswith("__")}
    assert public == set(fineflow.__all__) - {"__version__"}  # no helper names (typing, ...)


def test_type_checkers_still_flag_a_misspelt_name(tmp_path: Path) -> None:
    # The lazy __getattr__ is hidden from type checkers: with it visible, mypy would type
    # any unknown name as Any and let typos through.
    api = pytest.importorskip("mypy.api")
    user = tmp_path / "user_code.py"
    user.write_text("from fineflow import MemoryStorag, PostgresStorage\n")
    cache = str(tmp_path / "cache")
    out, _, status = api.run(["--strict", "--cache-dir", cache, str(user)])
    assert status == 1
    assert 'Module "fineflow" has no attribute "MemoryStorag"' in out
    assert "PostgresStorage" not in out


def test_star_import_includes_postgres_storage() -> None:
    namespace: dict[str, object] = {}
    exec("from fineflow import *", namespace)
    from fineflow._storage.postgres.storage import PostgresStorage

    assert namespace["PostgresStorage"] is PostgresStorage
    assert set(fineflow.__all__) <= set(namespace)


def test_unknown_name_is_an_attribute_error() -> None:
    name = "PostgresStorag"
    with pytest.raises(AttributeError, match="no attribute 'PostgresStorag'"):
        getattr(fineflow, name)
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
    assert out.stdout.strip() == "fineflow._storage.postgres.storage"
