"""psycopg's errors become :class:`fineflow.StorageError` here, and only here."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import psycopg
from psycopg import errors

from ..._errors import StorageError

__all__ = ["brief", "driver_errors", "one_line", "out_of_budget", "storage_error"]

# What a statement gets when fineflow's schema, function or view is not there: the schema
# was never migrated (or not since an upgrade that added a function).
_NOT_MIGRATED = (errors.InvalidSchemaName, errors.UndefinedFunction, errors.UndefinedTable)
_NOT_MIGRATED_HINT = "is the schema migrated? run `fineflow migrate` (or `await storage.migrate()`)"


# SQLSTATE classes whose DETAIL quotes row values ("Failing row contains (...)", "Key
# (key, ...)=(...)"): rate-limit keys, of this request or of others batched with it.
_ROW_DATA_CLASSES = ("22", "23")


def brief(exc: psycopg.Error) -> str:
    """The message, DETAIL and HINT of ``exc`` without the CONTEXT, which for an error inside
    fineflow's functions quotes the whole statement (kilobytes per log line), and without
    a DETAIL that quotes row values (keys must not reach logs); the full error stays on
    ``__cause__``."""
    detail = exc.diag.message_detail
    if (exc.sqlstate or "")[:2] in _ROW_DATA_CLASSES:
        detail = None
    parts = [str(exc).partition("\n")[0], detail, exc.diag.message_hint]
    return "; ".join(part for part in parts if part)


def one_line(exc: BaseException) -> str:
    """``exc``'s message on one line: libpq's connection errors span several (one per host
    tried, then a hint such as "Is the server running on that host ...?")."""
    return "; ".join(line.strip(" \t-") for line in str(exc).splitlines() if line.strip())


def storage_error(action: str, exc: psycopg.Error) -> StorageError:
    """The ``StorageError`` saying ``action`` failed because of ``exc`` (raise it ``from
    exc``). ``PoolTimeout`` is a psycopg error too: no connection in time. A missing schema,
    function or view says to migrate (the server's own hint, about type casts, misleads)."""
    if isinstance(exc, _NOT_MIGRATED):
        first_line = str(exc).partition("\n")[0]
        return StorageError(f"{action} failed: {first_line}; {_NOT_MIGRATED_HINT}")
    return StorageError(f"{action} failed: {brief(exc)}")


@contextlib.contextmanager
def driver_errors(action: str) -> Iterator[None]:
    """Raise :func:`storage_error` for any psycopg error inside."""
    try:
        yield
    except psycopg.Error as exc:
        raise storage_error(action, exc) from exc


def out_of_budget() -> TimeoutError:
    """What a caller whose time budget ended before its answer gets."""
    return TimeoutError("the rate-limit decision ran out of its time budget")
