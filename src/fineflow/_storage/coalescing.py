"""Coalescing: decisions that arrive while others are in flight go out together, as one
batch (one statement, one pipeline), and each caller keeps its own time budget.

Both networked storages decide this way; each supplies only how a batch is sent and its
answers become decisions (a :class:`Sender`).

Theory of operation
-------------------
A caller queues its :class:`Request` (:meth:`Scheduler.submit`) and waits on its future.
While fewer than ``max_in_flight`` batches run, the scheduler starts a task; the task takes
its batch when it first runs, not when it is started, so callers woken together by the
previous batch all re-arrive in the same loop iteration and one batch carries them all.
While coalescing, one task at a time waits to take a batch; what did not fit in it (more
than ``max_batch`` requests, or another algorithm when batches hold one) goes out at once
in another task. A lone request goes out at once and never waits for a timer. A task
cancelled before its first step gives its slot back.

* **Split** (``split_min``). With nothing else in flight, ``split_min`` or more waiting
  requests go out as two batches of half each: the server runs one while this process
  handles the other's answers.
* **Hand-off** (``handoff_max``). A task that answered its batch keeps its session (say a
  pooled connection) for the next batch, with no new task and no pool round trip, while no
  other task is about to take one, at most ``handoff_max`` batches in a row.
* **Budgets** (:class:`Deadlines`). A caller's deadline ends only its own wait: the batch
  runs on in a task the scheduler owns, so a timeout never breaks a connection mid-query.
  Deadlines of one timeout come in order, so each timeout has one queue and one timer: a
  request costs an append, not a timer. Whichever comes first settles the future, the
  answer or the deadline (an answer that came first is never lost to a deadline due in the
  same loop iteration, as it would be with ``asyncio.timeout``). Requests whose callers
  gave up before their batch went out are dropped, never charged.
* **Figures** (:meth:`Scheduler.figures`). Requests failed by their batch, requests out of
  budget, and per batch sent its round-trip time and size, in fixed-bucket histograms: a
  batch pays two clock reads and two bisects, a request nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Generic, Protocol, TypeVar

from .._errors import StorageError
from .._ratelimit.algorithms import Decision
from .base import Hit
from .figures import BATCH_SIZE_BUCKETS, ROUND_TRIP_BUCKETS, BatchFigures, Histogram

__all__ = [
    "Deadlines",
    "DeadlinesSnapshot",
    "Request",
    "Scheduler",
    "SchedulerSnapshot",
    "Sender",
]

S = TypeVar("S")


@dataclass(slots=True)
class Request:
    """One caller's request waiting for its decisions."""

    hits: Sequence[Hit]
    now: int | None
    algorithm: str
    future: asyncio.Future[None]
    result: list[Decision] = field(default_factory=list)


class Sender(Protocol[S]):
    """What a storage supplies to the :class:`Scheduler`: how a batch is sent.

    ``S`` is what batches are sent on (a cursor, a client).
    """

    def session(self) -> contextlib.AbstractAsyncContextManager[S]:
        """What a task sends its batches on, held for up to ``handoff_max`` batches.

        Entered once per task: without a hand-off, once per batch. There a class (such as
        ``contextlib.nullcontext``) is cheaper than an ``asynccontextmanager``, whose async
        generator the event loop registers in a WeakSet each time."""
        ...

    async def send(self, session: S, batch: list[Request]) -> bool:
        """Decide ``batch`` (requests still waiting, in arrival order): set each one's
        ``result``, or fail its future. Return whether this counts as a batch (the
        ``batches`` counter; a storage may count a lone request's statement apart)."""
        ...

    def failure(self, exc: BaseException) -> StorageError:
        """The error for the callers of a batch that raised ``exc`` (not a StorageError)."""
        ...

    def out_of_budget(self) -> BaseException:
        """The error for a caller whose time budget ran out (a ``TimeoutError``)."""
        ...

    def closed(self) -> StorageError:
        """The error for requests still queued when the storage closes."""
        ...


@dataclass(frozen=True, slots=True)
class DeadlinesSnapshot:
    """How many timeouts have a queue (and a timer), and how many futures they hold."""

    queues: int
    timers: int
    waiting: int


