"""The storage protocol every rate-limit backend implements, and the values it trades in."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NamedTuple, Protocol, runtime_checkable

from .._ratelimit.algorithms import Decision
from .._ratelimit.quota import Quota

__all__ = [
    "Hit",
    "KeyStatus",
    "LocalStorage",
    "MinuteStats",
    "StatsPoint",
    "StatsRow",
    "Storage",
    "StorageHealth",
    "SupportsHealth",
    "storage_key",
]

# Keys longer than this (in UTF-8 bytes) are stored as a SHA-256 digest, so a caller cannot
# bloat an index (or memory) with huge keys.
MAX_KEY_BYTES = 128


def storage_key(text: str) -> str:
    """``text`` itself if it is short, NUL-free, valid UTF-8; else ``"sha256:" + hex``.

    Long or odd keys are stored as a fixed-size digest, so a caller cannot bloat an index
    (or memory) with huge keys, and any string is storable in PostgreSQL ``text``.
    """
    if text.isascii():
        if len(text) <= MAX_KEY_BYTES and "\x00" not in text:
            return text
        raw = text.encode("ascii")
    else:
        try:
            raw = text.encode("utf-8")
        except UnicodeEncodeError:
            raw = text.encode("utf-8", "surrogatepass")
        else:
            if len(raw) <= MAX_KEY_BYTES and "\x00" not in text:
                return text
    return "sha256:" + hashlib.sha256(raw).hexdigest()


class Hit(NamedTuple):
    """One quota to charge for one request (an immutable value).

    Attributes:
        key: who is limited (a user id, an API key, a client address).
        quota: the quota to apply.
        cost: how much the request costs (0 peeks).
        endpoint: the rule or endpoint name; state is kept per (endpoint, key, quota policy).
        tier: the caller's tier, recorded for statistics.
    """

    key: str
    quota: Quota
    cost: int = 1
    endpoint: str = ""
    tier: str = ""


@dataclass(frozen=True, slots=True)
class KeyStatus:
    """The current state of one key under one quota, as ``status(key)`` reports it."""

    key: str
    endpoint: str
    policy: str
    tier: str
    algorithm: str
    decision: Decision
    allowed_total: int
    denied_total: int


@dataclass(frozen=True, slots=True)
class StatsRow:
    """Allowed and denied requests of one group, as ``storage.stats()`` reports them.

    Attributes:
        endpoint: the rule or endpoint name (``""`` when not grouped by endpoint).
        tier: the callers' tier (``""`` when none, or not grouped by tier).
        keys: keys with rate-limit state stored in the group now, where the storage can
            count them cheaply (PostgreSQL, memory; 0 on Redis, where it would take a scan).
        allowed: requests admitted (a request counts once per endpoint and tier, whatever
            its number of quotas or its cost).
        denied: requests denied (by any of their quotas).
    """

    endpoint: str
    tier: str
    keys: int
    allowed: int
    denied: int


@dataclass(frozen=True, slots=True)
class StatsPoint:
    """Allowed and denied requests of one group in one minute (``stats_series()``).

    Attributes:
        minute: the start of the minute (an aware UTC datetime).
        endpoint: the rule or endpoint name (``""`` when not grouped by endpoint).
        tier: the callers' tier (``""`` when none, or not grouped by tier).
        allowed: requests admitted in that minute.
        denied: requests denied in that minute.
    """

    minute: datetime
    endpoint: str
    tier: str
    allowed: int
    denied: int


@runtime_checkable
class Storage(Protocol):
    """What a rate-limit storage backend provides: everything :class:`RateLimiter` uses.

    Backends implement each algorithm natively and atomically, and are held to the
    reference functions in :mod:`fineflow._ratelimit.algorithms` by the conformance suite.
    A storage in this process can also decide without awaiting: see :class:`LocalStorage`.
    """

    async def open(self) -> None:
        """Acquire resources (connections); idempotent."""

    async def close(self) -> None:
        """Release resources; the storage refuses use afterwards."""

    async def migrate(self) -> None:
        """Create or upgrade whatever schema the backend needs (idempotent)."""

    async def decide(
        self,
        algorithm: str,
        hits: Sequence[Hit],
        *,
        now: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the budget is the storage's to keep
    ) -> list[Decision]:
        """Decide ``hits`` for one request, all or nothing, atomically.

        Args:
            algorithm: ``"gcra"``, ``"fixed_window"`` or ``"sliding_window"``.
            hits: the quotas of one request (one per rule/quota); either every one admits
                and all are charged, or none is charged.
            now: the time in nanoseconds since the epoch; ``None`` means the backend's
                own clock (the database clock for PostgreSQL).
            timeout: the time budget of this call in seconds (``None``: no budget). A
                storage that can wait (for a connection, a queue, the network) must give up
                within it and raise ``TimeoutError``; the limiter sets no deadline of its
                own. A storage that cannot hang (in process) may ignore it.

        Returns:
            One decision per hit, in order.

        Raises:
            StorageError: the storage failed (the limiter applies ``on_storage_error``).
            TimeoutError: the budget ran out (likewise).
            ValueError: a cost is not a non-negative int.
        """
        ...

    async def status(self, key: str, *, now: int | None = None) -> list[KeyStatus]:
        """The live state of every (endpoint, quota) of ``key``."""
        ...

    async def reset(self, key: str, *, endpoint: str | None = None) -> int:
        """Forget ``key``'s state (of one endpoint, or all); return how many were removed."""
        ...

    async def cleanup(self, *, batch_size: int = 1000, now: int | None = None) -> int:
        """Delete expired state (losslessly); return how many entries were removed."""
        ...

    async def stats(self) -> list[StatsRow]:
        """Allowed and denied requests by endpoint and tier (fineflow's storages take
        more arguments: see :class:`MinuteStats`)."""
        ...


