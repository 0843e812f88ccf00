"""psycopg's errors become :class:`fineflow.StorageError` here, and only here."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import psycopg

from ..._errors import StorageError

__all__ = ["brief", "driver_errors", "out_of_budget", "storage_error"]


def brief(exc: psycopg.Error) -> str:
    """The message, DETAIL and HINT of ``exc`` without the CONTEXT, which for an error inside
    fineflow's functions quotes the whole statement (kilobytes per log line); the full
    error stays on ``__cause__``."""
    parts = [str(exc).partition("\n")[0], exc.diag.message_detail, exc.diag.message_hint]
    return "; ".join(part for part in parts if part)


def storage_error(action: str, exc: psycopg.Error) -> StorageError:
    """The ``StorageError`` saying ``action`` failed because of ``exc`` (raise it ``from
    exc``). ``PoolTimeout`` is a psycopg error too: no connection in time."""
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
