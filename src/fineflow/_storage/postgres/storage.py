"""PostgresStorage: rate-limit state shared by every instance of a service.

The facade: options, the pool's lifecycle and the public methods. Decisions go through the
coalescing :mod:`.scheduler` and the statements of :mod:`.statements`; the schema is made by
:mod:`.migrations` from the ``sql/`` files; status, reset, cleanup and stats are the
queries of :mod:`.admin`, and :mod:`.cleaner` runs cleanup in the background; :mod:`.stats`
counts requests per minute and writes them to the rollups.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Sequence
from datetime import timedelta
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from ..._breaker.shared import BreakerStore
from ..._errors import StorageClosedError, StorageError
from ..._ratelimit.algorithms import ALGORITHMS, BucketState, Decision, validate_algorithm
from ..base import Hit, KeyStatus, StatsPoint, StatsRow, StorageHealth, check_hits, storage_key
from ..figures import StorageFigures
from ..flusher import FlushSnapshot
from ..rollups import check_retention
from . import migrations
from .admin import Admin
from .breakers import PostgresBreakerStore
from .cleaner import Cleaner
from .connect import check_reachable, libpq_seconds, why_unreachable
from .errors import driver_errors, storage_error
from .health import check_health
from .migrations import MigrationResult
from .options import (
    check_identifier,
    check_interval,
    check_sizes,
    check_source,
    check_timeout,
)
from .scheduler import statement_scheduler
from .statements import FAST_PATHS, Decider
from .stats import StatsKeeper

__all__ = ["PostgresStorage"]

# Rows per batch of a background cleanup round (as cleanup()'s default).
_CLEANUP_BATCH = 1000
_WEEK = 7 * 86400.0


class PostgresStorage:
    """Rate-limit state in PostgreSQL (psycopg 3 + ``AsyncConnectionPool``).

    Each decision is one statement and one round trip, on the database clock. While a
    statement is in flight, decisions that arrive are coalesced and sent together as one
    statement (a batch), so throughput grows with concurrency instead of the database
    becoming the bottleneck; a lone request goes out at once and never waits for a timer.

    Args:
        dsn: a libpq connection string or URL; ``None`` takes ``FINEFLOW_DSN``, else
            libpq's own ``PG*`` environment and defaults.
        pool: a pool you own (opened and closed by you; connections must be autocommit).
            Mutually exclusive with ``dsn``.
        schema: the schema holding fineflow's objects (default ``"fineflow"``); must be a
            plain identifier.
        unlogged: create the table ``UNLOGGED`` (about twice the write speed; its state is
            lost on a crash and not replicated).
        synchronous_commit: ``False`` runs decisions with ``synchronous_commit = off``: a crash
            may forget the last fraction of a second of counting, never corrupts.
        min_size: connections the pool keeps open when the storage owns it (default 1:
            it hands out idle connections in turn, and a lone request on one of two
            alternating connections is measurably slower than on the same one each time).
        max_size: the most connections of that pool (default 10; thanks to coalescing,
            decisions need only ``max_in_flight`` of them). It grows under load and
            shrinks back after ten idle minutes.
        coalesce: batch decisions that arrive while others are in flight (default True).
        max_in_flight: statements in flight at once before arrivals are batched (default 2;
            four or more waiting requests with nothing in flight are split between two
            statements, so the database runs one while this process handles the other's
            results).
        max_batch: the most requests in one batch (default 512).
        connect_timeout: seconds to wait for a new connection (default 5).
        statement_timeout: server-side cap in seconds on any statement (default 5).
        fast_paths: the specialised statements decisions may use, each a faster form of the
            general ``decide()`` for its case: ``"hit"`` (a lone single-quota GCRA request),
            ``"hit_keys"`` (a batch sharing one quota) and ``"hit_many"`` (other
            single-quota GCRA batches); default all three. Leaving some out changes no
            decision, only speed: for comparing them, or to rule one out.
        cleanup_every: seconds between background cleanups while the storage is open, for
            databases without pg_cron (default ``None``: no background cleanup; call
            :meth:`cleanup`, run ``fineflow cleanup`` or schedule it with pg_cron). Of
            all the instances on one schema, one at a time does the work (an advisory
            lock); failures are logged once per burst and never raised. Needs a role that
            may run ``cleanup()`` (the schema's owner, not a runtime role).
        stats_flush_every: seconds between writes of this instance's per-minute request
            counts to the ``rollups`` table (default 5; one statement each, in the
            background, never in a request's way). ``None`` turns the counting off.
        stats_retention: how long the per-minute counts are kept, in seconds or a
            ``timedelta`` (default 7 days): :meth:`cleanup` deletes older minutes;
            ``None`` keeps them all.

    Raises:
        ConfigurationError: for a bad schema name or option, or both ``dsn`` and ``pool``.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        pool: AsyncConnectionPool[Any] | None = None,
        schema: str = "fineflow",
        unlogged: bool = False,
        synchronous_commit: bool = True,
        min_size: int | None = None,
        max_size: int = 10,
        coalesce: bool = True,
        max_in_flight: int = 2,
        max_batch: int = 512,
        connect_timeout: float = 5.0,
        statement_timeout: float = 5.0,
        fast_paths: Collection[str] = FAST_PATHS,
        cleanup_every: float | None = None,
        stats_flush_every: float | None = 5.0,
        stats_retention: float | timedelta | None = _WEEK,
    ) -> None:
        dsn = check_source(dsn, pool)
        check_identifier("schema", schema)
        min_size = 1 if min_size is None else min_size
        check_sizes(min_size=min_size, max_size=max_size)
        check_sizes(max_in_flight=max_in_flight, max_batch=max_batch)
        cleanup_every = check_interval("cleanup_every", cleanup_every)
        flush_every = check_interval("stats_flush_every", stats_flush_every)
        retention = None if stats_retention is None else check_retention(stats_retention)
        self.dsn = dsn
        self.schema = schema
        self.unlogged = unlogged
        self.synchronous_commit = synchronous_commit
        self.connect_timeout = connect_timeout
        self.statement_timeout = statement_timeout
        self._pool = pool
        self._owns_pool = pool is None
        self._sizes = (min_size, max_size)
        self._opened = False
        self._closed = False
        self._closing = False  # a close() has begun: later calls have nothing to do
        self._decider = Decider(schema, fast_paths)
        self._admin = Admin(schema)
        self._stats = StatsKeeper(
            self._admin,
            lambda: self.pool,
            retention=retention,
            flush_every=flush_every,
            name=schema,
        )
        self._scheduler = statement_scheduler(
            lambda: self.pool.connection(),
            self._stats.counted(self._decider.run),
            coalesce=coalesce,
            max_in_flight=max_in_flight,
            max_batch=max_batch,
        )
        self._breakers = PostgresBreakerStore(schema, lambda: self.pool)
        self._cleaner = (
            None if cleanup_every is None else Cleaner(self._cleanup_round, cleanup_every, schema)
        )

    # -- options and counters --------------------------------------------------------------

    @property
    def coalesce(self) -> bool:
        """Whether decisions that arrive while others are in flight are batched."""
        return self._scheduler.coalesce

    @property
    def max_in_flight(self) -> int:
        """Statements in flight at once before arrivals are batched."""
        return self._scheduler.max_in_flight

    @max_in_flight.setter
    def max_in_flight(self, value: int) -> None:
        check_sizes(max_in_flight=value)
        self._scheduler.max_in_flight = value

    @property
    def max_batch(self) -> int:
        """The most requests in one batch."""
        return self._scheduler.max_batch

    @property
    def fast_paths(self) -> frozenset[str]:
        """The specialised statements decisions may use (see the class docstring)."""
        return self._decider.fast_paths

    @property
    def batches(self) -> int:
        """Statements sent that decided a batch (every one but a lone ``hit()``)."""
        return self._scheduler.batches

    @property
    def batched_requests(self) -> int:
        """The requests those statements decided."""
        return self._scheduler.batched_requests

    def pool_stats(self) -> dict[str, int]:
        """The connection pool's own figures (psycopg_pool's ``get_stats()``: ``pool_size``,
        ``pool_available``, ``requests_waiting``, ``requests_num``, ...; counters it has not
        incremented yet are absent); empty while the storage is not open."""
        if self._pool is None or not self._opened or self._closed:
            return {}
        return self._pool.get_stats()

    def figures(self) -> StorageFigures:
        """Errors, timeouts, round-trip times and batch sizes of the decisions so far, and
        the pool's figures, for the exporters (``fineflow.prometheus``,
        ``fineflow.opentelemetry``)."""
        name = "" if self._pool is None else self._pool.name
        return StorageFigures("postgres", self._scheduler.figures(), self.pool_stats(), name)

    @property
    def stats_retention(self) -> float | None:
        """Seconds the per-minute request counts are kept (cleanup deletes older ones);
        ``None``: kept until a cleanup with a retention deletes them."""
        return self._stats.retention

    def stats_flush_snapshot(self) -> FlushSnapshot:
        """The counters of the per-minute stats' writes: flushes, failures (their counts
        kept for the next write), cells pending, requests dropped."""
        return self._stats.snapshot()

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> PostgresStorage:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self, *, wait: bool = False) -> None:
        """Open the pool; idempotent. Start the background cleanup if ``cleanup_every``.

        By default connections are made in the background: a database that is down does not
        stop your app from starting. With ``wait=True`` (what the ``fineflow`` command
        uses) it connects once directly first, and an unreachable or refusing server fails
        at once with its own reason, then waits for the pool's first connections.

        Raises:
            StorageClosedError: the storage was closed.
            StorageError: with ``wait=True``, the server could not be reached or refused.
        """
        if self._closed:
            raise StorageClosedError("this PostgresStorage was closed; create a new one")
        if self._opened:
            return
        if self._pool is None:
            if wait:
                await check_reachable(self.dsn or "", self.connect_timeout)
            self._pool = self._new_pool()
            try:
                await self._pool.open(wait=wait, timeout=self.connect_timeout)
            except PoolTimeout as exc:
                self._pool = None
                raise StorageError(f"opening the pool failed: {await self._why(exc)}") from exc
        elif wait:
            with driver_errors("taking a connection from the pool you gave"):
                async with self._pool.connection(timeout=self.connect_timeout):
                    pass
        self._opened = True
        if self._cleaner is not None:
            self._cleaner.start()
        self._stats.start()
        self._breakers.start()

    def _new_pool(self) -> AsyncConnectionPool[Any]:
        options = f"-c statement_timeout={int(self.statement_timeout * 1000)}"
        if not self.synchronous_commit:
            options += " -c synchronous_commit=off"
        return AsyncConnectionPool(
            self.dsn or "",
            min_size=self._sizes[0],
            max_size=self._sizes[1],
            kwargs={
                "autocommit": True,
                "options": options,
                "connect_timeout": libpq_seconds(self.connect_timeout),
            },
            timeout=self.connect_timeout,
            open=False,
            name=f"fineflow-{self.schema}",
        )

    async def close(self) -> None:
        """Stop the background cleanup, finish statements in flight, write the last request
        counts, close the pool if this storage owns it; the storage refuses use afterwards.
        Idempotent: a second call (even while the first is still closing) does nothing."""
        if self._closing:
            return
        self._closing = True
        was_open = self._opened and not self._closed
        self._closed = True
        await self._breakers.stop()
        if self._cleaner is not None:
            await self._cleaner.stop()
        await self._scheduler.close(self.statement_timeout)
        if was_open:
            self._closed = False  # (the last write takes a connection of the pool)
            try:
                await self._stats.stop()
            finally:
                self._closed = True
        if self._pool is not None and self._owns_pool:
            await self._pool.close()

    async def health(self, *, timeout: float = 1.0) -> StorageHealth:  # noqa: ASYNC109
        """Whether the storage works now: a pooled connection that finds the schema
        migrated within ``timeout`` seconds (default 1).

        Never raises: a storage that is down, slow, not open or closed is reported
        unhealthy, with the reason. What :func:`fineflow.health_app` asks.
        """
        open_pool = self._pool if self._opened and not self._closing else None
        return await check_health(open_pool, self.schema, timeout)

    @property
    def pool(self) -> AsyncConnectionPool[Any]:
        """The connection pool (after ``open()``)."""
        if self._pool is None or not self._opened or self._closed:
            raise StorageClosedError(
                "PostgresStorage is not open: use `async with storage:` or `await storage.open()`"
            )
        return self._pool

    def breaker_store(self) -> BreakerStore:
        """Where ``CircuitBreaker(shared=storage)`` keeps its shared state: the
        ``breakers`` table of the schema, with one connection that LISTENs for changes
        while the storage is open and breakers use it."""
        return self._breakers

    # -- schema ----------------------------------------------------------------------------

    async def migrate(self) -> None:
        """Create or upgrade the schema; idempotent and safe when instances run it at once.
        (:meth:`apply_migrations` does the same and says what it did.)

        Raises:
            SchemaVersionError: the database holds a newer schema than this code knows.
            StorageError: the database could not be reached or refused.
        """
        await self.apply_migrations()

    async def apply_migrations(self) -> MigrationResult:
        """:meth:`migrate`, returning what it did: the schema's version before and after
        (``before`` 0: it was created; both equal: it was up to date).

        Raises:
            SchemaVersionError: the database holds a newer schema than this code knows.
            StorageError: the database could not be reached or refused.
        """
        action = f"migration of schema {self.schema!r}"
        try:
            async with self.pool.connection() as conn:
                return await migrations.migrate(conn, self.schema, unlogged=self.unlogged)
        except PoolTimeout as exc:
            raise StorageError(f"{action} failed: {await self._why(exc)}") from exc
        except psycopg.Error as exc:
            raise storage_error(action, exc) from exc

    async def _why(self, exc: PoolTimeout) -> str:
        """The pool only says it timed out; one direct attempt says where and why."""
        return await why_unreachable(self.dsn, self.connect_timeout, exc)

    async def grant_runtime(self, role: str, *, create: bool = False) -> None:
        """Let ``role`` decide, peek and read status through fineflow's functions only.

        The role gets ``USAGE`` on the schema and ``EXECUTE`` on the decision functions;
        it has no access to the table, so it cannot read or change rows directly. Run as
        the schema's owner (an admin role). With ``create=True`` the role is created (as
        ``LOGIN``, no password: set one, or use your own authentication) if missing.

        Raises:
            ConfigurationError: if ``role`` is not a plain identifier.
            StorageError: if the database refuses (e.g. not privileged), or the schema
                was not migrated yet.
        """
        check_identifier("role", role)
        with driver_errors(f"granting runtime access to {role!r} (after migrate()?)"):
            async with self.pool.connection() as conn:
                await migrations.grant_runtime(conn, self.schema, role, create=create)

    # -- decisions -------------------------------------------------------------------------

    async def decide(
        self,
        algorithm: str,
        hits: Sequence[Hit],
        *,
        now: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - cheaper than a cancel scope, see below
    ) -> list[Decision]:
        """Decide ``hits`` for one request, all or nothing, in one statement (see
        :class:`fineflow.Storage`).

        ``timeout``: seconds to wait for the answer, then raise ``TimeoutError``. A request
        still waiting for its statement is dropped uncharged; one already on the server is
        charged, like a caller cancelled at that point. (What :class:`RateLimiter` uses
        for its time budget: cheaper than a cancel scope around the call.)
        """
        if algorithm not in ALGORITHMS:
            validate_algorithm(algorithm)
        check_hits(hits)
        if timeout is not None:
            # Checked before the request is queued: a bad timeout found later would raise
            # after the request was sent, and charged.
            timeout = check_timeout(timeout)
        if len(hits) == 1:
            if hits[0].cost == 0:
                return await self._peek_within(algorithm, hits, now, timeout)
        elif not hits:
            return []
        elif all(h.cost == 0 for h in hits):
            return await self._peek_within(algorithm, hits, now, timeout)
        if self._closed or not self._opened:
            raise StorageClosedError(
                "PostgresStorage is not open: use `async with storage:` or `await storage.open()`"
            )
        # A caller's time budget ends only this wait: the statement runs on in a task the
        # scheduler owns, so a timeout never breaks a connection mid-query.
        request = self._scheduler.submit(algorithm, hits, now, timeout)
        await request.future
        return request.result

    async def _peek_within(
        self,
        algorithm: str,
        hits: Sequence[Hit],
        now: int | None,
        timeout: float | None,  # noqa: ASYNC109 - decide()'s own
    ) -> list[Decision]:
        if timeout is None:
            return await self._peek(algorithm, hits, now)
        async with asyncio.timeout(timeout):  # (a peek charges nothing: no answer to lose)
            return await self._peek(algorithm, hits, now)

    async def _peek(self, algorithm: str, hits: Sequence[Hit], now: int | None) -> list[Decision]:
        params = {
            "key": [storage_key(h.key) for h in hits],
            "endpoint": [storage_key(h.endpoint) for h in hits],
            "policy": [h.quota.policy for h in hits],
        }
        with driver_errors("rate-limit peek"):
            async with self.pool.connection() as conn:
                cur = await conn.execute(self._decider.statements.peek, params, prepare=True)
                rows = await cur.fetchall()
        step = ALGORITHMS[algorithm]
        out = []
        for hit, (_, alg, t, count, prev, db_now) in zip(hits, rows, strict=True):
            state = None if alg != algorithm or t is None else BucketState(t, count, prev)
            out.append(step(state, db_now if now is None else now, hit.quota, 0)[0])
        return out

    # -- administration --------------------------------------------------------------------

    async def status(self, key: str, *, now: int | None = None) -> list[KeyStatus]:
        """The live state of every (endpoint, quota) of ``key``, decided as a peek."""
        return await self._admin.status(self.pool, key, now)

    async def reset(self, key: str, *, endpoint: str | None = None) -> int:
        """Delete ``key``'s rows (of one endpoint, or all); return how many."""
        return await self._admin.reset(self.pool, key, endpoint)

    async def cleanup(self, *, batch_size: int = 1000, now: int | None = None) -> int:
        """Delete expired rows in batches of ``batch_size`` (short locks, skipping rows in
        use) until none are left; return how many were deleted. Lossless: an expired row
        is equivalent to no row. Then deletes the per-minute request counts older than
        ``stats_retention``, in batches too (not counted in the figure returned)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        deleted = await self._admin.cleanup(self.pool, batch_size, now)
        await self._stats.prune(now, batch_size)
        return deleted

    async def _cleanup_round(self) -> int | None:
        deleted = await self._admin.cleanup_alone(self.pool, _CLEANUP_BATCH)
        if deleted is not None:  # (None: another instance holds the cleanup lock)
            await self._stats.prune(None, _CLEANUP_BATCH)
        return deleted

    async def stats(
        self,
        *,
        since: float | timedelta | None = None,
        by: Sequence[str] = ("endpoint", "tier"),
        now: int | None = None,
    ) -> list[StatsRow]:
        """Allowed and denied requests by endpoint and tier (or the groups ``by``), from
        the per-minute rollups that every instance writes; this instance's pending counts
        are written first. ``keys``: the keys with state stored in each group.

        Args:
            since: how far back, in seconds or a ``timedelta`` (``None``: every minute
                kept); the minute it falls in counts whole.
            by: the groups: ``"endpoint"``, ``"tier"``, both (the default) or neither.
            now: nanoseconds since the epoch to count back from (``None``: the database
                clock).

        Raises:
            ValueError: a bad ``since`` or ``by``.
            StorageError: the database failed or refused (say, to a runtime role).
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
            StorageError: the database failed or refused.
        """
        return await self._stats.series(since, by, now)
