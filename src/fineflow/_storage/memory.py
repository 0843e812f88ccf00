"""In-process rate-limit storage: one process, an injected clock, a bounded number of keys.

Layout: an index ``endpoint -> policy -> key -> entry`` (a request resolves its entry with
three lookups of strings whose hashes are cached, no tuple to build and hash), plus a
queue of every entry in insertion order for eviction. Recency is approximated with the
CLOCK ("second chance") scheme: a decision only sets the entry's ``used`` bit; when the
storage is full, the entry at the front of the queue is evicted if it is expired or was not
used since the hand last passed it, else its bit is cleared and it goes to the back. Removed
entries (``reset``, ``cleanup``) are dropped from the queue lazily, and the queue is
compacted when they outnumber the live ones.

Statistics: every decision counts its request in a :class:`~.rollups.Rollups` (per minute of
the decision's time, endpoint and tier), the same counts the networked storages keep in
their tables; ``cleanup`` forgets minutes older than ``stats_retention``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta

from .._breaker.shared import BreakerStore
from .._errors import ConfigurationError, StorageClosedError
from .._logfields import log_extra
from .._ratelimit.algorithms import (
    ALGORITHMS,
    BucketState,
    Decision,
    StepFunction,
    expires_at,
    validate_algorithm,
)
from .._ratelimit.quota import Quota
from .base import (
    MAX_KEY_BYTES,
    Hit,
    KeyStatus,
    StatsPoint,
    StatsRow,
    StorageHealth,
    check_cost,
    storage_key,
)
from .memory_breakers import MemoryBreakerStore
from .probe import closed
from .rollups import (
    MINUTE_NS,
    Cell,
    Rollups,
    check_by,
    check_retention,
    check_since,
    series,
    since_minute,
    totals,
)

__all__ = ["MemoryStorage"]

logger = logging.getLogger("fineflow.storage")

_Index = dict[str, dict[str, dict[str, "_Entry"]]]  # endpoint -> policy -> key -> entry


@dataclass(slots=True, eq=False)
class _Entry:
    state: BucketState
    algorithm: str
    expires: int  # from then on, ``state`` is equivalent to no state
    tier: str
    quota: Quota
    key: str
    endpoint: str
    policy: str
    allowed: int = 0
    denied: int = 0
    used: bool = False  # CLOCK reference bit: decided on since the hand last passed it
    dead: bool = False  # removed from the index; the queue drops it when it gets there


def _key(text: str) -> str:
    if len(text) <= MAX_KEY_BYTES and text.isascii() and "\x00" not in text:
        return text
    return storage_key(text)


class MemoryStorage:
    """Rate-limit state in a dict: for a single process, tests and development.

    Decisions are atomic because they never await: each runs to completion on the event
    loop. State for different instances of a service is *not* shared: use
    :class:`PostgresStorage` for that.

    The number of entries is bounded by ``max_keys``. When a new entry would exceed it, an
    entry is evicted: expired entries (equivalent to no state) and entries not used
    recently go first, in the CLOCK approximation of least-recently-used order (an entry
    used since the last sweep gets a second chance). Expired entries cost nothing, while
    evicting live state forgets that key's usage, is counted in ``evictions`` and logged
    once. Size ``max_keys`` for your live keys to never lose state.

    Args:
        max_keys: the most (key, endpoint, quota) entries kept (default 100,000; each
            costs about 350 bytes: a million keys measured 341 MB of RSS).
        clock: a function returning nanoseconds since the epoch (default ``time.time_ns``);
            tests inject a fake one.
        stats_retention: how long the per-minute request counts are kept, in seconds or a
            ``timedelta`` (default 7 days): :meth:`cleanup` forgets older minutes. (They are
            bounded anyway: at most 100,000 (minute, endpoint, tier) cells, the oldest
            minute going first.)
    """

    def __init__(
        self,
        *,
        max_keys: int = 100_000,
        clock: Callable[[], int] = time.time_ns,
        stats_retention: float | timedelta = 7 * 86400.0,
    ) -> None:
        if isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 1:
            raise ConfigurationError(f"max_keys must be a positive int, got {max_keys!r}")
        self.max_keys = max_keys
        self.clock = clock
        self.stats_retention = check_retention(stats_retention)
        self._rollups = Rollups()
        self.evictions = 0
        self._index: _Index = {}
        self._queue: deque[_Entry] = deque()
        self._size = 0
        self._closed = False
        self._warned_eviction = False
        self._breakers = MemoryBreakerStore(lambda: self.clock() / 1e9)

    async def __aenter__(self) -> MemoryStorage:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Nothing to acquire; refuses a closed storage."""
        if self._closed:
            raise StorageClosedError("this MemoryStorage was closed; create a new one")

    async def close(self) -> None:
        """Drop all state, stop the shared breakers' background work; the storage refuses
        use afterwards."""
        self._closed = True
        await self._breakers.stop()
        self._index.clear()
        self._queue.clear()
        self._size = 0
        self._rollups.drain()

    async def migrate(self) -> None:
        """Nothing to migrate for memory storage."""

    async def health(self, *, timeout: float = 1.0) -> StorageHealth:  # noqa: ASYNC109
        """Healthy until closed (nothing to wait for; ``timeout`` is accepted for the
        :class:`SupportsHealth` protocol). What :func:`fineflow.health_app` asks."""
        return closed("memory") if self._closed else StorageHealth(True, "memory", 0.0)

    def breaker_store(self) -> BreakerStore:
        """Where ``CircuitBreaker(shared=storage)`` keeps its shared state: breakers of
        this process sharing this storage share their state (the reference semantics of
        the PostgreSQL and Redis stores)."""
        return self._breakers

    def __len__(self) -> int:
        return self._size

    async def decide(
        self,
        algorithm: str,
        hits: Sequence[Hit],
        *,
        now: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - a decision here never waits
    ) -> list[Decision]:
        """Decide ``hits`` all or nothing (see :class:`fineflow.Storage`).

        An in-process decision never waits, so ``timeout`` does not apply.
        """
        return self.decide_local(algorithm, hits, now=now)

    def decide_local(
        self, algorithm: str, hits: Sequence[Hit], *, now: int | None = None
    ) -> list[Decision]:
        """:meth:`decide` without awaiting (see :class:`fineflow.LocalStorage`).

        Each decision is a step of the reference algorithm on the stored state.
        """
        if self._closed:
            raise StorageClosedError("this MemoryStorage was closed; create a new one")
        step = ALGORITHMS.get(algorithm) or ALGORITHMS[validate_algorithm(algorithm)]
        if now is None:
            now = self.clock()
        if len(hits) != 1:
            return self._decide_all(algorithm, step, hits, now)
        hit = hits[0]
        entry = self._find(hit)
        state = None if entry is None or entry.expires <= now else entry.state
        decision, new_state = step(state, now, hit.quota, hit.cost)
        self._record(hit, entry, algorithm, decision.allowed, new_state, now)
        self._rollups.count(hits, decision.allowed, now)
        return [decision]

    def _decide_all(
        self, algorithm: str, step: StepFunction, hits: Sequence[Hit], now: int
    ) -> list[Decision]:
        """Several quotas of one request: every one is charged, or none is."""
        found = [self._find(hit) for hit in hits]
        states = [None if e is None or e.expires <= now else e.state for e in found]
        results = [step(s, now, h.quota, h.cost) for s, h in zip(states, hits, strict=True)]
        allowed = all(d.allowed for d, _ in results)
        decisions: list[Decision] = []
        for entry, hit, state, (decision, new_state) in zip(
            found, hits, states, results, strict=True
        ):
            if not allowed and decision.allowed:
                decision, _ = step(state, now, hit.quota, 0)  # what it admits: a peek
            self._record(hit, entry, algorithm, allowed, new_state if allowed else state, now)
            decisions.append(decision)
        self._rollups.count(hits, allowed, now)
        return decisions

    def _find(self, hit: Hit) -> _Entry | None:
        """The entry of ``hit`` (``None`` if it has none), once its cost is checked: every
        hit of a request is found before any is decided, so a bad cost changes nothing."""
        check_cost(hit.cost)
        # The index holds storable names only, so an entry found under the names as given
        # is the one; else the names may be long or odd ones stored as a digest.
        try:
            return self._index[hit.endpoint][hit.quota.policy][hit.key]
        except KeyError:
            pass
        key, endpoint = _key(hit.key), _key(hit.endpoint)
        if key is hit.key and endpoint is hit.endpoint:
            return None
        tables = self._index.get(endpoint)
        table = None if tables is None else tables.get(hit.quota.policy)
        return None if table is None else table.get(key)

    def _record(
        self,
        hit: Hit,
        entry: _Entry | None,
        algorithm: str,
        allowed: bool,
        state: BucketState | None,
        now: int,
    ) -> None:
        """Store a decision's outcome: the new state (if any) and the counts."""
        cost = hit.cost
        if cost == 0:
            return
        quota = hit.quota
        if entry is None:
            if state is None:
                state = BucketState(now)
            if self._size >= self.max_keys:
                self._evict(now)
            entry = _Entry(
                state,
                algorithm,
                expires_at(algorithm, state, quota),
                hit.tier,
                quota,
                _key(hit.key),
                _key(hit.endpoint),
                quota.policy,
            )
            self._index.setdefault(entry.endpoint, {}).setdefault(entry.policy, {})[entry.key] = (
                entry
            )
            self._queue.append(entry)
            self._size += 1
        else:
            entry.used = True
            if state is not None:
                entry.state = state
                entry.algorithm = algorithm
                entry.expires = expires_at(algorithm, state, quota)
            entry.tier = hit.tier
            entry.quota = quota
        if allowed:
            entry.allowed += cost
        else:
            entry.denied += cost

    def _remove(self, entry: _Entry) -> None:
        tables = self._index[entry.endpoint]
        table = tables[entry.policy]
        del table[entry.key]
        if not table:
            del tables[entry.policy]
            if not tables:
                del self._index[entry.endpoint]
        entry.dead = True
        self._size -= 1

    def _evict(self, now: int) -> None:
        queue = self._queue
        while queue:
            entry = queue.popleft()
            if entry.dead:
                continue
            if entry.used and entry.expires > now:
                entry.used = False  # a second chance
                queue.append(entry)
                continue
            self._remove(entry)
            if entry.expires > now:
                self.evictions += 1
                if not self._warned_eviction:
                    self._warned_eviction = True
                    logger.warning(
                        "MemoryStorage is full (max_keys=%d): evicting live state of keys "
                        "not used recently; raise max_keys to keep it",
                        self.max_keys,
                        extra=log_extra(
                            "storage_full", storage="MemoryStorage", count=self.max_keys
                        ),
                    )
            return

    def _compact(self) -> None:
        if len(self._queue) > 2 * self._size + 64:
            self._queue = deque(e for e in self._queue if not e.dead)

    def _entries(self) -> Iterator[_Entry]:
        for tables in self._index.values():
            for table in tables.values():
                yield from table.values()

    async def status(self, key: str, *, now: int | None = None) -> list[KeyStatus]:
        """The live state of every (endpoint, quota) of ``key``."""
        if now is None:
            now = self.clock()
        wanted = _key(key)
        out: list[KeyStatus] = []
        for endpoint, tables in self._index.items():
            for policy, table in tables.items():
                entry = table.get(wanted)
                if entry is None or entry.expires <= now:
                    continue
                decision = ALGORITHMS[entry.algorithm](entry.state, now, entry.quota, 0)[0]
                out.append(
                    KeyStatus(
                        wanted,
                        endpoint,
                        policy,
                        entry.tier,
                        entry.algorithm,
                        decision,
                        entry.allowed,
                        entry.denied,
                    )
                )
        return out

    async def reset(self, key: str, *, endpoint: str | None = None) -> int:
        """Forget ``key``'s state (of one endpoint, or all)."""
        wanted = _key(key)
        ep = None if endpoint is None else _key(endpoint)
        doomed = [
            table[wanted]
            for name, tables in self._index.items()
            if ep is None or name == ep
            for table in tables.values()
            if wanted in table
        ]
        for entry in doomed:
            self._remove(entry)
        self._compact()
        return len(doomed)

    async def cleanup(self, *, batch_size: int = 1000, now: int | None = None) -> int:
        """Delete expired entries, at most ``batch_size`` per pass until none are left;
        forget the request counts of minutes older than ``stats_retention``."""
        if now is None:
            now = self.clock()
        self._rollups.prune((now - round(self.stats_retention * 1e9)) // MINUTE_NS)
        removed = 0
        while True:
            doomed = [e for e in self._entries() if e.expires <= now][:batch_size]
            for entry in doomed:
                self._remove(entry)
            removed += len(doomed)
            if len(doomed) < batch_size:
                self._compact()
                return removed

    async def stats(
        self,
        *,
        since: float | timedelta | None = None,
        by: Sequence[str] = ("endpoint", "tier"),
        now: int | None = None,
    ) -> list[StatsRow]:
        """Allowed and denied requests by endpoint and tier (see :meth:`fineflow.Storage.stats`);
        ``keys``: the keys with an entry in each group."""
        cells = self._cells(since, now)
        groups = check_by(by)
        keys: dict[tuple[str, str], set[str]] = {}
        for entry in self._entries():
            keys.setdefault((entry.endpoint, entry.tier), set()).add(entry.key)
        return totals(cells, groups, {group: len(names) for group, names in keys.items()})

    async def stats_series(
        self,
        *,
        since: float | timedelta | None = None,
        by: Sequence[str] = ("endpoint", "tier"),
        now: int | None = None,
    ) -> list[StatsPoint]:
        """Allowed and denied requests per minute and group (arguments as :meth:`stats`)."""
        cells = self._cells(since, now)
        return series(cells, check_by(by))

    def _cells(self, since: float | timedelta | None, now: int | None) -> list[Cell]:
        first = since_minute(check_since(since), self.clock() if now is None else now)
        return [
            Cell(c.minute, _key(c.endpoint), c.tier, c.allowed, c.denied)
            for c in self._rollups.cells()
            if first is None or c.minute >= first
        ]
