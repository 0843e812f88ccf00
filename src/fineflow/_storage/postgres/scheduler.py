"""The coalescing scheduler: requests that arrive while statements are in flight go out
together as one statement (a batch).

Theory of operation
-------------------
A caller queues its :class:`Request` and waits on its future. While fewer than
``max_in_flight`` statements run, the scheduler starts a statement task; the task takes its
batch when it first runs, not when it is started, so callers woken together by the previous
batch all re-arrive in the same loop iteration and one statement carries them all. A lone
request goes out at once and never waits for a timer.

* **Split.** With nothing else in flight, four or more waiting requests go out as two
  statements of half each: the database runs one while this process handles the other's
  results.
* **Hand-off.** A task that answered its batch keeps its connection for the next batch (no
  pool round trip, no new task) while no other task is about to take one, at most
  ``_HANDOFF_MAX`` batches in a row, so the pool's checks and lifetimes still apply.
* **Budgets.** A caller's deadline ends only its own wait (:mod:`.deadlines`): the statement
  runs on in a task the scheduler owns, so a timeout never breaks a connection mid-query.
  Requests whose callers gave up before their statement went out are dropped uncharged.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import psycopg

from ..._errors import StorageError
from .deadlines import Deadlines, DeadlinesSnapshot
from .errors import storage_error
from .statements import Request

__all__ = ["Scheduler", "SchedulerSnapshot"]

# Pending requests from which a lone statement splits its batch in two (below, the second
# statement's fixed cost outweighs the overlap it buys).
_SPLIT_MIN = 4
# Batches a statement task runs in a row on the connection it holds before it gives the
# connection back to the pool.
_HANDOFF_MAX = 64

Connect = Callable[[], contextlib.AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]]
# Decides one batch with a cursor; returns the name of the function that decided it.
Run = Callable[[psycopg.AsyncCursor[Any], str, list[Request]], Awaitable[str]]


@dataclass(frozen=True, slots=True)
class SchedulerSnapshot:
    """The scheduler's state at one instant (all zero when it is idle)."""

    in_flight: int
    starting: int
    tasks: int
    pending: int
    deadlines: DeadlinesSnapshot


class Scheduler:
    """Coalesces requests into batches and runs them on pooled connections.

    Args:
        connect: gives a pooled connection as an async context manager.
        run: decides one batch on a cursor (see :class:`~.statements.Decider`).
        coalesce: batch requests that arrive while others are in flight.
        max_in_flight: statements in flight at once.
        max_batch: the most requests in one statement.

    Attributes:
        batches: statements sent that decided a batch (every one but a lone ``hit()``).
        batched_requests: the requests those statements decided.
    """

    def __init__(
        self,
        connect: Connect,
        run: Run,
        *,
        coalesce: bool,
        max_in_flight: int,
        max_batch: int,
    ) -> None:
        self._connect = connect
        self._run = run
        self.coalesce = coalesce
        self.max_in_flight = max_in_flight if coalesce else 1 << 30
        self.max_batch = max_batch
        self.batches = 0
        self.batched_requests = 0
        self._closing = False
        self._in_flight = 0
        self._pending: list[Request] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._starting = 0  # tasks started that have not taken their batch yet
        self._connecting = 0  # tasks holding a batch while they wait for a pool connection
        self._deadlines = Deadlines()

    def submit(self, request: Request, timeout: float | None) -> None:
        """Queue ``request``; its future is settled when its ``result`` is set, when its
        statement fails (``StorageError``), or ``timeout`` seconds from now if neither
        happened by then (``TimeoutError``)."""
        self._pending.append(request)
        self._dispatch()
        if timeout is not None:
            self._deadlines.add(request.future, timeout)

    async def close(self, timeout: float) -> None:  # noqa: ASYNC109 - a wait, not a budget
        """Let the statements in flight finish for up to ``timeout`` seconds, then cancel
        them. (The deadline timers stay armed: callers waiting for those statements still
        get their TimeoutError within their own budget.)"""
        self._closing = True
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in self._tasks:
                task.cancel()

    def snapshot(self) -> SchedulerSnapshot:
        return SchedulerSnapshot(
            self._in_flight,
            self._starting,
            len(self._tasks),
            len(self._pending),
            self._deadlines.snapshot(),
        )

    def _dispatch(self) -> None:
        """Start statement tasks while fewer than ``max_in_flight`` are running (while
        coalescing, one task at a time waits to take a batch)."""
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
            limit = min(limit, (len(pending) + 1) // 2)  # the split (see the module doc)
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
                        algorithm, batch = await self._next_batch()
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

    async def _next_batch(self) -> tuple[str, list[Request]]:
        """The hand-off: this task takes the next batch on the connection it holds. The
        callers just answered re-arrive first (they were woken before this task resumes),
        as they would for a new task."""
        self._starting += 1
        try:
            await asyncio.sleep(0)
        except BaseException:
            self._starting -= 1
            raise
        algorithm, batch = self._take()
        self._dispatch()
        return algorithm, batch

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        self._connecting += 1
        waiting = True
        try:
            async with self._connect() as conn:
                self._connecting -= 1
                waiting = False
                yield conn
        except psycopg.Error as exc:
            raise storage_error("rate-limit decision", exc) from exc
        finally:
            if waiting:
                self._connecting -= 1

    def _hand_over(self) -> bool:
        """Whether a task that just answered its batch keeps its connection for the next
        one: while coalescing, when no other task is about to take a batch."""
        return (
            self.coalesce
            and not self._closing
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
                used = await self._run(cur, algorithm, live)
            except psycopg.Error as exc:
                raise storage_error("rate-limit decision", exc) from exc
            if used != "hit":
                self.batches += 1
                self.batched_requests += len(live)
        for request in batch:
            if not request.future.done():
                request.future.set_result(None)
