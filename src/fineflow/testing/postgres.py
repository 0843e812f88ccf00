"""Find or start a real PostgreSQL server for tests, demos and benchmarks.

``find_postgres()`` looks, in this order, for:

1. ``FINEFLOW_TEST_DSN`` in the environment;
2. the local default server (libpq's defaults: ``PGHOST``/``PGPORT``/... or the default
   socket, then ``127.0.0.1:5432``), if it answers;
3. a throwaway cluster of its own, made with ``initdb``/``pg_ctl`` found on ``PATH``, through
   ``pg_config --bindir`` or under ``/usr/lib/postgresql/*/bin``. When the process runs as
   root the cluster runs as an unprivileged user (PostgreSQL refuses root). It listens only
   on a private Unix socket directory and is stopped and deleted on ``close()`` and at exit.

If none works it raises :class:`PostgresNotFoundError` naming those three ways.

``temporary_database(server)`` then creates a fresh database for one test session and drops
it afterwards, so concurrent runs never collide. Users' own test suites can do the same::

    from fineflow.testing import find_postgres, temporary_database

    with find_postgres() as server, temporary_database(server) as dsn:
        storage = PostgresStorage(dsn)
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import psycopg
from psycopg import sql

from .._errors import FineflowError

__all__ = [
    "PostgresNotFoundError",
    "PostgresServer",
    "ThrowawayCluster",
    "find_postgres",
    "find_postgres_bindir",
    "temporary_database",
]

ENV_DSN = "FINEFLOW_TEST_DSN"
ENV_THROWAWAY = "FINEFLOW_TEST_THROWAWAY"
LOCAL_FALLBACK_DSN = "host=127.0.0.1 port=5432"


class PostgresNotFoundError(FineflowError):
    """No PostgreSQL server could be found or started."""


@dataclass
class PostgresServer:
    """A PostgreSQL server the tests may use.

    Attributes:
        dsn: a libpq connection string for a database the tests may connect to.
        source: ``"env"``, ``"local"`` or ``"throwaway"``: how it was found.
        cluster: the throwaway cluster when ``source == "throwaway"``.
    """

    dsn: str
    source: Literal["env", "local", "throwaway"]
    cluster: ThrowawayCluster | None = None

    def close(self) -> None:
        """Stop and delete the throwaway cluster, if this server is one."""
        if self.cluster is not None:
            self.cluster.close()

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _answers(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=3, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error:
        return False
    return True


def find_postgres_bindir() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl``, or ``None`` if there is none."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(os.path.realpath(on_path)).parent
    if shutil.which("pg_config"):
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            out = subprocess.run(
                ["pg_config", "--bindir"], check=True, capture_output=True, text=True
            )
            bindir = Path(out.stdout.strip())
            if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
                return bindir

    def version(path: str) -> float:
        try:
            return float(Path(path).parent.name)
        except ValueError:
            return 0.0

    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        bindir = Path(candidate)
        if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
            return bindir
    return None


@dataclass
class ThrowawayCluster:
    """A private PostgreSQL cluster in a temporary directory, reachable by Unix socket only.

    Use :meth:`start` (or ``with ThrowawayCluster.create() as cluster``); :meth:`close`
    stops it and deletes its files. :meth:`stop` and :meth:`restart` let fault tests take
    the server away and bring it back.
    """

    bindir: Path
    root: Path
    user: str | None = None
    port: int = 5432
    _closed: bool = field(default=False, repr=False)

    @classmethod
    def create(cls, bindir: Path | None = None) -> ThrowawayCluster:
        """Initialise and start a new cluster; raise ``PostgresNotFoundError`` on failure."""
        bindir = bindir or find_postgres_bindir()
        if bindir is None:
            raise PostgresNotFoundError("no initdb/pg_ctl found to start a throwaway cluster")
        root = Path(tempfile.mkdtemp(prefix="fineflow-pg-"))
        user = None
        if os.geteuid() == 0:
            user = _unprivileged_user()
            entry = pwd.getpwnam(user)
            os.chown(root, entry.pw_uid, entry.pw_gid)
        cluster = cls(bindir, root, user)
        atexit.register(cluster.close)
        try:
            cluster._run(
                "initdb",
                "-D",
                str(cluster.data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            )
            cluster.start()
        except BaseException:
            cluster.close()
            raise
        return cluster

    @property
    def data(self) -> Path:
        """The data directory."""
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        """The private directory holding the server's Unix socket."""
        return self.root

    @property
    def dsn(self) -> str:
        """A DSN for the cluster's ``postgres`` database as superuser ``postgres``."""
        return f"host={self.socket_dir} port={self.port} user=postgres dbname=postgres"

    def _run(self, tool: str, *args: str) -> None:
        result = subprocess.run(
            [str(self.bindir / tool), *args],
            capture_output=True,
            text=True,
            cwd=self.root,
            check=False,
            user=self.user,
        )
        if result.returncode != 0:
            raise PostgresNotFoundError(
                f"{tool} failed ({result.returncode}): {result.stderr.strip() or result.stdout}"
            )

    def start(self) -> None:
        """Start (or start again) the server and wait until it accepts connections."""
        options = (
            f"-c listen_addresses='' -k {self.socket_dir} -p {self.port} -c fsync=off "
            "-c max_connections=200 -c shared_buffers=64MB"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.root / "server.log"),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self, mode: Literal["smart", "fast", "immediate"] = "fast") -> None:
        """Stop the server (``immediate`` is a crash, as a power cut would be)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self) -> None:
        """Stop the server quickly and start it again."""
        self.stop("fast")
        self.start()

    def close(self) -> None:
        """Stop the server if it runs and delete every file of the cluster."""
        if self._closed:
            return
        self._closed = True
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(PostgresNotFoundError, OSError):
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> ThrowawayCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unprivileged_user() -> str:
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise PostgresNotFoundError(
        "running as root and found no 'postgres' or 'nobody' user to run a cluster as"
    )


def _not_found_message(reasons: list[str]) -> str:
    return (
        "fineflow found no PostgreSQL server for the tests. Give it one of:\n"
        f"  1. {ENV_DSN}=postgresql://user@host:5432/db (any server you may create databases on);\n"
        "  2. a local server on the default socket or 127.0.0.1:5432 (libpq defaults, PG* vars);\n"
        "  3. PostgreSQL's server binaries (initdb, pg_ctl) on PATH, via pg_config, or under\n"
        "     /usr/lib/postgresql/*/bin, e.g. `apt-get install postgresql`, so a throwaway\n"
        "     cluster can be started.\n"
        "What was tried: " + "; ".join(reasons)
    )


def find_postgres(*, throwaway: bool | None = None) -> PostgresServer:
    """Find a server as described in the module docstring.

    Args:
        throwaway: ``True`` always starts a throwaway cluster (even where a server runs);
            ``False`` never does; ``None`` (default) starts one only when nothing else
            works, or always when the environment sets ``FINEFLOW_TEST_THROWAWAY=1``.

    Raises:
        PostgresNotFoundError: with a message naming the three ways to provide a server.
    """
    reasons: list[str] = []
    if throwaway is None and os.environ.get(ENV_THROWAWAY) == "1":
        throwaway = True
    if throwaway is not True:
        env = os.environ.get(ENV_DSN)
        if env:
            if _answers(env):
                return PostgresServer(env, "env")
            raise PostgresNotFoundError(
                f"{ENV_DSN} is set but the server does not answer: {env!r}. Fix or unset it."
            )
        reasons.append(f"{ENV_DSN} is not set")
        for dsn in ("", LOCAL_FALLBACK_DSN):
            if _answers(dsn):
                return PostgresServer(dsn, "local")
        reasons.append("no local server answered (libpq defaults, 127.0.0.1:5432)")
    if throwaway is not False:
        bindir = find_postgres_bindir()
        if bindir is None:
            reasons.append("no initdb/pg_ctl on PATH, via pg_config or in /usr/lib/postgresql")
        else:
            try:
                cluster = ThrowawayCluster.create(bindir)
            except PostgresNotFoundError as exc:
                reasons.append(f"a throwaway cluster failed to start: {exc}")
            else:
                return PostgresServer(cluster.dsn, "throwaway", cluster)
    raise PostgresNotFoundError(_not_found_message(reasons))


def _with_dbname(dsn: str, dbname: str) -> str:
    return psycopg.conninfo.make_conninfo(dsn, dbname=dbname)


@contextlib.contextmanager
def temporary_database(server: PostgresServer | str) -> Iterator[str]:
    """Create a fresh database, yield its DSN, drop it afterwards (even on failure).

    If the role may not create databases, yields the server's own DSN instead: callers
    should then isolate themselves with a unique schema (fineflow's tests always do).
    """
    dsn = server if isinstance(server, str) else server.dsn
    name = f"fineflow_test_{os.getpid()}_{secrets.token_hex(4)}"
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.errors.InsufficientPrivilege:
        yield dsn
        return
    try:
        yield _with_dbname(dsn, name)
    finally:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
