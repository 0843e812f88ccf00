"""RateLimiter: decisions with a time budget and a policy for when the storage fails."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import anyio

from .._breaker.breaker import CircuitBreaker
from .._breaker.config import CircuitState
from .._errors import ConfigurationError, StorageError
from .._storage.base import Hit, KeyStatus, Storage
from .algorithms import Decision, validate_algorithm
from .quota import Quota

__all__ = ["Decisions", "LimiterMetrics", "RateLimiter"]

logger = logging.getLogger("fineflow.limiter")

STORAGE_UNAVAILABLE = "storage unavailable"
_new_decisions = tuple.__new__  # builds Decisions without a Python-level __new__


class Decisions(tuple[Decision, ...]):
    """The decisions of one request over several quotas (all or nothing).

    A tuple of :class:`Decision`, one per quota in order, plus the combined view.
    """

    __slots__ = ()

    @property
    def allowed(self) -> bool:
        """True if every quota admitted the request (and all were charged)."""
        return all(d.allowed for d in self)

    @property
    def retry_after(self) -> float | None:
        """0.0 if allowed; else the longest wait among denying quotas (``None``: never)."""
        waits = [d.retry_after for d in self if not d.allowed]
        if not waits:
            return 0.0
        if any(w is None for w in waits):
            return None
        return max(w for w in waits if w is not None)

    @property
    def denied(self) -> list[Decision]:
        """The decisions that denied the request."""
        return [d for d in self if not d.allowed]

    @property
    def storage_failed(self) -> bool:
        """True if these decisions were made by ``on_storage_error`` policy, not storage."""
        return any(d.reason == STORAGE_UNAVAILABLE for d in self)


@dataclass(frozen=True, slots=True)
class LimiterMetrics:
    """A snapshot of a limiter's counters.

    Attributes:
        decisions: decisions made: ``allowed + denied + failed_open + failed_closed``.
        allowed: admitted by the storage.
        denied: denied by the storage.
        storage_errors: decisions whose storage call failed.
        storage_timeouts: decisions whose storage call ran out of the time budget.
        failed_open: decided "allowed" by ``on_storage_error="allow"`` (errors, timeouts,
            or skipped while the storage's breaker is open).
        failed_closed: decided "denied" by ``on_storage_error="deny"``.
        short_circuited: decisions that skipped the storage while its breaker was open.
        storage_healthy: whether the storage's breaker is closed.
    """

    decisions: int
    allowed: int
    denied: int
    storage_errors: int
    storage_timeouts: int
    failed_open: int
    failed_closed: int
    short_circuited: int
    storage_healthy: bool


class RateLimiter:
    """Decide whether a caller may do something now, against a shared storage.

    Args:
        storage: where state lives: :class:`PostgresStorage` (shared by every instance) or
            :class:`MemoryStorage` (one process).
        algorithm: ``"gcra"`` (default), ``"fixed_window"`` or ``"sliding_window"``.
        on_storage_error: ``"allow"`` (fail open, default) or ``"deny"`` (fail closed) when
            the storage errors, times out, or is being skipped after repeated failures.
        timeout: the time budget per decision in seconds (default 0.05); ``None`` for none.
            Not applied to in-process storages, which cannot hang.
        failure_threshold: consecutive storage failures after which the limiter stops
            calling the storage (default 3) ...
        recovery_time: ... for this many seconds, then probes it with one request (default 1.0).
        breaker: the :class:`CircuitBreaker` guarding the storage; by default one named
            ``"fineflow-storage"`` built from the two options above.
        clock: the breaker's clock (``time.monotonic``); tests inject a fake one.

    Raises:
        ConfigurationError: for an unknown algorithm or policy, or a bad timeout.
    """

    def __init__(
        self,
        storage: Storage,
        *,
        algorithm: str = "gcra",
        on_storage_error: Literal["allow", "deny"] = "allow",
        timeout: float | None = 0.05,
        failure_threshold: int = 3,
        recovery_time: float = 1.0,
        breaker: CircuitBreaker | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.algorithm = validate_algorithm(algorithm)
        if on_storage_error not in ("allow", "deny"):
            raise ConfigurationError(
                f"on_storage_error must be 'allow' or 'deny', got {on_storage_error!r}"
            )
        if timeout is not None and not (isinstance(timeout, int | float) and timeout > 0):
            raise ConfigurationError(f"timeout must be seconds > 0 or None, got {timeout!r}")
        if not isinstance(failure_threshold, int) or failure_threshold < 1:
            raise ConfigurationError("failure_threshold must be an int >= 1")
        if not (isinstance(recovery_time, int | float) and recovery_time > 0):
            raise ConfigurationError("recovery_time must be seconds > 0")
        self.storage = storage
        self.on_storage_error = on_storage_error
        self.timeout = None if getattr(storage, "local", False) else timeout
        # [1..7]: allowed, denied, storage errors, timeouts, short-circuited, failed open,
        # failed closed ([0] unused). "decisions" is the sum of the outcomes (allowed,
        # denied, failed open or closed): one increment per decision on the hot path.
        self._counts = [0, 0, 0, 0, 0, 0, 0, 0]
        # In-process storages decide synchronously: ``decider(algorithm, counts)`` gives the
        # one-quota decision ``(key, quota, cost, endpoint, tier)``, which counts allowed
        # and denied decisions itself and raises StorageError (see _local_failure).
        decider = getattr(storage, "decider", None)
        self._local_one: Callable[[str, Quota, int, str, str], Decision] | None = (
            None if decider is None else decider(self.algorithm, self._counts)
        )
        self._decide_sync: Callable[..., list[Decision]] | None = getattr(
            storage, "decide_sync", None
        )
        self.breaker = breaker or CircuitBreaker(
            "fineflow-storage",
            failure_threshold=failure_threshold,
            reset_timeout=float(recovery_time),
            half_open_max_calls=1,
            success_threshold=1,
            clock=clock,
        )
        self._failing_since: int | None = None
        # A storage whose decide() enforces a ``timeout`` itself (PostgresStorage) gets the
        # budget passed in, which costs far less than a cancel scope around the call; a
        # subclass overriding decide() gets the cancel scope.
        cls = type(storage)
        self._bounded = (
            self.timeout is not None
            and getattr(cls, "_bounded_decide", None) is getattr(cls, "decide", None)
            # (nor an instance attribute wrapping it: a spy or instrumentation)
            and "decide" not in getattr(storage, "__dict__", ())
        )
        if self._local_one is not None and type(self).hit is RateLimiter.hit:
            # In-process storage: ``hit`` becomes a closure over the local decision, a call
            # layer and the attribute loads fewer (same semantics as the method).
            self.__dict__["hit"] = self._make_local_hit()

    async def __aenter__(self) -> RateLimiter:
        await self.storage.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.storage.close()

    async def hit(
        self, key: str, quota: Quota | str, cost: int = 1, *, endpoint: str = "", tier: str = ""
    ) -> Decision:
        """Charge ``cost`` against ``quota`` for ``key`` if it fits; return the decision."""
        if quota.__class__ is not Quota:
            quota = _quota(quota)
        local = self._local_one
        if local is not None:
            try:
                return local(key, quota, cost, endpoint, tier)
            except StorageError as exc:
                return self._local_failure([Hit(key, quota, cost, endpoint, tier)], exc)[0]
        return (await self.decide([Hit(key, quota, cost, endpoint, tier)]))[0]

    def _local_failure(self, hits: Sequence[Hit], exc: StorageError) -> Decisions:
        """What an in-process decision that raised ``exc`` becomes: ``on_storage_error``."""
        self._counts[3] += 1
        return self._fallback(hits, exc)

    def _make_local_hit(self) -> Callable[..., Awaitable[Decision]]:
        # The method above for an in-process storage, as a closure: the per-decision cost
        # is the product here.
        local = self._local_one
        assert local is not None
        failure = self._local_failure

        async def hit(
            key: str, quota: Quota | str, cost: int = 1, *, endpoint: str = "", tier: str = ""
        ) -> Decision:
            if quota.__class__ is not Quota:
                quota = _quota(quota)
            try:
                return local(key, quota, cost, endpoint, tier)
            except StorageError as exc:
                return failure([Hit(key, quota, cost, endpoint, tier)], exc)[0]

        hit.__doc__ = RateLimiter.hit.__doc__
        return hit

    async def hit_all(
        self,
        key: str,
        quotas: Iterable[Quota | str],
        cost: int = 1,
        *,
        endpoint: str = "",
        tier: str = "",
    ) -> Decisions:
        """Charge every quota or none (one round trip); ``.allowed`` says which."""
        return await self.decide([Hit(key, _quota(q), cost, endpoint, tier) for q in quotas])

    async def peek(self, key: str, quota: Quota | str, *, endpoint: str = "") -> Decision:
        """The decision a request of cost 0 gets: the current state, charging nothing."""
        return (await self.decide([Hit(key, _quota(quota), 0, endpoint)]))[0]

    async def reset(self, key: str, *, endpoint: str | None = None) -> int:
        """Forget ``key``'s state; return how many entries were removed."""
        return await self.storage.reset(key, endpoint=endpoint)

    async def status(self, key: str) -> list[KeyStatus]:
        """The live state of ``key`` under every endpoint and quota."""
        return await self.storage.status(key)

    def decide_nowait(self, hits: Sequence[Hit]) -> Decisions | None:
        """Decide without awaiting when the storage is in-process, else return ``None``.

        The middleware's fast path: with :class:`MemoryStorage` it saves the coroutine
        layers of :meth:`decide`. Same decisions and counters as :meth:`decide`, without
        the storage breaker: an in-process storage fails only once closed, for good.
        """
        fast = self._decide_sync
        if fast is None:
            return None
        local = self._local_one
        if local is not None and len(hits) == 1:
            # One quota: straight to the storage's single decision (as hit() does).
            try:
                return _new_decisions(Decisions, (local(*hits[0]),))
            except StorageError as exc:
                return self._local_failure(hits, exc)
        counts = self._counts
        try:
            decisions = fast(self.algorithm, hits)
        except StorageError as exc:
            counts[3] += 1
            return self._fallback(hits, exc)
        return _counted(counts, decisions)

    async def decide(self, hits: Sequence[Hit], *, now: int | None = None) -> Decisions:
        """Decide the hits of one request all or nothing, within the time budget.

        Never raises for storage failures: ``on_storage_error`` decides instead. Raises
        ``ValueError`` for a bad cost (negative, not an int).
        """
        counts = self._counts
        permit = self.breaker.try_acquire()
        if permit is None:
            counts[5] += 1
            return self._fallback(hits, None)
        try:
            if self.timeout is None:
                decisions = await self.storage.decide(self.algorithm, hits, now=now)
            elif self._bounded:
                decisions = await self.storage.decide(  # type: ignore[call-arg]
                    self.algorithm, hits, now=now, timeout=self.timeout
                )
            else:
                # (Not asyncio.timeout, three times cheaper: when the answer and the deadline
                # land in one loop iteration it cancels anyway and loses an answer that was
                # already charged; anyio does not cancel a task whose wait is already done.)
                with anyio.fail_after(self.timeout):
                    decisions = await self.storage.decide(self.algorithm, hits, now=now)
        except TimeoutError as exc:
            counts[4] += 1
            permit.failure(exc)
            return self._fallback(hits, exc)
        except (StorageError, OSError) as exc:
            counts[3] += 1
            permit.failure(exc)
            return self._fallback(hits, exc)
        except BaseException:
            permit.ignore()  # cancelled, or a caller error (bad cost): not the store's health
            raise
        permit.success()
        if self._failing_since is not None:
            self._recovered()
        return _counted(counts, decisions)

    def _fallback(self, hits: Sequence[Hit], exc: BaseException | None) -> Decisions:
        allow = self.on_storage_error == "allow"
        if self._failing_since is None:
            self._failing_since = self._decisions()  # (before this one is counted)
            what = "timed out" if isinstance(exc, TimeoutError) else f"failed: {exc!r}"
            logger.warning(
                "rate-limit storage %s; %s requests until it recovers (logged once per burst)",
                what,
                "allowing" if allow else "denying",
            )
        self._counts[6 if allow else 7] += 1
        retry = None if allow else max(self.breaker.retry_after() or 0.0, 1.0)
        return Decisions(
            Decision(
                allow,
                h.quota.limit,
                h.quota.limit if allow else 0,
                0.0,
                0.0 if allow else retry,
                h.quota.policy,
                h.quota.period,
                STORAGE_UNAVAILABLE,
            )
            for h in hits
        )

    def _recovered(self) -> None:
        if self._failing_since is not None:
            logger.warning(
                "rate-limit storage recovered after %d requests decided by on_storage_error",
                self._decisions() - self._failing_since,
            )
            self._failing_since = None

    def _decisions(self) -> int:
        c = self._counts
        return c[1] + c[2] + c[6] + c[7]

    def metrics(self) -> LimiterMetrics:
        """A snapshot of the limiter's counters."""
        c = self._counts
        return LimiterMetrics(
            self._decisions(),
            c[1],
            c[2],
            c[3],
            c[4],
            c[6],
            c[7],
            c[5],
            self.breaker.state is CircuitState.CLOSED,
        )


def _counted(counts: list[int], decisions: Sequence[Decision]) -> Decisions:
    """``decisions`` as :class:`Decisions`, counted as allowed (all admit) or denied."""
    allowed = 1
    for decision in decisions:
        if not decision[0]:
            allowed = 2
    counts[allowed] += 1
    return _new_decisions(Decisions, decisions)


def _quota(value: Quota | str) -> Quota:
    if isinstance(value, Quota):
        return value
    return Quota.parse(value)
