"""The options of :class:`~.storage.PostgresStorage`, checked at construction (no I/O)."""

from __future__ import annotations

import os
import re
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from ..._errors import ConfigurationError
from ..rollups import check_interval  # (the storages' one check of an interval)

__all__ = [
    "check_identifier",
    "check_interval",
    "check_sizes",
    "check_source",
    "check_timeout",
]

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def check_timeout(timeout: float) -> float:
    """``timeout`` as float seconds > 0; ``ValueError`` otherwise."""
    if timeout.__class__ is float and timeout > 0:
        return timeout
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        # (not > 0 refuses NaN too: it would upset the timers)
        raise ValueError(f"timeout must be seconds > 0 or None, got {timeout!r}")
    return float(timeout)


def check_identifier(what: str, name: object) -> None:
    """Refuse a schema or role name that is not a plain SQL identifier."""
    if not isinstance(name, str) or not _IDENTIFIER.match(name):
        raise ConfigurationError(
            f"{what} must be a plain SQL identifier (letters, digits, _; at most 63), got {name!r}"
        )


def check_sizes(**sizes: int) -> None:
    """Refuse sizes that are not ints >= 1, and a ``min_size`` above ``max_size``."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigurationError(f"{name} must be an int >= 1, got {value!r}")
    if sizes.get("min_size", 0) > sizes.get("max_size", 1 << 30):
        raise ConfigurationError("min_size must not exceed max_size")


_SSLMODES = {"disable", "allow", "prefer", "require", "verify-ca", "verify-full"}
_DSN_EXAMPLE = '; e.g. "host=db port=5432 dbname=app user=app" or "postgresql://app@db:5432/app"'


def check_source(dsn: str | None, pool: AsyncConnectionPool[Any] | None) -> str | None:
    """The DSN to use (``FINEFLOW_DSN`` when neither is given), checked."""
    if dsn is not None and pool is not None:
        raise ConfigurationError("give PostgresStorage a dsn or a pool, not both")
    if dsn is not None and not isinstance(dsn, str):
        raise ConfigurationError(f"dsn must be a string, got {type(dsn).__name__}")
    if dsn is None and pool is None:
        dsn = os.environ.get("FINEFLOW_DSN", "")
    if dsn is not None:
        _check_dsn(dsn)
    return dsn


def _check_dsn(dsn: str) -> None:
    """Reject at construction a DSN that no connection attempt could ever use."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        reason = str(exc).strip()
        raise ConfigurationError(f"invalid PostgreSQL DSN: {reason}{_DSN_EXAMPLE}") from None
    for port in str(params.get("port") or "").split(","):
        if port and not (port.isdigit() and 1 <= int(port) <= 65535):
            raise ConfigurationError(
                f"invalid PostgreSQL DSN: port {port!r} is not 1..65535{_DSN_EXAMPLE}"
            )
    sslmode = params.get("sslmode")
    if sslmode is not None and sslmode not in _SSLMODES:
        raise ConfigurationError(
            f"invalid PostgreSQL DSN: sslmode {sslmode!r} is not one of "
            f"{', '.join(sorted(_SSLMODES))}"
        )
