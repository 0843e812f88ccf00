"""PostgreSQL's side of coalescing (:mod:`fineflow._storage.coalescing`): a batch is one
statement on a pooled connection.

* A batch holds requests of one algorithm: one statement decides one algorithm.
* **Split.** With nothing else in flight, ``_SPLIT_MIN`` or more waiting requests go out as
  two statements of half each: the database runs one while this process handles the
  other's results.
* **Hand-off.** A task that answered its batch keeps its connection (and cursor) for the
  next batch, at most ``_HANDOFF_MAX`` batches in a row, so the pool's checks and
  lifetimes still apply.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg

from ..._errors import StorageClosedError, StorageError
from ..coalescing import Request, Scheduler
from .errors import out_of_budget, storage_error

__all__ = ["StatementSender", "statement_scheduler"]

# Pending requests from which a lone statement splits its batch in two (below, the second
# statement's fixed cost outweighs the overlap it buys).
_SPLIT_MIN = 4
# Batches a statement task runs in a row on the connection it holds before it gives the
# connection back to the pool.
_HANDOFF_MAX = 64

Cursor = psycopg.AsyncCursor[Any]
Connect = Callable[[], contextlib.AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]]
# Decides one batch with a cursor; returns the name of the function that decided it.
Run = Callable[[Cursor, str, list[Request]], Awaitable[str]]


class StatementSender:
    """Sends a batch as one statement (a :class:`~fineflow._storage.coalescing.Sender`).

    Args:
        connect: gives a pooled connection as an async context manager.
        run: decides one batch on a cursor (see :class:`~.statements.Decider`).
    """

    def __init__(self, connect: Connect, run: Run) -> None:
        self._connect = connect
        self._run = run

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[Cursor]:
        async with self._connect() as conn:
            # One cursor for every batch on this connection: psycopg builds a new one per
            # conn.execute() (about a fifth of its client work per statement).
            yield conn.cursor()

    async def send(self, session: Cursor, batch: list[Request]) -> bool:
        """Decide ``batch``; a lone request decided by ``hit()`` is not a batch."""
        return await self._run(session, batch[0].algorithm, batch) != "hit"

    def failure(self, exc: BaseException) -> StorageError:
        if isinstance(exc, psycopg.Error):
            error = storage_error("rate-limit decision", exc)
        else:
            error = StorageError(f"{exc!r}")
        error.__cause__ = exc
        return error

    def out_of_budget(self) -> BaseException:
        return out_of_budget()

    def closed(self) -> StorageError:
        return StorageClosedError("PostgresStorage was closed")


def statement_scheduler(
    connect: Connect, run: Run, *, coalesce: bool, max_in_flight: int, max_batch: int
) -> Scheduler[Cursor]:
    """The coalescing scheduler of a :class:`PostgresStorage` (see the module doc)."""
    return Scheduler(
        StatementSender(connect, run),
        coalesce=coalesce,
        max_in_flight=max_in_flight,
        max_batch=max_batch,
        one_algorithm=True,
        split_min=_SPLIT_MIN,
        handoff_max=_HANDOFF_MAX,
    )