class Deadlines:
    """Deadline queues per timeout, with one loop timer per queue.

    Args:
        error: makes the exception a future still waiting at its deadline fails with.
    """

    def __init__(self, error: Callable[[], BaseException]) -> None:
        self._error = error
        # Per timeout: (loop time, future) in order, and the queue's timer.
        self._queues: dict[float, deque[tuple[float, asyncio.Future[None]]]] = {}
        self._timers: dict[float, asyncio.TimerHandle] = {}
        self.expired = 0  # futures failed at their deadline

    def add(self, future: asyncio.Future[None], timeout: float) -> None:
        """Fail ``future`` if it is still waiting ``timeout`` seconds from now."""
        if timeout == math.inf:
            return  # never due: a queue entry would only be held forever
        loop = future.get_loop()
        queue = self._queues.get(timeout)
        if queue is None:
            queue = self._queues[timeout] = deque()
        else:
            # Answered entries at the head go now, not at the head's deadline: the queue
            # holds the requests since the oldest one still waiting, not `timeout` seconds'.
            while queue and queue[0][1].done():
                queue.popleft()
        queue.append((loop.time() + timeout, future))
        if timeout not in self._timers:
            self._timers[timeout] = loop.call_at(queue[0][0], self._expire, loop, timeout)

    def snapshot(self) -> DeadlinesSnapshot:
        waiting = sum(len(queue) for queue in self._queues.values())
        return DeadlinesSnapshot(len(self._queues), len(self._timers), waiting)

    def _expire(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        queue = self._queues[timeout]
        now = loop.time() + 0.001  # (timers may fire a little early)
        while queue and (queue[0][0] <= now or queue[0][1].done()):
            future = queue.popleft()[1]
            if not future.done():
                future.set_exception(self._error())
                self.expired += 1
        if queue:
            self._timers[timeout] = loop.call_at(queue[0][0], self._expire, loop, timeout)
        else:
            # Both go: a caller passing its remaining budget uses a new timeout every time.
            del self._timers[timeout]
            del self._queues[timeout]


@dataclass(frozen=True, slots=True)
class SchedulerSnapshot:
    """The scheduler's state at one instant (all zero when it is idle)."""

    in_flight: int
    starting: int
    tasks: int
    pending: int
    deadlines: DeadlinesSnapshot


class Scheduler(Generic[S]):
    """Coalesces requests into batches and sends them with ``sender``.

    Args:
        sender: the storage's side (see :class:`Sender`).
        coalesce: batch requests that arrive while others are in flight; without, every
            request goes out alone, as soon as it arrives.
        max_in_flight: batches in flight at once (while coalescing).
        max_batch: the most requests in one batch.
        one_algorithm: a batch holds requests of one algorithm only (the first waiting
            request's); the others go out in another batch.
        split_min: waiting requests from which a lone batch splits in two (``None``:
            never; see the module doc).
        handoff_max: batches a task sends in a row on its session (1: no hand-off).
        clock: the clock round trips are timed with (``time.perf_counter``).

    Attributes:
        batches: batches sent that count as one (see :meth:`Sender.send`).
        batched_requests: the requests those batches decided.
    """

    def __init__(
        self,
        sender: Sender[S],
        *,
        coalesce: bool,
        max_in_flight: int,
        max_batch: int,
        one_algorithm: bool = False,
        split_min: int | None = None,
        handoff_max: int = 1,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._sender = sender
        self.coalesce = coalesce
        self.max_in_flight = max_in_flight if coalesce else 1 << 30
        self.max_batch = max_batch
        self.one_algorithm = one_algorithm
        self.split_min = split_min
        self.handoff_max = handoff_max
        self.batches = 0
        self.batched_requests = 0
        self._closing = False
        self._in_flight = 0
        self._pending: list[Request] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._starting = 0  # tasks started that have not taken their batch yet
        self._opening = 0  # tasks holding a batch while they wait for a session
        self._deadlines = Deadlines(sender.out_of_budget)
        self._clock = clock
        self._errors = 0  # requests failed by their batch
        self._round_trip = Histogram(ROUND_TRIP_BUCKETS)
        self._batch_size = Histogram(BATCH_SIZE_BUCKETS)

    def submit(
        self,
        algorithm: str,
        hits: Sequence[Hit],
        now: int | None,
        timeout: float | None,
    ) -> Request:
        """Queue a request; its future is settled when its ``result`` is set, when its
        batch fails (``StorageError``), or ``timeout`` seconds from now if neither happened
        by then (:meth:`Sender.out_of_budget`). Await the future, then read ``result``."""
        request = Request(hits, now, algorithm, asyncio.get_running_loop().create_future())
        self._pending.append(request)
        self._dispatch()
        if timeout is not None:
            self._deadlines.add(request.future, timeout)
        return request

    async def close(self, timeout: float) -> None:  # noqa: ASYNC109 - a wait, not a budget
        """Start no more batches; let those in flight finish for up to ``timeout`` seconds,
        then cancel them; fail the requests still queued (:meth:`Sender.closed`). (The deadline
        timers stay armed: callers waiting for a batch still get their timeout within
        their own budget.)"""
        self._closing = True
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in self._tasks:
                task.cancel()
        pending, self._pending = self._pending, []
        for request in pending:
            if not request.future.done():
                request.future.set_exception(self._sender.closed())

    def figures(self) -> BatchFigures:
        """Errors, timeouts, round-trip times and batch sizes so far (see the module doc)."""
        return BatchFigures(
            self._errors,
            self._deadlines.expired,
            self._round_trip.snapshot(),
            self._batch_size.snapshot(),
        )

    def snapshot(self) -> SchedulerSnapshot:
        return SchedulerSnapshot(
            self._in_flight,
            self._starting,
            len(self._tasks),
            len(self._pending),
            self._deadlines.snapshot(),
        )

    def _dispatch(self) -> None:
        """Start tasks while fewer than ``max_in_flight`` are running (while coalescing,
        one task at a time waits to take a batch)."""
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
            # Cancelled before its first step (say, a shutdown cancelling every task):
            # _run never settled its counters, and would otherwise hold a slot forever.
            self._starting -= 1
            self._in_flight -= 1
            if not self._closing:
                self._dispatch()

    def _take(self) -> list[Request]:
        """The next batch: waiting requests in arrival order, at most ``max_batch`` (one
        when not coalescing), of the first one's algorithm if ``one_algorithm``."""
        self._starting -= 1
        pending = [r for r in self._pending if not r.future.done()]
        limit = self.max_batch if self.coalesce else 1
        split_min = self.split_min
        if (
            split_min is not None
            and len(pending) >= split_min
            and self._in_flight == 1
            and self.max_in_flight > 1
        ):
            limit = min(limit, (len(pending) + 1) // 2)  # the split (see the module doc)
        if not self.one_algorithm or not pending:
            self._pending = pending[limit:]
            return pending[:limit]
        algorithm = pending[0].algorithm
        batch: list[Request] = []
        rest: list[Request] = []
        for request in pending:
            if request.algorithm == algorithm and len(batch) < limit:
                batch.append(request)
            else:
                rest.append(request)
        self._pending = rest
        return batch

    async def _run(self, started: list[bool]) -> None:
        started.append(True)
        batch = self._take()
        self._dispatch()  # what did not fit goes out at once in another task
        opening = False  # holding a batch while waiting for a session (see _hand_over)
        try:
            if batch:
                opening = True
                self._opening += 1
                async with self._sender.session() as session:
                    opening = False
                    self._opening -= 1
                    for run in range(1, self.handoff_max + 1):
                        await self._settle(session, batch)
                        batch = []
                        if run == self.handoff_max or not self._hand_over():
                            break
                        batch = await self._next_batch()
                        if not batch:
                            break
        except BaseException as exc:
            error = exc if isinstance(exc, StorageError) else self._sender.failure(exc)
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(error)
                    self._errors += 1
            if not isinstance(exc, Exception):
                raise
        finally:
            if opening:
                self._opening -= 1
            self._in_flight -= 1
            if self._pending and not self._closing:
                self._dispatch()

    async def _next_batch(self) -> list[Request]:
        """The hand-off: this task takes the next batch on the session it holds. The
        callers just answered re-arrive first (they were woken before this task resumes),
        as they would for a new task."""
        self._starting += 1
        try:
            await asyncio.sleep(0)
        except BaseException:
            self._starting -= 1
            raise
        batch = self._take()
        self._dispatch()
        return batch

    def _hand_over(self) -> bool:
        """Whether a task that just answered its batch keeps its session for the next
        one: while coalescing, when no other task is about to take a batch."""
        return (
            self.coalesce
            and not self._closing
            and self._starting == 0
            # a batch already taken waits for a session: this one gives its own back
            # (first come, first served), or that batch would wait up to handoff_max
            # batches while later arrivals are answered
            and self._opening == 0
        )

    async def _settle(self, session: S, batch: list[Request]) -> None:
        """Send ``batch`` and wake its callers."""
        # Requests whose callers gave up while we waited for a session are dropped, so an
        # answer already given (on_storage_error) is never charged.
        live = [r for r in batch if not r.future.done()]
        if live:
            started = self._clock()
            counts = await self._sender.send(session, live)
            self._round_trip.observe(self._clock() - started)
            self._batch_size.observe(len(live))
            if counts:
                self.batches += 1
                self.batched_requests += len(live)
        for request in batch:
            if not request.future.done():
                request.future.set_result(None)
