"""The one place where redis-py's errors become fineflow's.

A lost connection, a timeout, a cluster that is down, MOVED/ASK that redis-py could not
follow, TRYAGAIN, a script error: each becomes :class:`fineflow.StorageError` (with the
driver's error as ``__cause__``), so the limiter's ``on_storage_error`` and storage breaker
apply. A decision that runs out of its time budget is a :class:`DecisionTimeout`, both a
``StorageError`` and a ``TimeoutError`` (the limiter counts it as a timeout).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from redis.exceptions import RedisError

from ..._errors import StorageError

__all__ = ["DecisionTimeout", "storage_error", "translated"]


class DecisionTimeout(StorageError, TimeoutError):
    """The decision ran out of its time budget (a ``StorageError`` and a ``TimeoutError``)."""


def storage_error(what: str, exc: BaseException) -> StorageError:
    """The one translation of a driver error (connection lost, timeout, MOVED/ASK, a cluster
    that is down, a script error) into :class:`StorageError`."""
    if isinstance(exc, StorageError):
        return exc
    brief = str(exc).partition("\n")[0] or type(exc).__name__
    error = StorageError(f"{what} failed: {type(exc).__name__}: {brief}")
    error.__cause__ = exc
    return error


@contextlib.contextmanager
def translated(what: str) -> Iterator[None]:
    try:
        yield
    except (RedisError, OSError) as exc:
        raise storage_error(what, exc) from exc
