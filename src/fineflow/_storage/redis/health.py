"""RedisStorage's health check: ``PING``."""

from __future__ import annotations

from redis.exceptions import RedisError

from ..base import StorageHealth
from ..probe import closed, probe
from .admin import Client

__all__ = ["check_health"]


def _brief(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).partition(chr(10))[0]}"


async def check_health(
    client: Client | None,
    timeout: float,  # noqa: ASYNC109 - the budget of this one check
) -> StorageHealth:
    """The server's health: an answer to ``PING`` within ``timeout`` seconds."""
    if client is None:
        return closed("redis")
    return await probe("redis", client.ping, timeout, (RedisError, OSError), _brief)
