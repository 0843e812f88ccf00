"""``storage_from_url``: a storage chosen by the scheme of a URL."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from .._errors import ConfigurationError
from .base import Storage
from .memory import MemoryStorage

if TYPE_CHECKING:
    from .postgres.storage import PostgresStorage
    from .redis.storage import RedisStorage

__all__ = ["storage_from_url"]

_FORMS = (
    "postgresql:// or postgres:// (PostgresStorage), redis://, rediss:// or unix:// "
    "(RedisStorage), redis+cluster:// (RedisStorage on a Redis Cluster), redis+sentinel:// "
    "(RedisStorage on the master of a Sentinel service), memory:// (MemoryStorage)"
)


def storage_from_url(url: str) -> Storage:
    """The storage a URL names, not yet opened.

    ========================================  ===========================================
    ``postgresql://…``, ``postgres://…``      :class:`PostgresStorage` (the URL is its DSN)
    ``redis://…``, ``rediss://…``, ``unix://…``  :class:`RedisStorage`
    ``redis+cluster://host:port``             :class:`RedisStorage` with ``cluster=True``
    ``redis+sentinel://host:port/service``    :class:`RedisStorage` on the service's master
    ``memory://``                             :class:`MemoryStorage`
    ========================================  ===========================================

    Raises:
        ConfigurationError: for any other scheme, or a URL the storage rejects.
    """
    if not isinstance(url, str):
        raise ConfigurationError(f"storage URL must be a string, got {type(url).__name__}")
    scheme = urlsplit(url.strip()).scheme.lower()
    if scheme in ("postgresql", "postgres"):
        return _postgres(url)
    if scheme in ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster", "redis+sentinel"):
        return _redis(url)
    if scheme == "memory":
        return MemoryStorage()
    shown = url.split("@")[-1][:80]  # (never echo a password)
    raise ConfigurationError(f"unsupported storage URL {shown!r}; use {_FORMS}")


def _postgres(url: str) -> PostgresStorage:
    from .postgres.storage import PostgresStorage

    return PostgresStorage(url)


def _redis(url: str) -> RedisStorage:
    try:
        from .redis.storage import RedisStorage
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise ConfigurationError(
            f"{url.split(':', 1)[0]}:// needs the redis package: pip install 'fineflow[redis]'"
        ) from exc
    return RedisStorage(url)