@runtime_checkable
class MinuteStats(Protocol):
    """The statistics of a storage that counts requests per minute (each of fineflow's):
    what the ``fineflow stats`` command and the conformance suite use."""

    async def stats(
        self,
        *,
        since: float | timedelta | None = None,
        by: Sequence[str] = ("endpoint", "tier"),
        now: int | None = None,
    ) -> list[StatsRow]:
        """Allowed and denied requests by endpoint and tier (or the groups ``by``).

        Args:
            since: how far back, in seconds or a ``timedelta`` (``None``: every minute
                kept); the minute it falls in counts whole.
            by: the groups: ``"endpoint"``, ``"tier"``, both (the default) or neither.
            now: the time in nanoseconds since the epoch ``since`` counts back from
                (``None``: the storage's clock).

        Raises:
            ValueError: a bad ``since`` or ``by``.
        """
        ...

    async def stats_series(
        self,
        *,
        since: float | timedelta | None = None,
        by: Sequence[str] = ("endpoint", "tier"),
        now: int | None = None,
    ) -> list[StatsPoint]:
        """Allowed and denied requests per minute and group (arguments as :meth:`stats`),
        by minute, then group."""
        ...


@runtime_checkable
class LocalStorage(Storage, Protocol):
    """A storage in this process, whose decisions never wait: they can be made without
    awaiting (:class:`MemoryStorage`).

    :class:`RateLimiter` checks for it once, when it is built, and then decides through
    :meth:`decide_local` (``hit``, ``decide_nowait``); ``decide`` stays the general path.
    """

    def decide_local(
        self, algorithm: str, hits: Sequence[Hit], *, now: int | None = None
    ) -> list[Decision]:
        """:meth:`Storage.decide`, synchronously: the same decisions, state and errors.

        Raises:
            StorageError: the storage cannot decide (for instance, it was closed).
            ValueError: a cost is not a non-negative int.
        """
        ...


def check_cost(cost: object) -> None:
    """Validate a cost: a non-negative int (bool rejected). Raise ``ValueError`` otherwise."""
    if type(cost) is not int or cost < 0:
        raise ValueError(f"cost must be a non-negative int, got {cost!r}")


def check_hits(hits: Sequence[Hit]) -> None:
    """Validate every hit's cost (see :func:`check_cost`)."""
    for hit in hits:
        check_cost(hit.cost)


@dataclass(frozen=True, slots=True)
class StorageHealth:
    """What one health check of a storage found (a value; checks never raise).

    Attributes:
        healthy: whether the storage answered.
        backend: ``"postgres"``, ``"redis"``, ``"memory"`` (or a custom storage's name).
        latency: seconds the check took.
        error: why it is unhealthy (one line, no credentials), ``None`` when healthy.
    """

    healthy: bool
    backend: str
    latency: float
    error: str | None = None


@runtime_checkable
class SupportsHealth(Protocol):
    """A storage that can say whether it works: what :func:`fineflow.health_app` asks.

    :class:`PostgresStorage` (a pooled connection finds the schema migrated), :class:`RedisStorage`
    (``PING``) and :class:`MemoryStorage` (open or closed) implement it.
    """

    async def health(self, *, timeout: float = 1.0) -> StorageHealth:  # noqa: ASYNC109
        """Check the storage within ``timeout`` seconds; never raises for a storage that is
        down, closed or slow: the answer says so."""
        ...
