"""Find or start Redis for tests, demos and benchmarks: a server, or a throwaway Cluster.

``find_redis()`` looks, in this order, for:

1. ``FINEFLOW_TEST_REDIS_URL`` in the environment;
2. the local default server, ``redis://127.0.0.1:6379``, if it answers PING;
3. a throwaway ``redis-server`` of its own on a free port (no persistence, in a temporary
   directory), stopped and deleted on ``close()`` and at exit.

If none works it raises :class:`RedisNotFoundError` naming those three ways. A found server
is shared: give each run its own key prefix (``unique_prefix()``) and remove only your own
keys (``delete_prefix()``); never FLUSHDB a server you did not start.

``throwaway_cluster()`` starts a Redis Cluster of three masters (``redis-server
--cluster-enabled yes`` on free ports, joined by ``redis-cli --cluster create``);
``throwaway_sentinel()`` a master, a replica and ``redis-server --sentinel`` processes
watching them, for failover tests::

    from fineflow.testing.redis import find_redis, throwaway_cluster

    with find_redis() as server:
        storage = RedisStorage(server.url, prefix=unique_prefix())
    with throwaway_cluster() as cluster:
        storage = RedisStorage(cluster.url, cluster=True)
    with throwaway_sentinel() as sentinel:
        storage = RedisStorage(sentinel.url)  # redis+sentinel://127.0.0.1:port/fineflow
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from .._errors import FineflowError
from . import free_port

__all__ = [
    "RedisNotFoundError",
    "RedisProcess",
    "RedisServer",
    "SentinelProcess",
    "ThrowawayCluster",
    "ThrowawaySentinel",
    "delete_prefix",
    "find_redis",
    "shared_cluster",
    "shared_redis",
    "throwaway_cluster",
    "throwaway_sentinel",
    "throwaway_server",
    "unique_prefix",
]

ENV_URL = "FINEFLOW_TEST_REDIS_URL"
LOCAL_URL = "redis://127.0.0.1:6379/0"
_INSTALL = (
    "install redis-server (Debian/Ubuntu: apt-get install redis-server; macOS: brew install "
    "redis), start one on 127.0.0.1:6379, or set FINEFLOW_TEST_REDIS_URL"
)


class RedisNotFoundError(FineflowError):
    """No Redis server could be found or started."""


def _ping(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _cli(port: int, *args: str, timeout: float = 10.0) -> str:
    out = subprocess.run(
        [_binary("redis-cli"), "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    return out.stdout


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RedisNotFoundError(f"{name} is not on PATH; {_INSTALL}")
    return path


def _cluster_port() -> int:
    """A free port for a cluster node: at most 55535, its bus port (+10000) free too."""
    for _ in range(200):
        port = free_port()
        if port > 55535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RedisNotFoundError("no free port pair for a cluster node")


class RedisProcess:
    """One ``redis-server`` process on 127.0.0.1 and a free port, in a temporary directory.

    ``stop()`` kills it (a crash, for fault tests) and ``start()`` starts it again on the
    same port and directory (a cluster node keeps its identity in ``nodes.conf``).
    """

    def __init__(
        self,
        *,
        cluster: bool = False,
        directory: Path | None = None,
        node_timeout: float = 2.0,
        replica_of: int | None = None,
    ) -> None:
        self.port = _cluster_port() if cluster else free_port()
        self.directory = directory or Path(tempfile.mkdtemp(prefix="fineflow-redis-"))
        self.cluster = cluster
        self.node_timeout = node_timeout
        self.replica_of = replica_of
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        """The command line that starts the process."""
        args = [
            _binary("redis-server"),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "no",
            "--daemonize", "no",
            "--logfile", "redis.log",
        ]  # fmt: skip
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            args += ["--cluster-node-timeout", str(int(self.node_timeout * 1000))]
        if self.replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(self.replica_of)]
        return args

    def start(self, *, wait: float = 10.0) -> None:
        self._process = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + wait
        while not _ping("127.0.0.1", self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                log = self.directory / "redis.log"
                tail = log.read_text()[-2000:] if log.exists() else ""
                self.stop()
                raise RedisNotFoundError(f"redis-server did not start on {self.port}: {tail}")
            time.sleep(0.02)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=10)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass
class RedisServer:
    """A Redis server the tests may use.

    Attributes:
        url: its URL.
        source: ``"env"``, ``"local"`` or ``"throwaway"``: how it was found.
        process: the throwaway process when ``source == "throwaway"``.
    """

    url: str
    source: Literal["env", "local", "throwaway"]
    process: RedisProcess | None = None

    def close(self) -> None:
        if self.process is not None:
            self.process.close()


def throwaway_server() -> RedisServer:
    """A ``redis-server`` of its own (removed on ``close()`` and at exit)."""
    process = RedisProcess()
    atexit.register(process.close)
    process.start()
    return RedisServer(process.url, "throwaway", process)


@contextlib.contextmanager
def find_redis(*, throwaway: bool | None = None) -> Iterator[RedisServer]:
    """The Redis server for this run: ``FINEFLOW_TEST_REDIS_URL``, the local default,
    else a throwaway one (``throwaway=True`` skips the first two)."""
    server: RedisServer | None = None
    if not throwaway:
        env = os.environ.get(ENV_URL)
        if env:
            server = RedisServer(env, "env")
        elif _ping("127.0.0.1", 6379):
            server = RedisServer(LOCAL_URL, "local")
    if server is None:
        try:
            server = throwaway_server()
        except (RedisNotFoundError, OSError) as exc:
            raise RedisNotFoundError(
                f"no Redis server: {ENV_URL} is not set, nothing answers on 127.0.0.1:6379, "
                f"and a throwaway redis-server could not be started ({exc}); {_INSTALL}"
            ) from exc
    try:
        yield server
    finally:
        server.close()


@dataclass
class ThrowawayCluster:
    """A throwaway Redis Cluster of masters on 127.0.0.1 (no replicas)."""

    nodes: list[RedisProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        """A ``redis+cluster://`` URL of the first node (``storage_from_url`` form)."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def wait_ok(self, timeout: float = 20.0) -> None:
        """Wait until every node reports ``cluster_state:ok``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                states = [_cli(n.port, "cluster", "info") for n in self.nodes]
            except (subprocess.SubprocessError, OSError):
                states = []
            if states and all("cluster_state:ok" in s for s in states):
                return
            if time.monotonic() > deadline:
                raise RedisNotFoundError(f"the throwaway cluster did not become ok: {states}")
            time.sleep(0.05)

    def close(self) -> None:
        for node in self.nodes:
            node.close()


@contextlib.contextmanager
def throwaway_cluster(masters: int = 3, *, node_timeout: float = 2.0) -> Iterator[ThrowawayCluster]:
    """Start a Redis Cluster of ``masters`` masters; stop and delete it afterwards.
    ``node_timeout``: seconds before the others take a silent master for failed (and, with
    no replicas, the cluster for down)."""
    cluster = ThrowawayCluster()
    atexit.register(cluster.close)
    try:
        for _ in range(masters):
            node = RedisProcess(cluster=True, node_timeout=node_timeout)
            cluster.nodes.append(node)
            node.start()
        _cli(
            cluster.nodes[0].port,
            "--cluster", "create",
            *(f"127.0.0.1:{n.port}" for n in cluster.nodes),
            "--cluster-replicas", "0",
            "--cluster-yes",
            timeout=30,
        )  # fmt: skip
        cluster.wait_ok()
        yield cluster
    finally:
        cluster.close()


class SentinelProcess(RedisProcess):
    """A ``redis-server --sentinel`` process monitoring the master on ``master_port`` as
    ``service``: the master is taken for down after ``down_after`` seconds of silence, and
    ``failover_timeout`` bounds a failover."""

    def __init__(
        self,
        master_port: int,
        *,
        service: str = "fineflow",
        quorum: int = 1,
        down_after: float = 1.0,
        failover_timeout: float = 2.0,
    ) -> None:
        super().__init__()
        self.master_port = master_port
        self.service = service
        self.quorum = quorum
        self.down_after = down_after
        self.failover_timeout = failover_timeout

    def command(self) -> list[str]:
        conf = self.directory / "sentinel.conf"
        if not conf.exists():  # (a restarted sentinel keeps what it rewrote there)
            conf.write_text(
                f"port {self.port}\nbind 127.0.0.1\ndir {self.directory}\n"
                "logfile sentinel.log\nprotected-mode no\n"
                f"sentinel monitor {self.service} 127.0.0.1 {self.master_port} {self.quorum}\n"
                f"sentinel down-after-milliseconds {self.service} {int(self.down_after * 1000)}\n"
                f"sentinel failover-timeout {self.service} {int(self.failover_timeout * 1000)}\n"
                f"sentinel parallel-syncs {self.service} 1\n"
            )
        return [_binary("redis-server"), str(conf), "--sentinel"]


@dataclass
class ThrowawaySentinel:
    """A throwaway Redis Sentinel set on 127.0.0.1: a master, its replica, the sentinels."""

    master: RedisProcess
    replica: RedisProcess
    sentinels: list[SentinelProcess] = field(default_factory=list)
    service: str = "fineflow"

    @property
    def url(self) -> str:
        """The ``redis+sentinel://`` URL of the service (``storage_from_url`` form)."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}"

    def master_port(self) -> int | None:
        """The port of the master the sentinels name now (``None`` if none answers)."""
        for sentinel in self.sentinels:
            try:
                out = _cli(sentinel.port, "sentinel", "get-master-addr-by-name", self.service)
            except (subprocess.SubprocessError, OSError):
                continue
            lines = out.split()
            if len(lines) == 2 and lines[1].isdigit():
                return int(lines[1])
        return None

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until the replica is in sync and every sentinel knows it (a failover needs
        a replica to promote)."""
        replica = str(self.replica.port)

        def synced() -> bool:
            return "master_link_status:up" in _cli(self.replica.port, "info", "replication")

        def known() -> bool:
            return all(
                replica in _cli(s.port, "sentinel", "replicas", self.service)
                for s in self.sentinels
            )

        self._wait(synced, "the replica did not sync with the master", timeout)
        self._wait(known, "the sentinels did not discover the replica", timeout)

    def wait_failover(self, old_port: int, timeout: float = 30.0) -> int:
        """Wait until the sentinels name a master other than ``old_port`` and it takes
        writes; return its port."""

        def promoted() -> bool:
            port = self.master_port()
            return port not in (None, old_port) and "role:master" in _cli(
                port, "info", "replication"
            )

        self._wait(promoted, "the sentinels did not fail over", timeout)
        port = self.master_port()
        assert port is not None
        return port

    @staticmethod
    def _wait(ready: Callable[[], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if ready():
                    return
            except (subprocess.SubprocessError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RedisNotFoundError(f"{what} within {timeout}s")
            time.sleep(0.05)  # polling another process, not moving time

    def close(self) -> None:
        for process in (*self.sentinels, self.replica, self.master):
            process.close()


@contextlib.contextmanager
def throwaway_sentinel(
    sentinels: int = 1, *, down_after: float = 1.0, failover_timeout: float = 2.0
) -> Iterator[ThrowawaySentinel]:
    """Start a master, one replica of it and ``sentinels`` sentinels (quorum: a majority)
    watching it as service ``"fineflow"``; stop and delete them all afterwards. The short
    ``down_after`` and ``failover_timeout`` (seconds) make a failover take a few seconds."""
    master = RedisProcess()
    replica = RedisProcess(replica_of=master.port)
    group = ThrowawaySentinel(master, replica)
    atexit.register(group.close)
    try:
        master.start()
        replica.start()
        for _ in range(sentinels):
            sentinel = SentinelProcess(
                master.port,
                service=group.service,
                quorum=sentinels // 2 + 1,
                down_after=down_after,
                failover_timeout=failover_timeout,
            )
            group.sentinels.append(sentinel)
            sentinel.start()
        group.wait_ready()
        yield group
    finally:
        group.close()


_T = TypeVar("_T")
_shared: dict[Callable[[], contextlib.AbstractContextManager[Any]], Any] = {}


def _once(factory: Callable[[], contextlib.AbstractContextManager[_T]]) -> _T:
    """``factory()`` entered once per process and exited at exit."""
    if factory not in _shared:
        stack = contextlib.ExitStack()
        _shared[factory] = stack.enter_context(factory())
        atexit.register(stack.close)
    value: _T = _shared[factory]
    return value


def shared_redis() -> RedisServer:
    """The Redis server of this process (``find_redis()`` once; closed at exit): what test
    fixtures in several folders share."""
    return _once(find_redis)


def shared_cluster() -> ThrowawayCluster:
    """The throwaway three-master Redis Cluster of this process (started once, removed at
    exit)."""
    return _once(throwaway_cluster)


def unique_prefix(base: str = "fftest") -> str:
    """A key prefix of its own for one run on a shared server."""
    return f"{base}-{secrets.token_hex(6)}"


async def delete_prefix(url: str, prefix: str, *, cluster: bool = False) -> int:
    """Delete the keys under ``prefix`` (only those: a shared server keeps everything else)."""
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster as Cluster

    pattern = "".join("\\" + c if c in "*?[]\\" else c for c in prefix) + ":*"
    client: Redis | Cluster = Cluster.from_url(url) if cluster else Redis.from_url(url)
    removed = 0
    try:
        async for name in client.scan_iter(match=pattern, count=1000):
            removed += int(await client.delete(name))
    finally:
        await client.aclose()
    return removed
