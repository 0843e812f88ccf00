"""PostgresStorage: rate-limit state shared by every instance of a service.

Each decision is one statement and one round trip, on the database clock. While a statement
is in flight, decisions that arrive are coalesced and sent together as one statement (a
batch), so throughput grows with concurrency instead of the database becoming the
bottleneck; a lone request goes out at once and never waits for a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
from collections import deque
from collections.abc import AsyncIterator, Sequence
from functools import partial
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from ..._errors import ConfigurationError, SchemaVersionError, StorageClosedError, StorageError
from ..._ratelimit.algorithms import ALGORITHMS, NS, BucketState, Decision, validate_algorithm
from ..._ratelimit.quota import Quota
from ..base import Hit, KeyStatus, StatsRow, check_hits, storage_key
from .batch import (
    Request,
    Statements,
    by_key,
    by_row,
    run_batch,
    run_keys,
    run_rows,
    run_single,
)
from .sql import COMPATIBLE_WITH, GRANT_RUNTIME, LATEST_VERSION, MIGRATIONS, render

__all__ = ["PostgresStorage"]

logger = logging.getLogger("fineflow.storage")

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
# Pending requests from which a lone statement splits its batch in two (below, the second
# statement's fixed cost outweighs the overlap it buys).
_SPLIT_MIN = 4
# Batches a statement task runs in a row on the connection it holds before it gives the
# connection back to the pool.
_HANDOFF_MAX = 64


class PostgresStorage:
    """Rate-limit state in PostgreSQL (psycopg 3 + ``AsyncConnectionPool``).

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
        min_size, max_size: pool size when the storage owns the pool (default 1 and 10;
            thanks to coalescing, decisions need only ``max_in_flight`` connections). The
            pool grows under load and shrinks back after ten idle minutes; it hands out idle
            connections in turn, and a lone request on one of two alternating connections is
            measurably slower than on the same one each time, hence one by default.
        coalesce: batch decisions that arrive while others are in flight (default True).
        max_in_flight: statements in flight at once before arrivals are batched (default 2;
            four or more waiting requests with nothing in flight are split between two
            statements, so the database runs one while this process handles the other's
            results).
        max_batch: the most requests in one batch (default 512).
        connect_timeout: seconds to wait for a new connection (default 5).
        statement_timeout: server-side cap in seconds on any statement (default 5).

    Raises:
        ConfigurationError: for a bad schema name or option, or both ``dsn`` and ``pool``.
    """

    local = False

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
    ) -> None:
        if not isinstance(schema, str) or not _IDENTIFIER.match(schema):
            raise ConfigurationError(
                f"schema must be a plain SQL identifier (letters, digits, _; at most 63), "
                f"got {schema!r}"
            )
        if dsn is not None and pool is not None:
            raise ConfigurationError("give PostgresStorage a dsn or a pool, not both")
        if dsn is not None and not isinstance(dsn, str):
            raise ConfigurationError(f"dsn must be a string, got {type(dsn).__name__}")
        if dsn is None and pool is None:
            dsn = os.environ.get("FINEFLOW_DSN", "")
        if dsn is not None:
            _check_dsn(dsn)
        if min_size is None:
            min_size = 1
        for name, value in (
            ("min_size", min_size),
            ("max_size", max_size),
            ("max_in_flight", max_in_flight),
            ("max_batch", max_batch),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{name} must be an int >= 1, got {value!r}")
        if min_size > max_size:
            raise ConfigurationError("min_size must not exceed max_size")
        self.dsn = dsn
        self.schema = schema
        self.unlogged = unlogged
        self.synchronous_commit = synchronous_commit
        self.coalesce = coalesce
        self.max_in_flight = max_in_flight if coalesce else 1 << 30
        self.max_batch = max_batch
        self.connect_timeout = connect_timeout
        self.statement_timeout = statement_timeout
        self._pool = pool
        self._owns_pool = pool is None
        self._min_size = min_size
        self._max_size = max_size
        self._opened = False
        self._closed = False
        self._in_flight = 0
        self._pending: list[Request] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._starting = 0  # tasks started that have not taken their batch yet
        self._connecting = 0  # tasks holding a batch while they wait for a pool connection
        # Callers' deadlines, per timeout: (loop time, future) in order, and each queue's timer.
        self._deadlines: dict[float, deque[tuple[float, asyncio.Future[None]]]] = {}
        self._timers: dict[float, asyncio.TimerHandle] = {}
        self.batches = 0
        # Tests turn these off to hold each statement to the model.
        self._fast_path = True  # a lone single-quota GCRA request: hit()
        self._grouped = True  # a batch of single-quota GCRA requests: hit_keys(), hit_many()
        self._keys = True  # hit_keys() when the batch shares endpoint, quota, tier and cost
        self.batched_requests = 0
        self._statements = Statements.compose(schema)
        ident = sql.Identifier(schema)
        self._peek = sql.SQL(
            "SELECT * FROM {}.peek(%(key)s::text[], %(endpoint)s::text[], %(policy)s::text[])"
        ).format(ident)
        self._status = sql.SQL("SELECT * FROM {}.status(%(key)s, %(now)s::bigint)").format(ident)

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> PostgresStorage:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Open the pool (connections are made in the background; a database that is down
        does not stop your app from starting). Idempotent."""
        if self._closed:
            raise StorageClosedError("this PostgresStorage was closed; create a new one")
        if self._opened:
            return
        if self._pool is None:
            options = f"-c statement_timeout={int(self.statement_timeout * 1000)}"
            if not self.synchronous_commit:
                options += " -c synchronous_commit=off"
            self._pool = AsyncConnectionPool(
                self.dsn or "",
                min_size=self._min_size,
                max_size=self._max_size,
                kwargs={
                    "autocommit": True,
                    "options": options,
                    "connect_timeout": max(int(self.connect_timeout), 1),
                },
                timeout=self.connect_timeout,
                open=False,
                name=f"fineflow-{self.schema}",
            )
            await self._pool.open(wait=False)
        self._opened = True

    async def close(self) -> None:
        """Finish statements in flight, close the pool if this storage owns it; the
        storage refuses use afterwards."""
        self._closed = True
        # (The deadline timers stay armed: callers waiting for statements that close()
        # lets finish still get their TimeoutError within their own budget.)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.statement_timeout)
            for task in self._tasks:
                task.cancel()
        if self._pool is not None and self._owns_pool:
            await self._pool.close()

    @property
    def pool(self) -> AsyncConnectionPool[Any]:
        """The connection pool (after ``open()``)."""
        if self._pool is None or not self._opened or self._closed:
            raise StorageClosedError(
                "PostgresStorage is not open: use `async with storage:` or `await storage.open()`"
            )
        return self._pool

    async def migrate(self) -> None:
        """Create or upgrade the schema; idempotent and safe when instances run it at once.

        Raises:
            SchemaVersionError: the database holds a newer schema than this code knows.
            StorageError: the database could not be reached or refused.
        """
        try:
            async with self.pool.connection() as conn, conn.transaction():
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtext(%s))", (f"fineflow:{self.schema}",)
                )
                ident = sql.Identifier(self.schema)
                await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
                await conn.execute(
                    sql.SQL(
                        "CREATE TABLE IF NOT EXISTS {}.schema_version (version int NOT NULL, "
                        "applied_at timestamptz NOT NULL DEFAULT now())"
                    ).format(ident)
                )
                compat = await _scalar(
                    conn, "SELECT coalesce(max(version), 0) FROM {}.schema_version", ident
                )
                if compat > LATEST_VERSION:
                    raise SchemaVersionError(
                        f"schema {self.schema!r} is at version {compat}, newer than this "
                        f"fineflow knows ({LATEST_VERSION}); upgrade fineflow"
                    )
                await conn.execute(
                    sql.SQL(
                        "CREATE TABLE IF NOT EXISTS {}.schema_migrations (version int PRIMARY "
                        "KEY, applied_at timestamptz NOT NULL DEFAULT now())"
                    ).format(ident)
                )
                applied = await _scalar(
                    conn, "SELECT coalesce(max(version), 0) FROM {}.schema_migrations", ident
                )
                if applied == 0 and compat > 0:
                    # Written by code from before schema_migrations, whose schema_version
                    # rows were the versions applied: list them, and bring schema_version
                    # down to the compatibility level they amount to.
                    applied = compat
                    compat = max(COMPATIBLE_WITH[:applied])
                    await conn.execute(
                        sql.SQL(
                            "INSERT INTO {}.schema_migrations (version) "
                            "SELECT generate_series(1, %s)"
                        ).format(ident),
                        (applied,),
                    )
                    await conn.execute(
                        sql.SQL("DELETE FROM {}.schema_version WHERE version > %s").format(ident),
                        (compat,),
                    )
                for version in range(applied + 1, LATEST_VERSION + 1):
                    for statement in MIGRATIONS[version - 1]:
                        await conn.execute(render(statement, self.schema, unlogged=self.unlogged))
                    await conn.execute(
                        sql.SQL("INSERT INTO {}.schema_migrations (version) VALUES (%s)").format(
                            ident
                        ),
                        (version,),
                    )
                    if COMPATIBLE_WITH[version - 1] > compat:
                        compat = COMPATIBLE_WITH[version - 1]
                        await conn.execute(
                            sql.SQL("INSERT INTO {}.schema_version (version) VALUES (%s)").format(
                                ident
                            ),
                            (compat,),
                        )
                    logger.info("migrated schema %r to version %d", self.schema, version)
                self._keys = True  # hit_keys() exists now, whatever an earlier batch found
        except PoolTimeout as exc:
            raise StorageError(
                f"migration of schema {self.schema!r} failed: {await self._why_unreachable(exc)}"
            ) from exc
        except psycopg.Error as exc:
            raise StorageError(f"migration of schema {self.schema!r} failed: {exc}") from exc

    async def _why_unreachable(self, exc: Exception) -> str:
        """The pool only says it timed out; one direct attempt says where and why."""
        if self.dsn is None:
            return str(exc)
        try:
            conn = await psycopg.AsyncConnection.connect(
                self.dsn, connect_timeout=max(int(self.connect_timeout), 1)
            )
        except psycopg.Error as direct:
            return f"{str(direct).strip()} (check the DSN or FINEFLOW_DSN)"
        await conn.close()
        return f"{exc} (the server answers now: the pool may be too small or busy)"

    async def grant_runtime(self, role: str, *, create: bool = False) -> None:
        """Let ``role`` decide, peek and read status through fineflow's functions only.

        The role gets ``USAGE`` on the schema and ``EXECUTE`` on the decision functions;
        it has no access to the table, so it cannot read or change rows directly. Run as
        the schema's owner (an admin role). With ``create=True`` the role is created (as
        ``LOGIN``, no password: set one, or use your own authentication) if missing.

        Raises:
            ConfigurationError: if ``role`` is not a plain identifier.
            StorageError: if the database refuses (e.g. not privileged).
        """
        if not isinstance(role, str) or not _IDENTIFIER.match(role):
            raise ConfigurationError(f"role must be a plain SQL identifier, got {role!r}")
        try:
            async with self.pool.connection() as conn, conn.transaction():
                if create:
                    cur = await conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
                    if await cur.fetchone() is None:
                        await conn.execute(
                            sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role))
                        )
                await conn.execute(render(GRANT_RUNTIME, self.schema, role=role))
        except psycopg.errors.UndefinedFunction as exc:
            raise StorageError(
                f"granting runtime access to {role!r} failed: schema {self.schema!r} is older "
                f"than this fineflow; run migrate() (fineflow migrate) first ({exc})"
            ) from exc
        except psycopg.Error as exc:
            raise StorageError(f"granting runtime access to {role!r} failed: {exc}") from exc

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
            # Checked before the request is queued: a timeout _deadline() could not use
            # would raise there after the request was sent, and charged.
            if timeout.__class__ is not float:
                if isinstance(timeout, bool) or not isinstance(timeout, int | float):
                    raise ValueError(f"timeout must be seconds > 0 or None, got {timeout!r}")
                timeout = float(timeout)
            if not timeout > 0:  # (NaN too: it would upset the timers)
                raise ValueError(f"timeout must be seconds > 0 or None, got {timeout!r}")
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
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        request = Request(hits, now, algorithm, future)
        self._pending.append(request)
        self._dispatch()
        # A caller's time budget ends only this wait: the statement runs on in a task the
        # storage owns, so a timeout never breaks a connection mid-query.
        if timeout is not None:
            # Whichever comes first settles the future: the answer or the deadline. (An
            # answer that came first is never lost to a deadline due in the same loop
            # iteration, as it would be with asyncio.timeout.)
            self._deadline(future, timeout)
        await future
        return request.result

    def _deadline(self, future: asyncio.Future[None], timeout: float) -> None:
        """Fail ``future`` with ``TimeoutError`` if it is still waiting ``timeout`` seconds
        from now. Deadlines of one timeout come in order, so each timeout has a queue and
        one timer armed for its oldest entry: an append per request, not a timer each."""
        if timeout == math.inf:
            return  # never due: a queue entry would only be held forever
        loop = future.get_loop()
        deadline = loop.time() + timeout
        queue = self._deadlines.get(timeout)
        if queue is None:
            queue = self._deadlines[timeout] = deque()
        else:
            # Answered entries at the head go now, not at the head's deadline: the queue
            # holds the requests since the oldest one still waiting, not `timeout` seconds'.
            while queue and queue[0][1].done():
                queue.popleft()
        queue.append((deadline, future))
        if timeout not in self._timers:
            self._timers[timeout] = loop.call_at(queue[0][0], self._expire, loop, timeout)

    def _expire(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        queue = self._deadlines[timeout]
        now = loop.time() + 0.001  # (timers may fire a little early)
        while queue and (queue[0][0] <= now or queue[0][1].done()):
            future = queue.popleft()[1]
            if not future.done():
                future.set_exception(_out_of_budget())
        if queue:
            self._timers[timeout] = loop.call_at(queue[0][0], self._expire, loop, timeout)
        else:
            # Both go: a caller passing its remaining budget uses a new timeout every time.
            del self._timers[timeout]
            del self._deadlines[timeout]

    def _dispatch(self) -> None:
        """Start statement tasks while fewer than ``max_in_flight`` are running.

        A task takes its batch when it first runs, not here: callers woken together by the
        previous batch all re-arrive in the same loop iteration, and one statement then
        carries them all (taking the first arrival alone would cost a second statement and
        commit per cycle). So while coalescing, one task at a time waits to take a batch."""
        waiting = min(len(self._pending), 1) if self.coalesce else len(self._pending)
        while self._starting < waiting and self._in_flight < self.max_in_flight:
            self._starting += 1
            self._in_flight += 1
            started: list[bool] = []
            task = asyncio.get_running_loop().create_task(self._run_owned(started))
            self._tasks.add(task)
            task.add_done_callback(partial(self._finished, started))

    def _finished(self, started: list[bool], task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not started:
            # Cancelled before its first step (say, a shutdown cancelling every task):
            # _run_owned never settled its counters, and would otherwise hold a slot forever.
            self._starting -= 1
            self._in_flight -= 1
            self._dispatch()

    def _take(self) -> tuple[str, list[Request]]:
        """The next batch: pending requests of the first one's algorithm, in arrival order
        (one request when not coalescing)."""
        self._starting -= 1
        pending = [r for r in self._pending if not r.future.done()]
        if not pending:
            self._pending = []
            return "", []
        algorithm = pending[0].algorithm
        limit = self.max_batch if self.coalesce else 1
        if self._in_flight == 1 and self.max_in_flight > 1 and len(pending) >= _SPLIT_MIN:
            # Nothing else in flight: send half now and half at once in a second statement.
            # While one is on the server the other's results are handled here, so the client
            # and the database work in parallel instead of taking turns.
            limit = min(limit, (len(pending) + 1) // 2)
        batch: list[Request] = []
        rest: list[Request] = []
        for request in pending:
            if request.algorithm == algorithm and len(batch) < limit:
                batch.append(request)
            else:
                rest.append(request)
        self._pending = rest
        return algorithm, batch

    async def _run_owned(self, started: list[bool]) -> None:
        started.append(True)
        algorithm, batch = self._take()
        self._dispatch()  # what did not fit goes out at once in another statement
        try:
            if batch:
                async with self._connection() as conn:
                    # One cursor for every batch on this connection: psycopg builds a new
                    # one per conn.execute() (about a fifth of its client work per statement).
                    cur = conn.cursor()
                    for run in range(1, _HANDOFF_MAX + 1):
                        await self._settle(cur, algorithm, batch)
                        batch = []
                        if run == _HANDOFF_MAX or not self._hand_over():
                            break
                        # This task takes the next batch, on the connection it holds: the
                        # callers just answered re-arrive first (they were woken before
                        # this task resumes), as they would for a new task.
                        self._starting += 1
                        try:
                            await asyncio.sleep(0)
                        except BaseException:
                            self._starting -= 1
                            raise
                        algorithm, batch = self._take()
                        self._dispatch()
                        if not batch:
                            break
        except BaseException as exc:
            error = exc if isinstance(exc, StorageError) else StorageError(f"{exc!r}")
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(error)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._in_flight -= 1
            self._dispatch()

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        self._connecting += 1
        waiting = True
        try:
            async with self.pool.connection() as conn:
                self._connecting -= 1
                waiting = False
                yield conn
        except psycopg.Error as exc:
            raise StorageError(f"rate-limit decision failed: {_brief(exc)}") from exc
        finally:
            if waiting:
                self._connecting -= 1

    def _hand_over(self) -> bool:
        """Whether a task that just answered its batch keeps its connection for the next
        one (no pool round trip, no new task): while coalescing, when no other task is
        about to take a batch. After ``_HANDOFF_MAX`` batches it returns the connection
        anyway, so the pool's checks and lifetimes still apply."""
        return (
            self.coalesce
            and not self._closed
            and self._starting == 0
            # a batch already taken waits for a connection: this one goes back to the pool
            # (first come, first served), or that batch would wait up to _HANDOFF_MAX
            # batches while later arrivals are answered
            and self._connecting == 0
        )

    async def _settle(
        self, cur: psycopg.AsyncCursor[Any], algorithm: str, batch: list[Request]
    ) -> None:
        """Decide ``batch`` with ``cur`` and wake its callers."""
        # Requests whose callers gave up while we waited for a connection are dropped,
        # so an answer already given (on_storage_error) is never charged.
        live = [r for r in batch if not r.future.done()]
        if live:
            try:
                await self._run_live(cur, algorithm, live)
            except psycopg.Error as exc:
                raise StorageError(f"rate-limit decision failed: {_brief(exc)}") from exc
        for request in batch:
            if not request.future.done():
                request.future.set_result(None)

    async def _run_live(
        self, cur: psycopg.AsyncCursor[Any], algorithm: str, live: list[Request]
    ) -> None:
        statements = self._statements
        if algorithm == "gcra" and all(len(r.hits) == 1 for r in live):
            if self._fast_path and len(live) == 1:
                await run_single(cur, statements, live[0])
                return
            if self._grouped:
                keyed = by_key(live) if self._keys else None
                if keyed is not None:
                    try:
                        await run_keys(cur, statements, live, keyed)
                    except psycopg.errors.UndefinedFunction:
                        # A schema not yet migrated to v2 (an instance of this version
                        # started before ``migrate()`` ran): hit_many() decides the same.
                        self._keys = False
                    else:
                        self._count(live)
                        return
                rows = by_row(live)
                if rows is not None:
                    await run_rows(cur, statements, live[0].now, rows)
                    self._count(live)
                    return
        await run_batch(cur, statements, algorithm, live)
        self._count(live)

    def _count(self, batch: list[Request]) -> None:
        self.batches += 1
        self.batched_requests += len(batch)

    async def _peek_within(
        self,
        algorithm: str,
        hits: Sequence[Hit],
        now: int | None,
        timeout: float | None,  # noqa: ASYNC109 - decide()'s own
    ) -> list[Decision]:
        if timeout is None:
            return await self._peek_hits(algorithm, hits, now)
        async with asyncio.timeout(timeout):  # (a peek charges nothing: no answer to lose)
            return await self._peek_hits(algorithm, hits, now)

    async def _peek_hits(
        self, algorithm: str, hits: Sequence[Hit], now: int | None
    ) -> list[Decision]:
        params = {
            "key": [storage_key(h.key) for h in hits],
            "endpoint": [storage_key(h.endpoint) for h in hits],
            "policy": [h.quota.policy for h in hits],
        }
        try:
            async with self.pool.connection() as conn:
                cur = await conn.execute(self._peek, params, prepare=True)
                rows = await cur.fetchall()
        except psycopg.Error as exc:
            raise StorageError(f"rate-limit peek failed: {_brief(exc)}") from exc
        step = ALGORITHMS[algorithm]
        out = []
        for hit, (_, alg, t, count, prev, db_now) in zip(hits, rows, strict=True):
            state = None if alg != algorithm or t is None else BucketState(t, count, prev)
            out.append(step(state, db_now if now is None else now, hit.quota, 0)[0])
        return out

    _bounded_decide = decide  # decide() enforces ``timeout`` itself (see RateLimiter)

    # -- administration --------------------------------------------------------------------

    async def status(self, key: str, *, now: int | None = None) -> list[KeyStatus]:
        """The live state of every (endpoint, quota) of ``key``, decided as a peek."""
        try:
            async with self.pool.connection() as conn:
                cur = await conn.execute(self._status, {"key": storage_key(key), "now": now})
                rows = await cur.fetchall()
        except psycopg.Error as exc:
            raise StorageError(f"status query failed: {exc}") from exc
        out = []
        for k, ep, policy, tier, alg, t, count, prev, lim, period, cap, ok_n, no_n, db_now in rows:
            quota = Quota(lim, period / NS, None if cap == lim else cap, name=policy)
            at = db_now if now is None else now
            decision = ALGORITHMS[alg](BucketState(t, count, prev), at, quota, 0)[0]
            out.append(KeyStatus(k, ep, policy, tier, alg, decision, ok_n, no_n))
        return out

    async def reset(self, key: str, *, endpoint: str | None = None) -> int:
        """Delete ``key``'s rows (of one endpoint, or all); return how many."""
        query = sql.SQL("SELECT {}.reset(%s, %s)").format(sql.Identifier(self.schema))
        ep = None if endpoint is None else storage_key(endpoint)
        try:
            async with self.pool.connection() as conn:
                cur = await conn.execute(query, (storage_key(key), ep))
                row = await cur.fetchone()
        except psycopg.Error as exc:
            raise StorageError(f"reset failed: {exc}") from exc
        return int(row[0]) if row else 0

    async def cleanup(self, *, batch_size: int = 1000, now: int | None = None) -> int:
        """Delete expired rows in batches of ``batch_size`` (short locks, skipping rows in
        use) until none are left; return how many were deleted. Lossless: an expired row
        is equivalent to no row."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        query = sql.SQL("SELECT {}.cleanup(%s, %s)").format(sql.Identifier(self.schema))
        removed = 0
        try:
            while True:
                async with self.pool.connection() as conn:
                    cur = await conn.execute(query, (batch_size, now))
                    row = await cur.fetchone()
                done = int(row[0]) if row else 0
                removed += done
                if done < batch_size:
                    return removed
        except psycopg.Error as exc:
            raise StorageError(f"cleanup failed: {exc}") from exc

    async def stats(self) -> list[StatsRow]:
        """Allowed and denied counts grouped by endpoint and tier (the ``stats`` view)."""
        query = sql.SQL(
            "SELECT endpoint, tier, keys, allowed, denied FROM {}.stats ORDER BY 1, 2"
        ).format(sql.Identifier(self.schema))
        try:
            async with self.pool.connection() as conn:
                cur = await conn.execute(query)
                rows = await cur.fetchall()
        except psycopg.Error as exc:
            raise StorageError(f"stats query failed: {exc}") from exc
        return [StatsRow(e, t, int(k), int(a), int(d)) for e, t, k, a, d in rows]


def _brief(exc: psycopg.Error) -> str:
    # The message, DETAIL and HINT without the CONTEXT, which for an error inside fineflow's
    # functions quotes the whole statement (kilobytes per log line); it stays on __cause__.
    parts = [str(exc).partition("\n")[0], exc.diag.message_detail, exc.diag.message_hint]
    return "; ".join(part for part in parts if part)


def _out_of_budget() -> TimeoutError:
    return TimeoutError("the rate-limit decision ran out of its time budget")


_SSLMODES = {"disable", "allow", "prefer", "require", "verify-ca", "verify-full"}
_DSN_EXAMPLE = '; e.g. "host=db port=5432 dbname=app user=app" or "postgresql://app@db:5432/app"'


def _check_dsn(dsn: str) -> None:
    """Reject at construction a DSN that no connection attempt could ever use."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        reason = str(exc).strip()
        raise ConfigurationError(f"invalid PostgreSQL DSN: {reason}{_DSN_EXAMPLE}") from None
    for port in str(params.get("port") or "").split(","):
        if port and not (port.isdigit() and 1 <= int(port) <= 65535):
            raise ConfigurationError(
                f"invalid PostgreSQL DSN: port {port!r} is not 1..65535{_DSN_EXAMPLE}"
            )
    sslmode = params.get("sslmode")
    if sslmode is not None and sslmode not in _SSLMODES:
        raise ConfigurationError(
            f"invalid PostgreSQL DSN: sslmode {sslmode!r} is not one of "
            f"{', '.join(sorted(_SSLMODES))}"
        )


async def _scalar(conn: psycopg.AsyncConnection[Any], query: str, schema: sql.Identifier) -> int:
    cur = await conn.execute(sql.SQL(query).format(schema))
    row = await cur.fetchone()
    return int(row[0]) if row else 0
