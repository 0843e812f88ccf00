"""RedisStorage: rate-limit state in Redis or Valkey, on one server or a Redis Cluster.

The facade: options, the client's lifecycle and the public methods. Decisions are made by
one Lua script (``lua/decide.lua``) on the server's clock. While a batch is in flight,
decisions that arrive are coalesced (:mod:`fineflow._storage.coalescing`) and sent together,
one round trip per batch (:mod:`.sender`); a lone request goes out at once and never waits
for a timer. Status, reset and stats are the queries of :mod:`.admin`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ..._breaker.shared import BreakerStore
from ..._errors import ConfigurationError, StorageClosedError
from ..._logfields import log_extra
from ..._ratelimit.algorithms import ALGORITHMS, Decision
from ..._ratelimit.algorithms import validate_algorithm as _validate_algorithm
from ..base import Hit, KeyStatus, StatsPoint, StatsRow, StorageHealth, check_hits
from ..coalescing import Scheduler
from ..figures import StorageFigures
from ..flusher import FlushSnapshot
from ..rollups import check_interval, check_retention
from . import admin
from .admin import Client
from .breakers import RedisBreakerStore
from .errors import translated
from .health import check_health
from .scripts import BREAKER, DECIDE, Names
from .sender import ScriptSender
from .sentinel import SENTINEL_SCHEME, SentinelURL, close_sentinel, master_client
from .stats import RedisStats

__all__ = ["RedisStorage"]

logger = logging.getLogger("fineflow.storage")

_SCHEMES = ("redis", "rediss", "unix")
_CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
DEFAULT_URL = "redis://127.0.0.1:6379/0"


class RedisStorage:
    """Rate-limit state in Redis or Valkey (``redis.asyncio``), standalone or Cluster.

    The three algorithms run natively in one Lua script, on the server's clock, held to
    the reference functions. State expires by itself (PEXPIRE when it becomes equivalent to
    no state), so :meth:`cleanup` has nothing to do.

    On Redis Cluster, all quotas of one key share a slot (the key is the hash tag) and are
    decided all or nothing in one script. Quotas of *different* keys in one request (say a
    per-user rule and a global one) may live in different slots: they are charged slot by
    slot and the charged ones are refunded when another denies. That never admits more
    than the quotas allow; a charge that awaits its refund may make a concurrent request
    on the same key see less room for a moment.

    Args:
        url: ``redis://[user:pass@]host:port/db``, ``rediss://…`` (TLS), ``unix:///path``,
            ``redis+cluster://host:port`` (a Cluster; any node), or
            ``redis+sentinel://host:port[,host:port…]/service[/db]`` (the master of a
            Sentinel ``service``, found again after a failover). ``None`` takes
            ``FINEFLOW_REDIS_URL``, else ``redis://127.0.0.1:6379/0``.
        client: a ``redis.asyncio.Redis`` (Sentinel's ``master_for()`` gives one) or
            ``RedisCluster`` you own, opened and closed by you. A cluster client's retries
            should be off (``retry=Retry(NoBackoff(), 0)``), or a retried call may charge
            twice. Mutually exclusive with ``url``.
        cluster: ``True`` to use ``RedisCluster`` for ``url``.
        prefix: the prefix of every name this storage writes (default ``"fineflow"``);
            no braces.
        coalesce: batch decisions that arrive while others are in flight (default True).
        max_in_flight: batches in flight at once before arrivals wait (default 2).
        max_batch: the most requests in one batch (default 512).
        connect_timeout: seconds to wait for a new connection (default 5).
        socket_timeout: seconds to wait for any reply (default 5); the limiter's own time
            budget per decision is usually far shorter.
        max_connections: connections per server (default 32).
        stats_flush_every: seconds between writes of this instance's per-minute request
            counts (default 5; one pipeline each, in the background, never in a request's
            way; see :meth:`stats`). ``None`` turns the counting off.
        stats_retention: how long the per-minute counts are kept, in seconds or a
            ``timedelta`` (default 7 days): each minute's hash expires by itself.

    Raises:
        ConfigurationError: for a bad URL, prefix or option, or both ``url`` and ``client``.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: Client | None = None,
        cluster: bool = False,
        prefix: str = "fineflow",
        coalesce: bool = True,
        max_in_flight: int = 2,
        max_batch: int = 512,
        connect_timeout: float = 5.0,
        socket_timeout: float = 5.0,
        max_connections: int = 32,
        stats_flush_every: float | None = 5.0,
        stats_retention: float | timedelta = 7 * 86400.0,
    ) -> None:
        if url is not None and client is not None:
            raise ConfigurationError("give RedisStorage a url or a client, not both")
        if client is not None and not isinstance(client, aioredis.Redis | RedisCluster):
            raise ConfigurationError(
                "client must be a redis.asyncio.Redis or redis.asyncio.cluster.RedisCluster, "
                f"got {type(client).__name__}"
            )
        if client is None:
            if url is None:
                url = os.environ.get("FINEFLOW_REDIS_URL") or DEFAULT_URL
            url, cluster = _check_url(url, cluster)
        if not isinstance(prefix, str) or not prefix or "{" in prefix or "}" in prefix:
            raise ConfigurationError(
                f"prefix must be a non-empty string without braces, got {prefix!r}"
            )
        for name, value in (
            ("max_in_flight", max_in_flight),
            ("max_batch", max_batch),
            ("max_connections", max_connections),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{name} must be an int >= 1, got {value!r}")
        for name, seconds in (
            ("connect_timeout", connect_timeout),
            ("socket_timeout", socket_timeout),
        ):
            if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds > 0:
                raise ConfigurationError(f"{name} must be seconds > 0, got {seconds!r}")
        self.url = url
        self.cluster = cluster if client is None else isinstance(client, RedisCluster)
        self.prefix = prefix
        self.coalesce = coalesce
        self.max_in_flight = max_in_flight
        self.max_batch = max_batch
        self.connect_timeout = float(connect_timeout)
        self.socket_timeout = float(socket_timeout)
        self.max_connections = max_connections
        self.names = Names(prefix)
        self._client = client
        self._owns_client = client is None
        self._sentinel: Sentinel | None = None
        self._opened = False
        self._closed = False
        self._stats = RedisStats(
            lambda: self.client,
            prefix,
            retention=check_retention(stats_retention),
            flush_every=check_interval("stats_flush_every", stats_flush_every),
        )
        self._sender = ScriptSender(
            lambda: self.client,
            self.names,
            cluster=self.cluster,
            rollups=self._stats.rollups if self._stats.counting else None,
        )
        self._scheduler = Scheduler(
            self._sender, coalesce=coalesce, max_in_flight=max_in_flight, max_batch=max_batch
        )
        self._breakers = RedisBreakerStore(self.names, lambda: self.client, cluster=self.cluster)

    # -- counters --------------------------------------------------------------------------

    @property
    def batches(self) -> int:
        """Round trips that decided a batch (a lone request's too)."""
        return self._scheduler.batches

    @property
    def batched_requests(self) -> int:
        """The requests those round trips decided."""
        return self._scheduler.batched_requests

    @property
    def refunded(self) -> int:
        """Refund calls that succeeded (a Cluster request on several slots that was denied)."""
        return self._sender.refunded

    def figures(self) -> StorageFigures:
        """Errors, timeouts, round-trip times and batch sizes of the decisions so far, for
        the exporters (``fineflow.prometheus``, ``fineflow.opentelemetry``)."""
        return StorageFigures("redis", self._scheduler.figures())

    @property
    def stats_retention(self) -> float:
        """Seconds the per-minute request counts are kept."""
        return self._stats.retention

    def stats_flush_snapshot(self) -> FlushSnapshot:
        """The counters of the per-minute stats' writes: flushes, failures (their counts
        kept for the next write), cells pending, requests dropped."""
        return self._stats.snapshot()

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> RedisStorage:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Create the client (it connects on first use: a server that is down does not stop
        your app from starting). Idempotent."""
        if self._closed:
            raise StorageClosedError("this RedisStorage was closed; create a new one")
        if self._opened:
            return
        if self._client is None:
            assert self.url is not None
            options: dict[str, Any] = {
                "socket_connect_timeout": self.connect_timeout,
                "socket_timeout": self.socket_timeout,
                # No retries: a retried script call may already have been applied (charged).
                "retry": Retry(NoBackoff(), 0),
                "max_connections": self.max_connections,
            }
            if self.cluster:
                self._client = RedisCluster.from_url(self.url, **options)
            elif urlsplit(self.url).scheme.lower() == SENTINEL_SCHEME:
                self._client, self._sentinel = master_client(SentinelURL.parse(self.url), options)
            else:
                self._client = aioredis.Redis.from_url(self.url, **options)
        self._opened = True
        self._stats.start()
        self._breakers.start()

    async def close(self) -> None:
        """Finish the calls in flight, close the client if this storage owns it; the storage
        refuses use afterwards."""
        was_open = self._opened and not self._closed
        self._closed = True
        await self._breakers.stop()
        await self._scheduler.close(self.socket_timeout)
        if was_open:
            self._closed = False  # (the last write uses the client)
            try:
                await self._stats.stop()
            finally:
                self._closed = True
        if self._client is not None and self._owns_client:
            with contextlib.suppress(RedisError, OSError):
                await self._client.aclose()
        if self._sentinel is not None:
            await close_sentinel(self._sentinel)

    async def health(self, *, timeout: float = 1.0) -> StorageHealth:  # noqa: ASYNC109
        """Whether the storage works now: an answer to ``PING`` within ``timeout`` seconds.

        Never raises: a storage that is down, slow, not open or closed is reported
        unhealthy, with the reason. What :func:`fineflow.health_app` asks.
        """
        open_client = self._client if self._opened and not self._closed else None
        return await check_health(open_client, timeout)

    @property
    def client(self) -> Client:
        """The Redis client (after ``open()``)."""
        if self._client is None or not self._opened or self._closed:
            raise StorageClosedError(
                "RedisStorage is not open: use `async with storage:` or `await storage.open()`"
            )
        return self._client

    def breaker_store(self) -> BreakerStore:
        """Where ``CircuitBreaker(shared=storage)`` keeps its shared state: a hash per
        breaker name under this storage's prefix, stepped by one Lua script on the server's
        clock, with one pub/sub subscription (sharded on a Cluster) that hears changes while
        the storage is open and breakers use it."""
        return self._breakers

    async def migrate(self) -> None:
        """Load the scripts on every server (they are loaded on demand anyway: nothing else
        to create).

        Raises:
            StorageError: the server could not be reached or refused.
        """
        with translated("loading the scripts"):
            for script in (DECIDE, BREAKER):
                await self.client.script_load(script.text)

    # -- decisions -------------------------------------------------------------------------

    async def decide(
        self,
        algorithm: str,
        hits: Sequence[Hit],
        *,
        now: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the limiter's budget, see below
    ) -> list[Decision]:
        """Decide ``hits`` for one request, all or nothing (see :class:`fineflow.Storage`).

        ``timeout``: seconds to wait for the answer, then raise :class:`StorageError` (a
        ``TimeoutError`` too). A request still waiting for its pipeline is dropped
        uncharged; one already sent is charged, like a caller cancelled at that point.
        """
        if algorithm not in ALGORITHMS:
            _validate_algorithm(algorithm)
        check_hits(hits)
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, int | float):
                raise ValueError(f"timeout must be seconds > 0 or None, got {timeout!r}")
            if not timeout > 0:
                raise ValueError(f"timeout must be seconds > 0 or None, got {timeout!r}")
        if not hits:
            return []
        if self._closed or not self._opened:
            raise StorageClosedError(
                "RedisStorage is not open: use `async with storage:` or `await storage.open()`"
            )
        # A caller's time budget ends only this wait: its pipeline runs on in a task the
        # scheduler owns.
        request = self._scheduler.submit(algorithm, hits, now, timeout)
        await request.future
        return request.result

    # -- administration --------------------------------------------------------------------

    async def status(self, key: str, *, now: int | None = None) -> list[KeyStatus]:
        """The live state of every (endpoint, quota) of ``key``, decided as a peek."""
        return await admin.status(self.client, self.names, key, now)

    async def reset(self, key: str, *, endpoint: str | None = None) -> int:
        """Forget ``key``'s state (of one endpoint, or all); return how many were removed."""
        return await admin.reset(self.client, self.names, key, endpoint)

    async def cleanup(self, *, batch_size: int = 1000, now: int | None = None) -> int:
        """Nothing to do: Redis expires state by itself (each key's hash has a PEXPIRE at the
        moment its last state becomes equivalent to no state). Returns 0."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        logger.debug(
            "RedisStorage.cleanup(): nothing to do, Redis expires state by itself",
            extra=log_extra("storage_cleanup_skipped", storage="RedisStorage"),
        )
        return 0

    async def stats(
        self,
        *,
        since: float | timedelta | None = None,
        by: Sequence[str] = ("endpoint", "tier"),
        now: int | None = None,
    ) -> list[StatsRow]:
        """Allowed and denied requests by endpoint and tier (or the groups ``by``), from the
        per-minute counters every instance writes (this one's pending counts first): one
        sorted set of minutes and one hash per minute, never a scan of the keys. ``keys``
        is 0: counting the keys with state would take one.

        Args:
            since: how far back, in seconds or a ``timedelta`` (``None``: every minute
                kept); the minute it falls in counts whole.
            by: the groups: ``"endpoint"``, ``"tier"``, both (the default) or neither.
            now: nanoseconds since the epoch to count back from (``None``: the server's
                clock).

        Raises:
            ValueError: a bad ``since`` or ``by``.
            StorageError: the server failed.
        """
        return await self._stats.stats(since, by, now)

    async def stats_series(
        self,
        *,
        since: float | timedelta | None = None,
        by: Sequence[str] = ("endpoint", "tier"),
        now: int | None = None,
    ) -> list[StatsPoint]:
        """Allowed and denied requests per minute and group (arguments as :meth:`stats`),
        by minute, then group; minutes with no request are absent.

        Raises:
            ValueError: a bad ``since`` or ``by``.
            StorageError: the server failed.
        """
        return await self._stats.series(since, by, now)


def _check_url(url: str, cluster: bool) -> tuple[str, bool]:
    if not isinstance(url, str):
        raise ConfigurationError(f"url must be a string, got {type(url).__name__}")
    scheme = urlsplit(url).scheme.lower()
    if scheme == SENTINEL_SCHEME:
        if cluster:
            raise ConfigurationError("a Sentinel URL names one master: drop cluster=True")
        SentinelURL.parse(url)  # (a bad URL fails here, not on open())
        return url, False
    if scheme in _CLUSTER_SCHEMES:
        return url.split("+cluster", 1)[0] + url.split("+cluster", 1)[1], True
    if scheme not in _SCHEMES:
        raise ConfigurationError(
            f"invalid Redis URL {url[:80]!r}: the scheme must be redis://, rediss://, unix://, "
            'redis+cluster:// or redis+sentinel://; e.g. "redis://localhost:6379/0"'
        )
    if cluster and scheme == "unix":
        raise ConfigurationError("a Redis Cluster is reached over TCP: use redis://host:port")
    return url, cluster
