"""What rate limiting reads from the environment: the off switch and the default storage.

Both are read **once, when a middleware (or dependency, or decorator) is built**, never per
request: a request path that reads ``os.environ`` costs a lookup on every request and can
change behaviour half-way through a running server, which no other option of the
middleware does. Tests set the variables before they build their app
(``monkeypatch.setenv("FINEFLOW_ENABLED", "0")``, then ``create_app()``).

``FINEFLOW_ENABLED``
    ``0``, ``false``, ``no`` or ``off`` (any case) turns every limit off; ``1``, ``true``,
    ``yes``, ``on`` or empty/unset leaves them on. Anything else is a
    :class:`~fineflow.ConfigurationError` (a typo must not silently leave limits on, or off).
    The switch only turns limits *off*: ``enabled=False`` in code is not overridden by it.
``FINEFLOW_STORAGE_URL``
    the default storage, through :func:`fineflow.storage_from_url`.
``FINEFLOW_DSN``
    else, a :class:`~fineflow.PostgresStorage` on that DSN.
"""

from __future__ import annotations

import os

from .._errors import ConfigurationError
from .._storage.base import Storage
from .._storage.url import storage_from_url

__all__ = ["DSN_VAR", "ENABLED_VAR", "STORAGE_URL_VAR", "default_storage", "limits_enabled"]

ENABLED_VAR = "FINEFLOW_ENABLED"
STORAGE_URL_VAR = "FINEFLOW_STORAGE_URL"
DSN_VAR = "FINEFLOW_DSN"

_OFF = frozenset({"0", "false", "no", "off"})
_ON = frozenset({"", "1", "true", "yes", "on"})


def limits_enabled(enabled: bool = True) -> bool:
    """Whether limits apply: ``enabled`` unless ``FINEFLOW_ENABLED`` turns them off.

    Raises:
        ConfigurationError: for a value of ``FINEFLOW_ENABLED`` that is neither on nor off.
    """
    value = os.environ.get(ENABLED_VAR, "").strip().lower()
    if value in _OFF:
        return False
    if value not in _ON:
        raise ConfigurationError(
            f"{ENABLED_VAR}={os.environ[ENABLED_VAR]!r} is neither on nor off; set it to 0 "
            "(limits off) or 1 (limits on), or unset it"
        )
    return bool(enabled)


def default_storage() -> Storage:
    """The storage the environment names, not yet opened.

    Raises:
        ConfigurationError: when neither ``FINEFLOW_STORAGE_URL`` nor ``FINEFLOW_DSN`` is
            set, or for a URL :func:`fineflow.storage_from_url` rejects.
    """
    url = os.environ.get(STORAGE_URL_VAR, "").strip()
    if url:
        return storage_from_url(url)
    dsn = os.environ.get(DSN_VAR, "").strip()
    if dsn:
        from .._storage.postgres.storage import PostgresStorage  # (psycopg: only when used)

        return PostgresStorage(dsn)
    raise ConfigurationError(
        "no storage: pass storage=PostgresStorage(dsn) / MemoryStorage() or "
        f"limiter=RateLimiter(storage), or set {STORAGE_URL_VAR} (e.g. "
        f"postgresql://…, redis://…, memory://) or {DSN_VAR} (a PostgreSQL DSN)"
    )
