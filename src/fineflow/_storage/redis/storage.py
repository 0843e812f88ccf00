"""RedisStorage: rate-limit state in Redis or Valkey, on one server or a Redis Cluster.

Decisions are made by one Lua script (``lua/decide.lua``) on the server's clock, by
EVALSHA (the script is loaded again when the server answers NOSCRIPT, say after a restart
or SCRIPT FLUSH). While a batch is in flight, decisions that arrive are coalesced and sent
together: one round trip per batch (on one server, one script call per ``_PER_CALL``
requests; on a Cluster, one call per request and slot, each node's calls in one write).
A lone request goes out at once and never waits for a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
from collections.abc import Sequence
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import AskError, MovedError, NoScriptError, RedisError

from ..._errors import ConfigurationError, StorageClosedError
from ..._ratelimit.algorithms import ALGORITHMS, Decision
from ..._ratelimit.algorithms import validate_algorithm as _validate_algorithm
from ..base import Hit, KeyStatus, StatsRow, check_hits
from . import admin
from .admin import Client
from .batch import Call, Request, answer, pack, plan, refunds
from .errors import DecisionTimeout, storage_error, translated
from .scripts import DECIDE, Names
from .wire import evalsha_all, evalsha_on_nodes

__all__ = ["RedisStorage"]

logger = logging.getLogger("fineflow.storage")

_SCHEMES = ("redis", "rediss", "unix")
_CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
DEFAULT_URL = "redis://127.0.0.1:6379/0"
# Requests decided by one script call on a standalone server: the server runs nothing else
# meanwhile, so a call stays short (a few hundred microseconds); a batch is several calls.
_PER_CALL = 32


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
        url: ``redis://[user:pass@]host:port/db``, ``rediss://…`` (TLS), ``unix:///path``, or
            ``redis+cluster://host:port`` (a Cluster; any node). ``None`` takes
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

    Raises:
        ConfigurationError: for a bad URL, prefix or option, or both ``url`` and ``client``.
    """

    local = False

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
        self.max_in_flight = max_in_flight if coalesce else 1 << 30
        self.max_batch = max_batch if coalesce else 1
        self.connect_timeout = float(connect_timeout)
        self.socket_timeout = float(socket_timeout)
        self.max_connections = max_connections
        self.names = Names(prefix)
        self._client = client
        self._owns_client = client is None
        self._opened = False
        self._closed = False
        self._pending: list[Request] = []
        self._starting = 0  # tasks started that have not taken their batch yet
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._slot_of = _slot if self.cluster else None
        self.batches = 0
        self.batched_requests = 0
        self.refunded = 0

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
            else:
                self._client = aioredis.Redis.from_url(self.url, **options)
        self._opened = True

    async def close(self) -> None:
        """Finish the calls in flight, close the client if this storage owns it; the storage
        refuses use afterwards."""
        self._closed = True
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.socket_timeout)
            for task in self._tasks:
                task.cancel()
        for request in self._pending:
            if not request.future.done():
                request.future.set_exception(StorageClosedError("RedisStorage was closed"))
        self._pending = []
        if self._client is not None and self._owns_client:
            with contextlib.suppress(RedisError, OSError):
                await self._client.aclose()

    @property
    def client(self) -> Client:
        """The Redis client (after ``open()``)."""
        if self._client is None or not self._opened or self._closed:
            raise StorageClosedError(
                "RedisStorage is not open: use `async with storage:` or `await storage.open()`"
            )
        return self._client

    async def migrate(self) -> None:
        """Load the script on every server (it is loaded on demand anyway: nothing else
        to create).

        Raises:
            StorageError: the server could not be reached or refused.
        """
        with translated("loading the decision script"):
            await self.client.script_load(DECIDE.text)

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
        loop = asyncio.get_running_loop()
        request = Request(hits, now, algorithm, loop.create_future())
        self._pending.append(request)
        self._dispatch()
        if timeout is not None and timeout != math.inf:
            request.timer = loop.call_later(timeout, _expire, request.future)
        try:
            await request.future
        finally:
            if request.timer is not None:
                request.timer.cancel()
        return request.result

    _bounded_decide = decide  # decide() enforces ``timeout`` itself (see RateLimiter)

    def _dispatch(self) -> None:
        """Start a task while fewer than ``max_in_flight`` run. It takes its batch when it
        first runs, so callers arriving in the same loop iteration share one pipeline."""
        waiting = min(len(self._pending), 1) if self.coalesce else len(self._pending)
        while self._starting < waiting and self._in_flight < self.max_in_flight:
            self._starting += 1
            self._in_flight += 1
            started: list[bool] = []
            task = asyncio.get_running_loop().create_task(self._run(started))
            self._tasks.add(task)
            task.add_done_callback(partial(self._finished, started))

    def _finished(self, started: list[bool], task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not started:
            # Cancelled before its first step: _run never settled its counters.
            self._starting -= 1
            self._in_flight -= 1
            if not self._closed:
                self._dispatch()

    def _take(self) -> list[Request]:
        pending = [r for r in self._pending if not r.future.done()]
        batch, self._pending = pending[: self.max_batch], pending[self.max_batch :]
        return batch

    async def _run(self, started: list[bool]) -> None:
        started.append(True)
        self._starting -= 1
        batch = self._take()
        self._dispatch()  # what did not fit goes out at once in another pipeline
        try:
            if batch:
                await self._settle(batch)
        except BaseException as exc:
            error = storage_error("rate-limit decision", exc)
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(error)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._in_flight -= 1
            if self._pending and not self._closed:
                self._dispatch()

    async def _settle(self, batch: list[Request]) -> None:
        """Decide ``batch`` in one pipeline (plus one for refunds, if any) and wake its
        callers."""
        # Requests whose callers gave up (their budget ran out) are dropped unsent: an
        # answer already given by on_storage_error is never charged.
        live = [r for r in batch if not r.future.done()]
        if not live:
            return
        per_request = [plan(r, self.names, self._slot_of) for r in live]
        await self._execute([c for calls in per_request for c in calls])
        self.batches += 1
        self.batched_requests += len(live)
        charged: list[Call] = []
        for calls in per_request:
            charged += answer(calls)
        if charged:
            await self._refund(charged)
        for request in live:
            if not request.future.done():
                request.future.set_result(None)

    async def _execute(self, calls: list[Call], *, reload: bool = True) -> None:
        """Run ``calls`` (one EVALSHA each, one round trip) and set each ``reply``: the
        script's reply or the error for that call. On one server a lost connection raises
        (the batch fails); on a cluster a node that fails fails its own calls. Calls a
        server answers NOSCRIPT (not run) go again once the script is loaded."""
        client = self.client
        replies: list[object]
        if isinstance(client, RedisCluster):
            replies = await self._on_cluster(client, calls)
        else:
            # One script call per _PER_CALL requests, all in one write.
            sha = DECIDE.sha.encode()
            chunks = [calls[i : i + _PER_CALL] for i in range(0, len(calls), _PER_CALL)]
            replies = []
            for chunk, reply in zip(
                chunks,
                await evalsha_all(client.connection_pool, [pack(c, sha) for c in chunks]),
                strict=True,
            ):
                lines = reply.split(b"\n") if isinstance(reply, bytes) else [reply] * len(chunk)
                if len(lines) != len(chunk):
                    raise storage_error("rate-limit decision", ValueError(f"reply {reply!r:.200}"))
                replies += lines
        missing = [c for c, r in zip(calls, replies, strict=True) if isinstance(r, NoScriptError)]
        for call, reply in zip(calls, replies, strict=True):
            if isinstance(reply, BaseException):
                call.reply = storage_error("rate-limit decision", reply)
            else:
                call.reply = reply
        if missing and reload:
            # Not run (the server had no script): load it and send those calls again.
            await self._load()
            await self._execute(missing, reload=False)

    async def _on_cluster(self, client: RedisCluster, calls: list[Call]) -> list[object]:
        """The replies of ``calls`` on a cluster: each to its slot's node (see wire.py)."""
        sha = DECIDE.sha.encode()
        replies = await evalsha_on_nodes(client, [(c.keys[0], pack([c], sha)) for c in calls])
        redirected = [i for i, r in enumerate(replies) if isinstance(r, MovedError | AskError)]
        if redirected:
            # Not run (the slot moved, or is moving): redis-py's cluster pipeline follows
            # the redirection and updates the client's map of slots.
            pipe = client.pipeline(transaction=False)
            for i in redirected:
                call = calls[i]
                pipe.evalsha(DECIDE.sha, len(call.keys), *call.keys, *call.args)
            for i, reply in zip(redirected, await pipe.execute(raise_on_error=False), strict=True):
                replies[i] = reply
        return replies

    async def _load(self) -> None:
        logger.info("loading the rate-limit script into Redis (NOSCRIPT)")
        client = self.client
        if isinstance(client, RedisCluster):
            # Master by master: one that is down must not keep the others from the script
            # (it gets it when it is back and answers NOSCRIPT).
            await asyncio.gather(
                *(
                    client.execute_command("SCRIPT LOAD", DECIDE.text, target_nodes=node)
                    for node in client.get_primaries()
                ),
                return_exceptions=True,
            )
        else:
            await client.script_load(DECIDE.text)

    async def _refund(self, charged: list[Call]) -> None:
        """Give back what ``charged`` calls took (a request on several cluster slots that
        was denied, or failed, elsewhere). A refund that fails is logged: the cost stays
        charged until the state expires, which never admits more than the quotas allow."""
        try:
            pipe = self.client.pipeline(transaction=False)
            for keys, args in refunds(charged):
                pipe.evalsha(DECIDE.sha, len(keys), *keys, *args)
            replies = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            replies = [exc]
        failures = [r for r in replies if isinstance(r, BaseException)]
        self.refunded += len(replies) - len(failures)
        if failures:
            logger.warning("refund of a denied multi-slot request failed: %r", failures[0])

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
        logger.debug("RedisStorage.cleanup(): nothing to do, Redis expires state by itself")
        return 0

    async def stats(self) -> list[StatsRow]:
        """Allowed and denied counts grouped by endpoint and tier, over live state.

        Sums the per-state counters of every key's hash (SCAN on each server, then one
        pipeline per page): proportional to the number of live keys, an administrative
        query rather than one for every request.
        """
        return await admin.stats(self.client, self.names)


def _slot(name: str) -> int:
    return key_slot(name.encode("utf-8", "surrogatepass"))


def _expire(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(DecisionTimeout("the rate-limit decision ran out of its time budget"))


def _check_url(url: str, cluster: bool) -> tuple[str, bool]:
    if not isinstance(url, str):
        raise ConfigurationError(f"url must be a string, got {type(url).__name__}")
    scheme = urlsplit(url).scheme.lower()
    if scheme in _CLUSTER_SCHEMES:
        return url.split("+cluster", 1)[0] + url.split("+cluster", 1)[1], True
    if scheme not in _SCHEMES:
        raise ConfigurationError(
            f"invalid Redis URL {url[:80]!r}: the scheme must be redis://, rediss://, unix:// "
            'or redis+cluster://; e.g. "redis://localhost:6379/0"'
        )
    if cluster and scheme == "unix":
        raise ConfigurationError("a Redis Cluster is reached over TCP: use redis://host:port")
    return url, cluster
