"""In-process rate-limit storage: one process, an injected clock, a bounded number of keys.

Layout: an index ``endpoint -> policy -> key -> entry`` (a request resolves its entry with
three lookups of strings whose hashes are cached, no tuple to build and hash), plus a
queue of every entry in insertion order for eviction. Recency is approximated with the
CLOCK ("second chance") scheme: a decision only sets the entry's ``used`` bit; when the
storage is full, the entry at the front of the queue is evicted if it is expired or was not
used since the hand last passed it, else its bit is cleared and it goes to the back. Removed
entries (``reset``, ``cleanup``) are dropped from the queue lazily, and the queue is
compacted when they outnumber the live ones.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

from .._errors import ConfigurationError, StorageClosedError
from .._ratelimit.algorithms import (
    ALGORITHMS,
    NS,
    BucketState,
    Decision,
    expires_at,
    validate_algorithm,
)
from .._ratelimit.quota import Quota
from .base import MAX_KEY_BYTES, Hit, KeyStatus, StatsRow, check_hits, storage_key

__all__ = ["MemoryStorage"]

logger = logging.getLogger("fineflow.storage")

_Index = dict[str, dict[str, dict[str, "_Entry"]]]  # endpoint -> policy -> key -> entry
# Builds a Decision without NamedTuple's Python-level __new__ (half the cost on the hot path).
_new_decision = tuple.__new__


@dataclass(slots=True, eq=False)
class _Entry:
    t: int
    count: int
    prev: int
    algorithm: str
    expires: int
    tier: str
    quota: Quota
    key: str
    endpoint: str
    policy: str
    allowed: int = 0
    denied: int = 0
    used: bool = False  # CLOCK reference bit: decided on since the hand last passed it
    dead: bool = False  # removed from the index; the queue drops it when it gets there

    @property
    def state(self) -> BucketState:
        return BucketState(self.t, self.count, self.prev)


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
    """

    local = True  # in-process: decisions cannot hang, no time budget is needed

    def __init__(self, *, max_keys: int = 100_000, clock: Callable[[], int] = time.time_ns) -> None:
        if isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 1:
            raise ConfigurationError(f"max_keys must be a positive int, got {max_keys!r}")
        self.max_keys = max_keys
        self.clock = clock
        self.evictions = 0
        self._index: _Index = {}
        self._queue: deque[_Entry] = deque()
        self._size = 0
        self._closed = False
        self._warned_eviction = False
        self._gcra = self._make_gcra([0, 0, 0])

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
        """Drop all state; the storage refuses use afterwards."""
        self._closed = True
        self._index.clear()
        self._queue.clear()
        self._size = 0

    async def migrate(self) -> None:
        """Nothing to migrate for memory storage."""

    def __len__(self) -> int:
        return self._size

    def decide_one(
        self,
        algorithm: str,
        key: str,
        quota: Quota,
        cost: int = 1,
        endpoint: str = "",
        tier: str = "",
        now: int | None = None,
    ) -> Decision:
        """Decide one quota for one request, synchronously (the limiter's fast path)."""
        if algorithm == "gcra":
            return self._gcra(key, quota, cost, endpoint, tier, now)
        if self._closed:
            raise StorageClosedError("this MemoryStorage was closed; create a new one")
        if cost.__class__ is not int or cost < 0:
            raise ValueError(f"cost must be a non-negative int, got {cost!r}")
        return self._decide(
            algorithm, key, quota, cost, endpoint, tier, self.clock() if now is None else now
        )

    def decider(
        self, algorithm: str, tally: list[int] | None = None
    ) -> Callable[[str, Quota, int, str, str], Decision]:
        """``decide_one`` with ``algorithm`` bound: ``(key, quota, cost, endpoint, tier)``.

        What :class:`RateLimiter` calls per decision; for ``gcra`` it skips a layer of
        calls. A subclass overriding ``decide_sync`` or ``decide_one`` is called through
        them. ``tally[1]`` and ``tally[2]`` count the allowed and denied decisions (the
        limiter's counters, kept here to save it a call layer per decision).
        """
        cls = type(self)
        if tally is None:
            tally = [0, 0, 0]
        if (
            cls.decide_one is MemoryStorage.decide_one
            and algorithm == "gcra"
            and (cls.decide_sync is MemoryStorage.decide_sync)
        ):
            return self._make_gcra(tally)
        one: Callable[[str, Quota, int, str, str], Decision]
        if cls.decide_sync is not MemoryStorage.decide_sync:

            def via_sync(key: str, quota: Quota, cost: int, endpoint: str, tier: str) -> Decision:
                return self.decide_sync(algorithm, [Hit(key, quota, cost, endpoint, tier)])[0]

            one = via_sync
        else:
            one = partial(self.decide_one, algorithm)

        def counted(key: str, quota: Quota, cost: int, endpoint: str, tier: str) -> Decision:
            decision = one(key, quota, cost, endpoint, tier)
            tally[2 - decision[0]] += 1  # allowed (True) -> 1, denied -> 2
            return decision

        return counted

    def _make_gcra(self, tally: list[int]) -> Callable[..., Decision]:
        """The GCRA decision, as a closure (cell reads are cheaper than attribute reads)."""
        index = self._index
        decide = self._decide
        storage = self

        def gcra(
            key: str,
            quota: Quota,
            cost: int = 1,
            endpoint: str = "",
            tier: str = "",
            now: int | None = None,
        ) -> Decision:
            if cost.__class__ is not int or cost < 0:
                raise ValueError(f"cost must be a non-negative int, got {cost!r}")
            # The index holds only storable names, so a hit on the raw names is the right
            # entry; a miss may still be a long or odd name stored as a digest. A closed
            # storage has an empty index: it is refused on the miss path below.
            try:
                entry = index[endpoint][quota.policy][key]  # (subscripts: cheaper than get)
            except KeyError:
                entry = None
            if entry is not None and entry.algorithm == "gcra" and cost <= quota.capacity:
                # A known key: the arithmetic of gcra_step on ``ahead``, how far the
                # TAT runs ahead of now (small ints, cheaper than TATs).
                if now is None:
                    now = storage.clock()
                interval = quota.emission_interval_ns
                tau = quota.tolerance_ns
                ahead = entry.t - now
                if ahead < 0:
                    ahead = 0
                after = ahead + cost * interval
                entry.used = True
                if after <= tau:  # new_tat - tau <= now: admitted
                    if cost:  # (a peek records nothing)
                        entry.t = entry.expires = now + after
                        entry.allowed += cost
                        entry.tier = tier
                        entry.quota = quota
                    tally[1] += 1
                    return _new_decision(
                        Decision,
                        (
                            True,
                            quota.limit,
                            (tau - after) // interval,
                            after / NS,
                            0.0,
                            quota.policy,
                            quota.period,
                            None,
                        ),
                    )
                # Denied: nothing is charged, the state stays as it is.
                if cost:
                    entry.denied += cost
                    entry.tier = tier
                    entry.quota = quota
                remaining = (tau - ahead) // interval
                tally[2] += 1
                return _new_decision(
                    Decision,
                    (
                        False,
                        quota.limit,
                        remaining if remaining > 0 else 0,
                        ahead / NS,
                        (after - tau) / NS,
                        quota.policy,
                        quota.period,
                        None,
                    ),
                )
            if storage._closed:
                raise StorageClosedError("this MemoryStorage was closed; create a new one")
            decision = decide(
                "gcra", key, quota, cost, endpoint, tier, storage.clock() if now is None else now
            )
            tally[2 - decision[0]] += 1
            return decision

        return gcra

    def _decide(
        self,
        algorithm: str,
        key: str,
        quota: Quota,
        cost: int,
        endpoint: str,
        tier: str,
        now: int,
    ) -> Decision:
        """One decision through the reference step function (new keys, every algorithm)."""
        key, endpoint = _key(key), _key(endpoint)
        entry = self._get(key, endpoint, quota.policy)
        step = ALGORITHMS.get(algorithm) or ALGORITHMS[validate_algorithm(algorithm)]
        state = None if entry is None or entry.expires <= now else entry.state
        decision, new_state = step(state, now, quota, cost)
        self._store(
            key, endpoint, entry, algorithm, quota, cost, tier, decision.allowed, new_state, now
        )
        return decision

    async def decide(
        self, algorithm: str, hits: Sequence[Hit], *, now: int | None = None
    ) -> list[Decision]:
        """Decide ``hits`` all or nothing (see :class:`fineflow.Storage`)."""
        return self.decide_sync(algorithm, hits, now=now)

    def decide_sync(
        self, algorithm: str, hits: Sequence[Hit], *, now: int | None = None
    ) -> list[Decision]:
        """``decide`` without awaiting: in-process decisions never need to wait."""
        if len(hits) == 1:
            key, quota, cost, endpoint, tier = hits[0]
            return [self.decide_one(algorithm, key, quota, cost, endpoint, tier, now)]
        if self._closed:
            raise StorageClosedError("this MemoryStorage was closed; create a new one")
        step = ALGORITHMS.get(algorithm) or ALGORITHMS[validate_algorithm(algorithm)]
        check_hits(hits)
        if now is None:
            now = self.clock()
        names = [(_key(h.key), _key(h.endpoint)) for h in hits]
        found = [self._get(k, ep, h.quota.policy) for (k, ep), h in zip(names, hits, strict=True)]
        states = [None if e is None or e.expires <= now else e.state for e in found]
        results = [step(s, now, h.quota, h.cost) for s, h in zip(states, hits, strict=True)]
        allowed = all(d.allowed for d, _ in results)
        decisions: list[Decision] = []
        for (key, endpoint), entry, hit, state, (decision, new_state) in zip(
            names, found, hits, states, results, strict=True
        ):
            if not allowed and decision.allowed:
                decision = step(state, now, hit.quota, 0)[0]
            self._store(
                key,
                endpoint,
                entry,
                algorithm,
                hit.quota,
                hit.cost,
                hit.tier,
                allowed,
                new_state if allowed else state,
                now,
            )
            decisions.append(decision)
        return decisions

    def _get(self, key: str, endpoint: str, policy: str) -> _Entry | None:
        tables = self._index.get(endpoint)
        if tables is None:
            return None
        table = tables.get(policy)
        return None if table is None else table.get(key)

    def _store(
        self,
        key: str,
        endpoint: str,
        entry: _Entry | None,
        algorithm: str,
        quota: Quota,
        cost: int,
        tier: str,
        allowed: bool,
        state: BucketState | None,
        now: int,
    ) -> None:
        if cost == 0:
            return
        if entry is None:
            if state is None:
                state = BucketState(now)
            if self._size >= self.max_keys:
                self._evict(now)
            policy = quota.policy
            entry = _Entry(
                state.t,
                state.used,
                state.prev,
                algorithm,
                expires_at(algorithm, state, quota),
                tier,
                quota,
                key,
                endpoint,
                policy,
            )
            self._index.setdefault(endpoint, {}).setdefault(policy, {})[key] = entry
            self._queue.append(entry)
            self._size += 1
        else:
            entry.used = True
            if state is not None:
                entry.t, entry.count, entry.prev = state
                entry.algorithm = algorithm
                entry.expires = expires_at(algorithm, state, quota)
            entry.tier = tier
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
        """Delete expired entries, at most ``batch_size`` per pass until none are left."""
        if now is None:
            now = self.clock()
        removed = 0
        while True:
            doomed = [e for e in self._entries() if e.expires <= now][:batch_size]
            for entry in doomed:
                self._remove(entry)
            removed += len(doomed)
            if len(doomed) < batch_size:
                self._compact()
                return removed

    async def stats(self) -> list[StatsRow]:
        """Allowed and denied counts grouped by endpoint and tier (entries not yet cleaned)."""
        groups: dict[tuple[str, str], list[int]] = {}
        for entry in self._entries():
            group = groups.setdefault((entry.endpoint, entry.tier), [0, 0, 0])
            group[0] += 1
            group[1] += entry.allowed
            group[2] += entry.denied
        return [StatsRow(ep, tier, k, a, d) for (ep, tier), (k, a, d) in sorted(groups.items())]
