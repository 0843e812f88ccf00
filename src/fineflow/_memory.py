"""In-process rate-limit storage: one process, an injected clock, a bounded number of keys."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ._algorithms import ALGORITHMS, NS, BucketState, Decision, expires_at, validate_algorithm
from ._errors import ConfigurationError, StorageClosedError
from ._quota import Quota
from ._storage import MAX_KEY_BYTES, Hit, KeyStatus, StatsRow, check_hits, storage_key

__all__ = ["MemoryStorage"]

logger = logging.getLogger("fineflow.storage")

_Slot = tuple[str, str, str]  # (key, endpoint, policy)
# Builds a Decision without NamedTuple's Python-level __new__ (half the cost on the hot path).
_new_decision = tuple.__new__


@dataclass(slots=True)
class _Entry:
    t: int
    count: int
    prev: int
    algorithm: str
    expires: int
    tier: str
    quota: Quota
    allowed: int = 0
    denied: int = 0

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

    The number of entries is bounded by ``max_keys``. When a new entry would exceed it, the
    least recently used entry is evicted; expired entries (equivalent to no state) go first
    and cost nothing, while evicting live state forgets that key's usage, is counted in
    ``evictions`` and logged once. Size ``max_keys`` for your live keys to never lose state.

    Args:
        max_keys: the most (key, endpoint, quota) entries kept (default 100,000; each
            costs about 460 bytes, so a million keys is about 460 MB).
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
        self._entries: OrderedDict[_Slot, _Entry] = OrderedDict()
        self._closed = False
        self._warned_eviction = False

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
        self._entries.clear()

    async def migrate(self) -> None:
        """Nothing to migrate for memory storage."""

    def __len__(self) -> int:
        return len(self._entries)

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
        if self._closed:
            raise StorageClosedError("this MemoryStorage was closed; create a new one")
        if type(cost) is not int or cost < 0:
            raise ValueError(f"cost must be a non-negative int, got {cost!r}")
        if now is None:
            now = self.clock()
        slot = (_key(key), _key(endpoint), quota.policy)
        entries = self._entries
        entry = entries.get(slot)
        if algorithm == "gcra" and entry is not None and entry.algorithm == "gcra":
            # Inline GCRA on a known key: the same arithmetic as gcra_step, no allocations
            # beyond the Decision.
            interval = quota.emission_interval_ns
            cap = quota.capacity
            tau = cap * interval
            tat = entry.t if entry.t > now else now
            new_tat = tat + cost * interval
            if cost <= cap and new_tat - tau <= now:
                entries.move_to_end(slot)
                if cost:
                    entry.t = entry.expires = new_tat
                    entry.allowed += cost
                    entry.tier = tier
                    entry.quota = quota
                return _new_decision(
                    Decision,
                    (
                        True,
                        quota.limit,
                        (now + tau - new_tat) // interval,
                        (new_tat - now) / NS,
                        0.0,
                        quota.policy,
                        quota.period,
                        None,
                    ),
                )
        step = ALGORITHMS.get(algorithm) or ALGORITHMS[validate_algorithm(algorithm)]
        state = None if entry is None or entry.expires <= now else entry.state
        decision, new_state = step(state, now, quota, cost)
        self._store(slot, entry, algorithm, quota, cost, tier, decision.allowed, new_state, now)
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
        entries = self._entries
        slots = [(_key(h.key), _key(h.endpoint), h.quota.policy) for h in hits]
        found = [entries.get(s) for s in slots]
        states = [None if e is None or e.expires <= now else e.state for e in found]
        results = [step(s, now, h.quota, h.cost) for s, h in zip(states, hits, strict=True)]
        allowed = all(d.allowed for d, _ in results)
        decisions: list[Decision] = []
        for slot, entry, hit, state, (decision, new_state) in zip(
            slots, found, hits, states, results, strict=True
        ):
            if not allowed and decision.allowed:
                decision = step(state, now, hit.quota, 0)[0]
            self._store(
                slot,
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

    def _store(
        self,
        slot: _Slot,
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
            entry = _Entry(
                state.t,
                state.used,
                state.prev,
                algorithm,
                expires_at(algorithm, state, quota),
                tier,
                quota,
            )
            if len(self._entries) >= self.max_keys:
                self._evict(now)
            self._entries[slot] = entry
        else:
            self._entries.move_to_end(slot)
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

    def _evict(self, now: int) -> None:
        _, entry = self._entries.popitem(last=False)
        if entry.expires > now:
            self.evictions += 1
            if not self._warned_eviction:
                self._warned_eviction = True
                logger.warning(
                    "MemoryStorage is full (max_keys=%d): evicting live state of the least "
                    "recently used keys; raise max_keys to keep it",
                    self.max_keys,
                )

    async def status(self, key: str, *, now: int | None = None) -> list[KeyStatus]:
        """The live state of every (endpoint, quota) of ``key``."""
        if now is None:
            now = self.clock()
        wanted = _key(key)
        out: list[KeyStatus] = []
        for (k, endpoint, policy), entry in self._entries.items():
            if k != wanted or entry.expires <= now:
                continue
            decision = ALGORITHMS[entry.algorithm](entry.state, now, entry.quota, 0)[0]
            out.append(
                KeyStatus(
                    k,
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
        doomed = [s for s in self._entries if s[0] == wanted and (ep is None or s[1] == ep)]
        for slot in doomed:
            del self._entries[slot]
        return len(doomed)

    async def cleanup(self, *, batch_size: int = 1000, now: int | None = None) -> int:
        """Delete expired entries, at most ``batch_size`` per pass until none are left."""
        if now is None:
            now = self.clock()
        removed = 0
        while True:
            doomed = [s for s, e in self._entries.items() if e.expires <= now][:batch_size]
            for slot in doomed:
                del self._entries[slot]
            removed += len(doomed)
            if len(doomed) < batch_size:
                return removed

    async def stats(self) -> list[StatsRow]:
        """Allowed and denied counts grouped by endpoint and tier (entries not yet cleaned)."""
        groups: dict[tuple[str, str], list[int]] = {}
        for (_, endpoint, _), entry in self._entries.items():
            group = groups.setdefault((endpoint, entry.tier), [0, 0, 0])
            group[0] += 1
            group[1] += entry.allowed
            group[2] += entry.denied
        return [StatsRow(ep, tier, k, a, d) for (ep, tier), (k, a, d) in sorted(groups.items())]
