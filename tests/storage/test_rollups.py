"""The per-minute request counts kept in process (pure: no I/O, time passed in) and the
flusher's bookkeeping around a write that fails (the write is a function given to it)."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest

from fineflow import ConfigurationError, Hit, Quota
from fineflow._ratelimit.algorithms import NS
from fineflow._storage.flusher import Flusher, FlushSnapshot
from fineflow._storage.rollups import (
    MINUTE_NS,
    Cell,
    Rollups,
    check_by,
    check_interval,
    check_retention,
    check_since,
    since_minute,
)

Q = Quota(5, 60.0)
M = 28_333_333  # a minute, in minutes since the epoch


def at(minute: int, second: int = 0) -> int:
    return minute * MINUTE_NS + second * NS


def test_a_request_counts_once_per_endpoint_and_tier() -> None:
    rollups = Rollups()
    rollups.count([Hit("k", Q, 1, "/a", "free")], True, at(M))
    rollups.count(
        [Hit("k", Q, 1, "/a", "free"), Hit("k", Quota(9, 1.0), 7, "/a", "free")], False, at(M, 59)
    )
    rollups.count([Hit("k", Q, 1, "/a"), Hit("g", Q, 1, "/b")], True, at(M + 1))
    rollups.count([Hit("k", Q, 0, "/a", "free")], True, at(M))  # a peek: nothing
    rollups.count([Hit("k", Q, 0, "/c"), Hit("k", Q, 1, "/a")], True, at(M + 1))
    assert rollups.cells() == [
        Cell(M, "/a", "free", 1, 1),
        Cell(M + 1, "/a", "", 2, 0),
        Cell(M + 1, "/b", "", 1, 0),
    ]
    assert len(rollups) == 3


def test_the_bound_drops_the_oldest_minute_and_counts_what_it_dropped() -> None:
    rollups = Rollups(max_cells=3)
    for endpoint in ("/a", "/b"):
        rollups.count([Hit("k", Q, 1, endpoint)], True, at(M))
        rollups.count([Hit("k", Q, 1, endpoint)], False, at(M))
    rollups.count([Hit("k", Q, 1, "/a")], True, at(M + 1))
    rollups.count([Hit("k", Q, 1, "/b")], True, at(M + 1))  # a fourth cell: M goes
    assert rollups.dropped == 4
    assert [c.minute for c in rollups.cells()] == [M + 1, M + 1]
    rollups.count([Hit("k", Q, 1, "/c")], True, at(M + 1))
    rollups.count([Hit("k", Q, 1, "/d")], True, at(M + 1))  # full, nothing older: this one
    assert rollups.dropped == 5
    assert [c.endpoint for c in rollups.cells()] == ["/a", "/b", "/c"]


def test_drain_restore_and_prune() -> None:
    rollups = Rollups(max_cells=2)
    rollups.count([Hit("k", Q, 1, "/a")], True, at(M))
    cells = rollups.drain()
    assert (cells, len(rollups), rollups.cells()) == ([Cell(M, "/a", "", 1, 0)], 0, [])
    rollups.count([Hit("k", Q, 1, "/a")], False, at(M))
    rollups.count([Hit("k", Q, 1, "/b")], True, at(M + 5))
    rollups.restore(cells)  # merged into its cell: still two
    assert rollups.cells() == [Cell(M, "/a", "", 1, 1), Cell(M + 5, "/b", "", 1, 0)]
    rollups.restore([Cell(M + 6, "/c", "", 3, 0)])  # beyond the bound: the oldest goes
    assert rollups.dropped == 2
    assert rollups.prune(M + 6) == 1
    assert rollups.cells() == [Cell(M + 6, "/c", "", 3, 0)]


def test_checks_of_since_by_and_the_options() -> None:
    assert check_since(None) is None
    assert check_since(timedelta(hours=1)) == check_since(3600) == 3600.0
    for bad in (0, -1, float("nan"), float("inf"), True, "1h"):
        with pytest.raises(ValueError, match="since must be seconds > 0"):
            check_since(bad)
    assert check_by(["tier", "endpoint"]) == ("endpoint", "tier")
    assert check_by("tier") == ("tier",)
    assert check_by(()) == ()
    for wrong in (["user"], None, 3):
        with pytest.raises(ValueError, match="by must be a sequence of 'endpoint'"):
            check_by(wrong)
    assert since_minute(None, at(M)) is None
    assert since_minute(60.0, at(M, 30)) == M - 1
    assert check_retention(timedelta(days=1)) == 86400.0
    with pytest.raises(ConfigurationError, match="stats_retention"):
        check_retention(59)
    assert check_interval("stats_flush_every", None) is None
    with pytest.raises(ConfigurationError, match="stats_flush_every must be seconds > 0"):
        check_interval("stats_flush_every", -5)


class Store:
    """Where a flusher writes: fails while ``down``."""

    def __init__(self) -> None:
        self.down = True
        self.cells: list[Cell] = []

    async def write(self, cells: list[Cell]) -> None:
        if self.down:
            raise OSError("the database is down")
        self.cells += cells


@pytest.mark.anyio
async def test_a_failing_write_keeps_the_counts_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rollups, store = Rollups(), Store()
    flusher = Flusher(rollups, store.write, None, "test")
    rollups.count([Hit("k", Q, 1, "/a")], True, at(M))
    with caplog.at_level(logging.DEBUG, logger="fineflow.storage"):
        assert not await flusher.flush()
        rollups.count([Hit("k", Q, 1, "/a")], False, at(M))
        assert not await flusher.flush()
        assert flusher.snapshot().failures == 2
        store.down = False
        assert await flusher.flush()
        assert await flusher.flush()  # nothing pending: nothing written
    assert store.cells == [Cell(M, "/a", "", 1, 1)]
    assert flusher.snapshot() == FlushSnapshot(1, 2, 0, 0)
    levels = [r.levelno for r in caplog.records]
    assert levels == [logging.WARNING, logging.DEBUG, logging.INFO]


@pytest.mark.anyio
async def test_stop_writes_the_rest_or_says_what_it_lost(caplog: pytest.LogCaptureFixture) -> None:
    rollups, store = Rollups(), Store()
    store.down = False
    flusher = Flusher(rollups, store.write, 3600.0, "test")
    flusher.start()
    rollups.count([Hit("k", Q, 1, "/a")], True, at(M))
    await flusher.stop()
    assert store.cells == [Cell(M, "/a", "", 1, 0)]
    store.down = True
    rollups.count([Hit("k", Q, 1, "/a"), Hit("k", Q, 1, "/b")], True, at(M))
    await flusher.stop()
    assert flusher.snapshot().dropped == 2
    assert "2 requests' counts could not be written at close" in caplog.text
