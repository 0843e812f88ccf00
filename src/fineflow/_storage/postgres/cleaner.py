"""Background cleanup, for databases without pg_cron: ``PostgresStorage(cleanup_every=...)``.

Theory of operation
-------------------
While the storage is open, one task it owns sleeps ``every`` seconds, then runs one cleanup
round, and again. A round takes a session-level advisory lock (``pg_try_advisory_lock``) on
one pooled connection and deletes expired rows in bounded batches on it; when another
instance holds the lock, the round is skipped, so across processes one instance at a time
does the work. The lock is released after the round (and by the server if the connection
is lost).

Errors never reach a caller: the first failure of a burst is logged as a warning, later
ones of the same burst only at debug level, and the first round that works again says so.
``stop()`` cancels the task and waits for it; a statement in flight is cancelled on the
server by psycopg, and the lock released.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..._logfields import error_text, log_extra

__all__ = ["Cleaner", "CleanerSnapshot"]

logger = logging.getLogger("fineflow.storage")

# One round: the rows deleted, or None when another instance holds the lock.
Round = Callable[[], Awaitable[int | None]]


@dataclass(frozen=True, slots=True)
class CleanerSnapshot:
    """The background cleanup's counters at one instant.

    Attributes:
        rounds: rounds this instance ran (it held the lock).
        skipped: rounds skipped because another instance held the lock.
        removed: rows those rounds deleted.
        failures: rounds that failed.
    """

    rounds: int
    skipped: int
    removed: int
    failures: int


class Cleaner:
    """Runs ``run`` every ``every`` seconds in a task of its own, between ``start()`` and
    ``stop()``.

    Args:
        run: one round (see :data:`Round`).
        every: seconds between rounds.
        name: what the log lines call it (the schema).
    """

    def __init__(self, run: Round, every: float, name: str) -> None:
        self.every = every
        self._run = run
        self._name = name
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self._rounds = self._skipped = self._removed = self._failures = 0

    def start(self) -> None:
        """Start the task (on the running loop); idempotent."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._loop(), name=f"fineflow-cleanup-{self._name}"
            )

    async def stop(self) -> None:
        """Cancel the task and wait until it has finished."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def snapshot(self) -> CleanerSnapshot:
        """The counters now."""
        return CleanerSnapshot(self._rounds, self._skipped, self._removed, self._failures)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            await self._round()

    async def _round(self) -> None:
        try:
            removed = await self._run()
        except Exception as exc:  # never raised into anyone: logged once per burst
            self._failures += 1
            error = error_text(exc)
            extra = log_extra("storage_cleanup_failed", storage="PostgresStorage", error=error)
            if self._failing:
                logger.debug(
                    "background cleanup of %r failed again: %s", self._name, error, extra=extra
                )
            else:
                self._failing = True
                logger.warning(
                    "background cleanup of %r failed: %s (retrying every %gs; logged once "
                    "until it works again)",
                    self._name,
                    error,
                    self.every,
                    extra=extra,
                )
            return
        if self._failing:
            self._failing = False
            logger.info(
                "background cleanup of %r works again",
                self._name,
                extra=log_extra("storage_cleanup_recovered", storage="PostgresStorage"),
            )
        if removed is None:
            self._skipped += 1
        else:
            self._rounds += 1
            self._removed += removed
