"""Writes a networked storage's per-minute request counts every few seconds.

Theory of operation
-------------------
Decisions count their requests in a :class:`~.rollups.Rollups` in process (a few dict
operations, no I/O on the request's path). While the storage is open, a task it owns wakes
every ``every`` seconds and :meth:`Flusher.flush`\\ es: it drains the cells and hands them to
``write`` (one statement, one pipeline). A write that fails puts its cells back (within the
bound of the rollups) for the next flush; the failure is counted, logged as a warning once
per burst (later ones at debug level), and the first flush that works again says so. No
failure reaches a caller of ``decide()``. ``stop()`` wakes the task, lets a write in
flight finish (cancelling it could not say whether the server applied it, and the counts
would be written twice), then flushes one last time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .._logfields import error_text, log_extra
from .rollups import Cell, Rollups

__all__ = ["FlushSnapshot", "Flusher"]

logger = logging.getLogger("fineflow.storage")

Write = Callable[[list[Cell]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class FlushSnapshot:
    """The stats flusher's counters at one instant.

    Attributes:
        flushes: writes that worked.
        failures: writes that failed (their counts were kept for the next one).
        pending: cells (minute, endpoint, tier) counted and not written yet.
        dropped: requests whose counts were dropped: the pending cells outgrew their bound
            while writes failed, or the last write at close failed.
    """

    flushes: int
    failures: int
    pending: int
    dropped: int


class Flusher:
    """Flushes ``rollups`` with ``write`` every ``every`` seconds between ``start()`` and
    ``stop()``, and whenever :meth:`flush` is awaited.

    Args:
        rollups: the counts to write.
        write: writes cells (raises on failure).
        every: seconds between flushes (``None``: only when asked and at ``stop()``).
        name: what the log lines call it.
    """

    def __init__(self, rollups: Rollups, write: Write, every: float | None, name: str) -> None:
        self.rollups = rollups
        self.every = every
        self._write = write
        self._name = name
        self._task: asyncio.Task[None] | None = None
        self._stopping: asyncio.Event | None = None
        self._failing = False
        self._flushes = self._failures = self._lost = 0

    def start(self) -> None:
        """Start the task (on the running loop), if ``every`` is set; idempotent."""
        if self._task is None and self.every is not None:
            self._stopping = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(
                self._loop(self.every, self._stopping), name=f"fineflow-stats-{self._name}"
            )

    async def stop(self) -> None:
        """End the task, then flush one last time (counts it cannot write are dropped and
        logged)."""
        task, self._task = self._task, None
        if task is not None and self._stopping is not None:
            self._stopping.set()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if not await self.flush():
            lost = self.rollups.drain()
            if lost:
                count = sum(c.allowed + c.denied for c in lost)
                self._lost += count
                logger.warning(
                    "stats of %r: %d requests' counts could not be written at close",
                    self._name,
                    count,
                    extra=log_extra("stats_lost_at_close", count=count),
                )

    def snapshot(self) -> FlushSnapshot:
        """The counters now."""
        return FlushSnapshot(
            self._flushes, self._failures, len(self.rollups), self.rollups.dropped + self._lost
        )

    async def flush(self) -> bool:
        """Write the pending cells now; whether that worked (nothing pending counts as
        working). Never raises but for cancellation."""
        cells = self.rollups.drain()
        if not cells:
            return True
        try:
            await self._write(cells)
        except BaseException as exc:
            self.rollups.restore(cells)
            if not isinstance(exc, Exception):
                raise
            self._failed(exc)
            return False
        self._flushes += 1
        if self._failing:
            self._failing = False
            logger.info(
                "stats of %r are written again",
                self._name,
                extra=log_extra("stats_flush_recovered"),
            )
        return True

    def _failed(self, exc: Exception) -> None:
        self._failures += 1
        if self._failing:
            logger.debug(
                "writing the stats of %r failed again: %s",
                self._name,
                error_text(exc),
                extra=log_extra("stats_flush_failed", error=error_text(exc)),
            )
            return
        self._failing = True
        logger.warning(
            "writing the stats of %r failed: %s (counts kept for the next flush; logged once "
            "until it works again)",
            self._name,
            error_text(exc),
            extra=log_extra("stats_flush_failed", error=error_text(exc)),
        )

    async def _loop(self, every: float, stopping: asyncio.Event) -> None:
        while True:
            try:
                await asyncio.wait_for(stopping.wait(), every)
            except TimeoutError:
                await self.flush()
            else:
                return
