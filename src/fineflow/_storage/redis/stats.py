"""Stats of a RedisStorage: per-minute request counters by endpoint and tier, never a scan.

The sender counts each batch's requests in process once the script has answered
(:class:`~fineflow._storage.rollups.Rollups`: per minute of this process's clock, endpoint
and tier). Every ``flush_every`` seconds, before every ``stats()`` read and at close, a
:class:`~fineflow._storage.flusher.Flusher` adds them in one pipeline:

* ``{prefix}:s:<minute>``: one hash per minute (minutes since the epoch), fields
  ``a\\0<endpoint>\\0<tier>`` and ``d\\0<endpoint>\\0<tier>`` (``HINCRBY``), ``PEXPIRE``\\d
  ``retention`` after its last write;
* ``{prefix}:s:minutes``: a sorted set of the minutes (score = member), so a read finds
  its hashes without a scan; minutes older than the retention (before the newest minute
  written) are trimmed at each write.

On Redis Cluster each of these keys lives in the slot of its own name: a flush is a
cluster pipeline, a few commands to a few nodes every few seconds, none on a request's
path. A flush that fails is retried with the next one; if the connection broke after the
server applied part of it, those counts may be added twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import timedelta

from ..._errors import StorageError
from ..base import StatsPoint, StatsRow, storage_key
from ..flusher import Flusher, FlushSnapshot
from ..rollups import Cell, Rollups, check_by, check_since, series, since_minute, totals
from .admin import Client
from .errors import translated
from .scripts import tier_text

__all__ = ["RedisStats"]

_SEP = "\x00"


class RedisStats:
    """The per-minute request counts of one RedisStorage.

    Args:
        client: gives the storage's client (raises when the storage is not open).
        prefix: the storage's prefix.
        retention: seconds a minute's counts are kept.
        flush_every: seconds between writes; ``None``: requests are not counted.
    """

    def __init__(
        self,
        client: Callable[[], Client],
        prefix: str,
        *,
        retention: float,
        flush_every: float | None,
    ) -> None:
        self.retention = retention
        self.counting = flush_every is not None
        self.rollups = Rollups()
        self._client = client
        self._minute = f"{prefix}:s:"
        self._index = f"{prefix}:s:minutes"
        self._flusher = Flusher(self.rollups, self._write, flush_every, prefix)

    def start(self) -> None:
        """Start writing every ``flush_every`` seconds."""
        self._flusher.start()

    async def stop(self) -> None:
        """Stop the writes, and write what is left (the client must still be open)."""
        await self._flusher.stop()

    def snapshot(self) -> FlushSnapshot:
        """The flusher's counters."""
        return self._flusher.snapshot()

    async def stats(
        self, since: float | timedelta | None, by: Sequence[str], now: int | None
    ) -> list[StatsRow]:
        """See :meth:`fineflow.RedisStorage.stats`."""
        groups = check_by(by)
        return totals(await self._cells(check_since(since), now), groups)

    async def series(
        self, since: float | timedelta | None, by: Sequence[str], now: int | None
    ) -> list[StatsPoint]:
        """See :meth:`fineflow.RedisStorage.stats_series`."""
        groups = check_by(by)
        return series(await self._cells(check_since(since), now), groups)

    async def _cells(self, since: float | None, now: int | None) -> list[Cell]:
        await self._flusher.flush()
        client = self._client()
        with translated("stats query"):
            if since is not None and now is None:
                seconds, micros = await client.time()
                now = seconds * 1_000_000_000 + micros * 1000
            first = since_minute(since, now if now is not None else time.time_ns())
            found: list[bytes] = await client.zrangebyscore(  # type: ignore[assignment]
                self._index, "-inf" if first is None else first, "+inf"
            )
            minutes = [int(m) for m in found]
            pipe = client.pipeline(transaction=False)
            for minute in minutes:
                pipe.hgetall(f"{self._minute}{minute}")
            hashes = await pipe.execute() if minutes else []
        return [
            cell
            for minute, fields in zip(minutes, hashes, strict=True)
            for cell in _decode(minute, fields)
        ]

    async def _write(self, cells: list[Cell]) -> None:
        keep = round(self.retention * 1000)
        pipe = self._client().pipeline(transaction=False)
        minutes = sorted({c.minute for c in cells})
        for cell in cells:
            group = f"{_SEP}{storage_key(cell.endpoint)}{_SEP}{tier_text(cell.tier)}"
            name = f"{self._minute}{cell.minute}"
            if cell.allowed:
                pipe.hincrby(name, f"a{group}", cell.allowed)
            if cell.denied:
                pipe.hincrby(name, f"d{group}", cell.denied)
        for minute in minutes:
            pipe.pexpire(f"{self._minute}{minute}", keep)
        pipe.zadd(self._index, {str(m): m for m in minutes})
        oldest = minutes[-1] - int(self.retention // 60)
        pipe.zremrangebyscore(self._index, "-inf", f"({oldest}")
        pipe.pexpire(self._index, keep)
        with translated("writing the stats"):
            await pipe.execute()


def _decode(minute: int, fields: dict[bytes, bytes]) -> list[Cell]:
    counts: dict[tuple[str, str], list[int]] = {}
    for name, value in fields.items():
        kind, endpoint, tier = name.decode("utf-8", "replace").split(_SEP, 2)
        if kind not in ("a", "d"):
            raise StorageError(f"unexpected field {name!r:.100} in the stats of minute {minute}")
        counts.setdefault((endpoint, tier), [0, 0])[kind == "d"] += int(value)
    return [Cell(minute, e, t, a, d) for (e, t), (a, d) in sorted(counts.items())]
