"""Callers' time budgets: a future still waiting at its deadline fails with ``TimeoutError``.

Deadlines of one timeout come in order, so each timeout has a queue and one timer armed for
its oldest entry: an append per request, not a timer each. Whichever comes first settles the
future, the answer or the deadline (an answer that came first is never lost to a deadline
due in the same loop iteration, as it would be with ``asyncio.timeout``).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass

from .errors import out_of_budget

__all__ = ["Deadlines", "DeadlinesSnapshot"]


@dataclass(frozen=True, slots=True)
class DeadlinesSnapshot:
    """How many timeouts have a queue (and a timer), and how many futures they hold."""

    queues: int
    timers: int
    waiting: int


class Deadlines:
    """Deadline queues per timeout, with one loop timer per queue."""

    def __init__(self) -> None:
        # Per timeout: (loop time, future) in order, and the queue's timer.
        self._queues: dict[float, deque[tuple[float, asyncio.Future[None]]]] = {}
        self._timers: dict[float, asyncio.TimerHandle] = {}

    def add(self, future: asyncio.Future[None], timeout: float) -> None:
        """Fail ``future`` with ``TimeoutError`` if it is still waiting ``timeout`` seconds
        from now."""
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
                future.set_exception(out_of_budget())
        if queue:
            self._timers[timeout] = loop.call_at(queue[0][0], self._expire, loop, timeout)
        else:
            # Both go: a caller passing its remaining budget uses a new timeout every time.
            del self._timers[timeout]
            del self._queues[timeout]
