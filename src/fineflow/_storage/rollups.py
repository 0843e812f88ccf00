"""Per-minute request counts by endpoint and tier, kept in process (no I/O).

Rules
-----
* A request counts once per distinct (endpoint, tier) among its charged quotas: allowed if
  the request was admitted, denied if any of its quotas denied it (decisions are all or
  nothing, so every quota of a request shares that verdict). A pure peek (every cost 0)
  counts nothing.
* A count belongs to the minute of the decision's time (nanoseconds since the epoch; the
  caller's ``now`` when it passed one).
* The cells (minute, endpoint, tier) are bounded (``max_cells``): when a new cell would
  exceed the bound, the oldest minute's cells are dropped and counted in ``dropped``. A
  networked storage drains them every few seconds (:mod:`.flusher`) and puts them back
  when the write fails; :class:`MemoryStorage` keeps them as its statistics.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from .._errors import ConfigurationError
from .base import Hit, StatsPoint, StatsRow
from .coalescing import Request

__all__ = [
    "MINUTE_NS",
    "STATS_BY",
    "Cell",
    "Rollups",
    "check_by",
    "check_interval",
    "check_retention",
    "check_since",
    "minute_start",
    "series",
    "since_minute",
    "totals",
]

MINUTE_NS = 60_000_000_000
# The groups of stats() and stats_series() unless told otherwise.
STATS_BY: tuple[str, ...] = ("endpoint", "tier")
_GROUPS = frozenset(STATS_BY)


@dataclass(frozen=True, slots=True)
class Cell:
    """The counts of one (minute, endpoint, tier): ``minute`` in minutes since the epoch."""

    minute: int
    endpoint: str
    tier: str
    allowed: int
    denied: int


class Rollups:
    """Allowed and denied request counts per (minute, endpoint, tier), in memory.

    Args:
        max_cells: the most cells kept (see the module doc).
    """

    def __init__(self, *, max_cells: int = 100_000) -> None:
        self.max_cells = max_cells
        self.dropped = 0  # requests counted in cells dropped for the bound
        self._minutes: dict[int, dict[tuple[str, str], list[int]]] = {}
        self._minute = -1
        self._cells: dict[tuple[str, str], list[int]] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def count(self, hits: Sequence[Hit], allowed: bool, now: int) -> None:
        """Count one request decided at ``now`` (ns) with ``hits``: see the module doc."""
        minute = now // MINUTE_NS
        cells = self._cells if minute == self._minute else self._open(minute)
        if len(hits) == 1:
            hit = hits[0]
            if hit.cost:
                group = (hit.endpoint, hit.tier)
                cell = cells.get(group)
                if cell is None:
                    self._add(minute, cells, group, allowed)
                else:
                    cell[0 if allowed else 1] += 1
            return
        for group in {(h.endpoint, h.tier) for h in hits if h.cost}:
            self._add(minute, cells, group, allowed)

    def count_answered(self, batch: Sequence[Request], now: int) -> None:
        """Count the requests of ``batch`` that got their decisions (a networked storage's
        batch, once answered), at their own ``now`` or else this one."""
        for request in batch:
            result = request.result
            if result:  # (else it failed)
                at = now if request.now is None else request.now
                self.count(request.hits, all(d.allowed for d in result), at)

    def _add(
        self, minute: int, cells: dict[tuple[str, str], list[int]], group: tuple[str, str], ok: bool
    ) -> None:
        cell = cells.get(group)
        if cell is None:
            if self._size >= self.max_cells and not self._make_room(minute):
                self.dropped += 1
                return
            cell = cells[group] = [0, 0]
            self._size += 1
        cell[0 if ok else 1] += 1

    def _make_room(self, minute: int) -> bool:
        """Drop the oldest minute if it is older than ``minute``; whether it did."""
        if min(self._minutes) >= minute:
            return False
        self._drop_oldest()
        return True

    def _open(self, minute: int) -> dict[tuple[str, str], list[int]]:
        cells = self._minutes.get(minute)
        if cells is None:
            cells = self._minutes[minute] = {}
        if minute >= self._minute:
            self._minute, self._cells = minute, cells
        return cells

    def _drop_oldest(self) -> None:
        oldest = min(self._minutes)
        cells = self._minutes.pop(oldest)
        self._size -= len(cells)
        self.dropped += sum(a + d for a, d in cells.values())
        if oldest == self._minute:
            self._minute, self._cells = -1, {}

    def cells(self) -> list[Cell]:
        """Every cell, by minute, endpoint and tier."""
        return [
            Cell(minute, endpoint, tier, allowed, denied)
            for minute in sorted(self._minutes)
            for (endpoint, tier), (allowed, denied) in sorted(self._minutes[minute].items())
            if allowed or denied
        ]

    def drain(self) -> list[Cell]:
        """Every cell, which this object then forgets (to write them elsewhere)."""
        out = self.cells()
        self._minutes.clear()
        self._minute, self._cells, self._size = -1, {}, 0
        return out

    def restore(self, cells: Iterable[Cell]) -> None:
        """Add ``cells`` back (a write that failed), within the bound."""
        for cell in cells:
            group = self._open(cell.minute)
            counts = group.get((cell.endpoint, cell.tier))
            if counts is None:
                counts = group[cell.endpoint, cell.tier] = [0, 0]
                self._size += 1
            counts[0] += cell.allowed
            counts[1] += cell.denied
        while self._size > self.max_cells:
            self._drop_oldest()

    def prune(self, before: int) -> int:
        """Forget the minutes before ``before`` (minutes since the epoch); return how many
        cells went."""
        removed = 0
        for minute in [m for m in self._minutes if m < before]:
            removed += len(self._minutes.pop(minute))
            if minute == self._minute:
                self._minute, self._cells = -1, {}
        self._size -= removed
        return removed


def check_interval(name: str, seconds: object) -> float | None:
    """``seconds`` as float seconds > 0, or ``None`` (off); ``ConfigurationError`` otherwise."""
    if seconds is None:
        return None
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not (seconds > 0 and math.isfinite(seconds))
    ):
        raise ConfigurationError(
            f"{name} must be seconds > 0 (e.g. 300) or None for none, got {seconds!r}"
        )
    return float(seconds)


def check_retention(retention: object) -> float:
    """``retention`` (seconds or a ``timedelta``, at least a minute) as float seconds;
    ``ConfigurationError`` otherwise."""
    seconds = retention.total_seconds() if isinstance(retention, timedelta) else retention
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not (seconds >= 60 and math.isfinite(seconds))
    ):
        raise ConfigurationError(
            "stats_retention must be seconds >= 60 or a timedelta "
            f"(e.g. timedelta(days=7)), got {retention!r}"
        )
    return float(seconds)


def check_since(since: object) -> float | None:
    """``since`` (seconds or a ``timedelta`` back from now, or ``None``: everything kept) as
    float seconds; ``ValueError`` otherwise."""
    if since is None:
        return None
    if isinstance(since, timedelta):
        since = since.total_seconds()
    if (
        isinstance(since, bool)
        or not isinstance(since, int | float)
        or not (since > 0 and math.isfinite(since))
    ):
        raise ValueError(
            f"since must be seconds > 0 or a timedelta (e.g. 3600), or None, got {since!r}"
        )
    return float(since)


def check_by(by: object) -> tuple[str, ...]:
    """``by`` as a tuple of group names (``"endpoint"``, ``"tier"``); ``ValueError`` otherwise."""
    if isinstance(by, str):
        by = (by,)
    if not isinstance(by, Sequence) or any(name not in _GROUPS for name in by):
        raise ValueError(
            f"by must be a sequence of 'endpoint' and/or 'tier' (e.g. ('endpoint', 'tier')), "
            f"got {by!r}"
        )
    return tuple(name for name in STATS_BY if name in by)


def since_minute(since: float | None, now: int) -> int | None:
    """The first minute (since the epoch) that ``since`` seconds before ``now`` (ns) reaches:
    the one it falls in."""
    if since is None:
        return None
    return (now - round(since * 1e9)) // MINUTE_NS


def minute_start(minute: int) -> datetime:
    """The start of ``minute`` (minutes since the epoch), an aware UTC datetime."""
    return datetime.fromtimestamp(minute * 60, UTC)


def _group(cell: Cell, by: tuple[str, ...]) -> tuple[str, str]:
    return (cell.endpoint if "endpoint" in by else "", cell.tier if "tier" in by else "")


def totals(
    cells: Iterable[Cell], by: tuple[str, ...], keys: dict[tuple[str, str], int] | None = None
) -> list[StatsRow]:
    """``cells`` summed by the groups ``by`` (see :func:`check_by`), in order; ``keys`` the
    stored keys per (endpoint, tier), summed likewise."""
    sums: dict[tuple[str, str], list[int]] = {}
    for cell in cells:
        counts = sums.setdefault(_group(cell, by), [0, 0, 0])
        counts[1] += cell.allowed
        counts[2] += cell.denied
    for (endpoint, tier), stored in (keys or {}).items():
        group = sums.get(_group(Cell(0, endpoint, tier, 0, 0), by))
        if group is not None:
            group[0] += stored
    return [StatsRow(e, t, k, a, d) for (e, t), (k, a, d) in sorted(sums.items())]


def series(cells: Iterable[Cell], by: tuple[str, ...]) -> list[StatsPoint]:
    """``cells`` summed per minute and group ``by``, by minute then group."""
    sums: dict[tuple[int, str, str], list[int]] = {}
    for cell in cells:
        counts = sums.setdefault((cell.minute, *_group(cell, by)), [0, 0])
        counts[0] += cell.allowed
        counts[1] += cell.denied
    return [StatsPoint(minute_start(m), e, t, a, d) for (m, e, t), (a, d) in sorted(sums.items())]
