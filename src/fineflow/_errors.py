"""The one error hierarchy of fineflow.

::

    FineflowError
    ├── ConfigurationError (also ValueError)   bad quotas, rules, options: raised at set-up
    ├── StorageError                           the rate-limit store failed or timed out
    │   └── StorageClosedError                 the storage was used before open or after close
    ├── SchemaVersionError (also StorageError) the database schema is newer than this code
    └── CircuitOpenError                       a circuit breaker rejected the call
"""

from __future__ import annotations

__all__ = [
    "CircuitOpenError",
    "ConfigurationError",
    "FineflowError",
    "SchemaVersionError",
    "StorageClosedError",
    "StorageError",
]


class FineflowError(Exception):
    """Base class of every error fineflow raises on purpose."""


class ConfigurationError(FineflowError, ValueError):
    """A configuration value is invalid; the message says how to fix it."""


class StorageError(FineflowError):
    """The rate-limit storage failed (down, slow, pool exhausted, query error)."""


class StorageClosedError(StorageError):
    """The storage was used before ``open()`` / ``async with`` or after ``close()``."""


class SchemaVersionError(StorageError):
    """The database holds a fineflow schema newer than this version of the code knows."""


class CircuitOpenError(FineflowError):
    """A circuit breaker rejected a call without running it.

    Attributes:
        name: the breaker's name.
        retry_after: seconds until the breaker will let a trial call through, or ``None``.
    """

    def __init__(self, name: str, retry_after: float | None = None) -> None:
        self.name = name
        self.retry_after = retry_after
        when = "" if retry_after is None else f"; retry after {retry_after:.3f}s"
        super().__init__(f"circuit {name!r} is open{when}")

    def __reduce__(self) -> tuple[type[CircuitOpenError], tuple[str, float | None]]:
        return (type(self), (self.name, self.retry_after))
