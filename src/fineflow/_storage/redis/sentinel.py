"""Redis Sentinel URLs: ``redis+sentinel://[[user]:password@]host:port[,host:port…]/service[/db]``.

The sentinels are asked for the current master of ``service``; the client (redis-py's
``Sentinel.master_for``) asks them again when a connection to the master fails, so after a
failover new connections go to the promoted replica. The password in the URL is the
master's; the sentinels are reached without one (pass a client you build yourself for
anything else).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError

from ..._errors import ConfigurationError

__all__ = ["SENTINEL_SCHEME", "SentinelURL", "close_sentinel", "master_client"]

SENTINEL_SCHEME = "redis+sentinel"
_FORM = "redis+sentinel://[[user]:password@]host:port[,host:port...]/service_name[/db]"


@dataclass(frozen=True, slots=True)
class SentinelURL:
    """A parsed ``redis+sentinel://`` URL."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> SentinelURL:
        """Parse ``url``.

        Raises:
            ConfigurationError: for a URL not of the form above.
        """
        parts = urlsplit(url)
        if parts.scheme.lower() != SENTINEL_SCHEME:
            raise ConfigurationError(f"not a Sentinel URL: use {_FORM}")
        userinfo, _, hosts = parts.netloc.rpartition("@")
        username, _, password = userinfo.partition(":")
        sentinels = tuple(_address(one) for one in hosts.split(",") if one)
        path = [p for p in parts.path.split("/") if p]
        if not sentinels or not 1 <= len(path) <= 2:
            raise ConfigurationError(f"invalid Sentinel URL {_shown(url)!r}: use {_FORM}")
        db = path[1] if len(path) == 2 else "0"
        if not db.isdigit():
            raise ConfigurationError(f"invalid database {db!r} in Sentinel URL: use {_FORM}")
        return cls(
            sentinels,
            unquote(path[0]),
            int(db),
            unquote(username) or None,
            unquote(password) or None,
        )


def master_client(url: SentinelURL, options: dict[str, Any]) -> tuple[aioredis.Redis, Sentinel]:
    """A client of the service's current master (connecting on first use) and the
    ``Sentinel`` it asks; close both with :func:`close_sentinel` after the client."""
    sentinel_options = {k: v for k, v in options.items() if k.startswith("socket_")}
    sentinel = Sentinel(list(url.sentinels), sentinel_kwargs=sentinel_options)
    client = sentinel.master_for(
        url.service, db=url.db, username=url.username, password=url.password, **options
    )
    return client, sentinel


async def close_sentinel(sentinel: Sentinel) -> None:
    """Close the connections to the sentinels."""
    for one in sentinel.sentinels:
        with contextlib.suppress(RedisError, OSError):
            await one.aclose()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigurationError(f"invalid sentinel address {text!r}: use host:port in {_FORM}")
    return host.strip("[]"), int(port)


def _shown(url: str) -> str:
    return url.split("@")[-1][:80]  # (never echo a password)
