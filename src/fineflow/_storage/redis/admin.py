"""The administrative calls of RedisStorage: status and reset of a key's hash (the stats
are :mod:`.stats`')."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from ..._ratelimit.algorithms import ALGORITHMS, expires_at
from ..base import KeyStatus, storage_key
from .errors import translated
from .scripts import Names, Stored

__all__ = ["Client", "reset", "status"]

Client = aioredis.Redis | RedisCluster


async def status(client: Client, names: Names, key: str, now: int | None) -> list[KeyStatus]:
    """The live state of every (endpoint, quota) of ``key``, decided as a peek."""
    stored = storage_key(key)
    with translated("status query"):
        fields: dict[bytes, bytes] = await client.hgetall(names.key(stored))  # type: ignore[assignment]
        if fields and now is None:
            seconds, micros = await client.time()
            now = seconds * 1_000_000_000 + micros * 1000
    out = []
    for name, value in sorted(fields.items()):
        if name.startswith(b"~"):
            continue
        row = Stored.decode(name, value)
        assert now is not None
        if expires_at(row.algorithm, row.state, row.quota) <= now:
            continue
        decision = ALGORITHMS[row.algorithm](row.state, now, row.quota, 0)[0]
        out.append(
            KeyStatus(
                stored,
                row.endpoint,
                row.quota.policy,
                row.tier,
                row.algorithm,
                decision,
                row.allowed,
                row.denied,
            )
        )
    return out


async def reset(client: Client, names: Names, key: str, endpoint: str | None) -> int:
    """Forget ``key``'s state (of one endpoint, or all); return how many were removed."""
    name = names.key(storage_key(key))
    with translated("reset"):
        present: list[bytes] = await client.hkeys(name)  # type: ignore[assignment]
        fields = [f for f in present if not f.startswith(b"~")]
        if endpoint is None:
            await client.delete(name)
            return len(fields)
        wanted = storage_key(endpoint).encode("utf-8", "surrogatepass") + b"\x00"
        doomed = [f for f in fields if f.startswith(wanted)]
        if doomed:
            await client.hdel(name, *doomed)
        return len(doomed)
