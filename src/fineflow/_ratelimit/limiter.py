"""RateLimiter: decisions with a time budget and a policy for when the storage fails."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from .._breaker.breaker import CircuitBreaker
from .._breaker.config import CircuitState
from .._errors import ConfigurationError, StorageError
from .._logfields import error_text, log_extra
from .._storage.base import Hit, KeyStatus, LocalStorage, Storage
from .algorithms import Decision, new_record, validate_algorithm
from .quota import Quota

__all__ = ["Decisions", "LimiterMetrics", "RateLimiter"]

logger = logging.getLogger("fineflow.limiter")

STORAGE_UNAVAILABLE = "storage unavailable"


class Decisions(tuple[Decision, ...]):
    """The decisions of one request over several quotas (all or nothing).

    A tuple of :class:`Decision`, one per quota in order, plus the combined view.
    """

    __slots__ = ()

    @property
    def allowed(self) -> bool:
        """True if every quota admitted the request (and all were charged)."""
        for decision in self:  # noqa: SIM110 - a loop: no generator per request
            if not decision.allowed:
                return False
        return True

    @property
    def retry_after(self) -> float | None:
        """0.0 if allowed; else the longest wait among denying quotas (``None``: never)."""
        longest: float | None = None
        for decision in self:
            if not decision.allowed:
                wait = decision.retry_after
                if wait is None:
                    return None
                if longest is None or wait > longest:
                    longest = wait
        return 0.0 if longest is None else longest

    @property
    def denied(self) -> list[Decision]:
        """The decisions that denied the request."""
        return [d for d in self if not d.allowed]

    @property
    def storage_failed(self) -> bool:
        """True if these decisions were made by ``on_storage_error`` policy, not storage."""
        for decision in self:  # noqa: SIM110 - a loop: no generator per request
            if decision.reason == STORAGE_UNAVAILABLE:
                return True
        return False


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
        timeout: the time budget per decision in seconds (default 0.05), passed to the
            storage's ``decide``, which keeps it; ``None`` for none. In-process storages
            cannot hang and ignore it.
        failure_threshold: consecutive storage failures after which the limiter stops
            calling the storage (default 3) ...
        recovery_time: ... for this many seconds, then probes it with one request (default 1.0).
        breaker: the :class:`CircuitBreaker` guarding the storage; by default one named
            ``"fineflow-storage"`` built from the two options above.
        clock: the breaker's clock (``time.monotonic``); tests inject a fake one.

    Raises:
        ConfigurationError: for an unknown algorithm or policy, or a bad timeout.
    """

    # Whether decide_nowait() decides for an in-process storage (see __init_subclass__).
    _decides_nowait: ClassVar[bool] = True

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
        self._storage = storage
        # An in-process storage also decides without awaiting: hit() and decide_nowait().
        self._local = (
            storage if self._decides_nowait and isinstance(storage, LocalStorage) else None
        )
        self.on_storage_error = on_storage_error
        self.timeout = timeout
        self.breaker = breaker or CircuitBreaker(
            "fineflow-storage",
            failure_threshold=failure_threshold,
            reset_timeout=float(recovery_time),
            half_open_max_calls=1,
            success_threshold=1,
            clock=clock,
        )
        # The counters of metrics(), incremented here only. The decisions made are the sum
        # of the outcomes: allowed, denied, failed open, failed closed.
        self._allowed = 0
        self._denied = 0
        self._storage_errors = 0
        self._storage_timeouts = 0
        self._short_circuited = 0
        self._failed_open = 0
        self._failed_closed = 0
        self._failing_since: int | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A subclass that changes how decisions are made (``decide``) without saying how to
        # make them without awaiting is called through its ``decide``.
        if "decide_nowait" in vars(cls):
            cls._decides_nowait = True
        elif "decide" in vars(cls):
            cls._decides_nowait = False

    @property
    def storage(self) -> Storage:
        """The storage this limiter decides against."""
        return self._storage

    async def __aenter__(self) -> RateLimiter:
        await self._storage.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._storage.close()

    async def hit(
        self, key: str, quota: Quota | str, cost: int = 1, *, endpoint: str = "", tier: str = ""
    ) -> Decision:
        """Charge ``cost`` against ``quota`` for ``key`` if it fits; return the decision."""
        if quota.__class__ is not Quota:
            quota = Quota.parse(quota)
        hits = (new_record(Hit, (key, quota, cost, endpoint, tier)),)
        decisions = self.decide_nowait(hits)
        if decisions is None:
            decisions = await self.decide(hits)
        return decisions[0]

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
        return await self.decide([Hit(key, Quota.parse(q), cost, endpoint, tier) for q in quotas])

    async def peek(self, key: str, quota: Quota | str, *, endpoint: str = "") -> Decision:
        """The decision a request of cost 0 gets: the current state, charging nothing."""
        return (await self.decide([Hit(key, Quota.parse(quota), 0, endpoint)]))[0]

    async def reset(self, key: str, *, endpoint: str | None = None) -> int:
        """Forget ``key``'s state; return how many entries were removed."""
        return await self._storage.reset(key, endpoint=endpoint)

    async def status(self, key: str) -> list[KeyStatus]:
        """The live state of ``key`` under every endpoint and quota."""
        return await self._storage.status(key)

    def decide_nowait(self, hits: Sequence[Hit]) -> Decisions | None:
        """Decide without awaiting when the storage is in-process, else return ``None``.

        The middleware's fast path: with a :class:`LocalStorage` such as
        :class:`MemoryStorage` it saves the coroutine layers of :meth:`decide`. Same
        decisions and counters as :meth:`decide`, without the storage breaker: an
        in-process storage fails only once closed, for good. Raises ``ValueError`` for a
        bad cost.

        A subclass overriding :meth:`decide` alone is called through it: its
        ``decide_nowait`` returns ``None``.
        """
        local = self._local
        if local is None:
            return None
        try:
            decisions = local.decide_local(self.algorithm, hits)
        except StorageError as exc:
            self._storage_errors += 1
            return self._fallback(hits, exc)
        return self._counted(decisions)

    async def decide(self, hits: Sequence[Hit], *, now: int | None = None) -> Decisions:
        """Decide the hits of one request all or nothing, within the time budget.

        Never raises for storage failures: ``on_storage_error`` decides instead. Raises
        ``ValueError`` for a bad cost (negative, not an int).
        """
        permit = self.breaker.try_acquire()
        if permit is None:
            self._short_circuited += 1
            return self._fallback(hits, None)
        try:
            decisions = await self._storage.decide(
                self.algorithm, hits, now=now, timeout=self.timeout
            )
        except TimeoutError as exc:
            self._storage_timeouts += 1
            permit.failure(exc)
            return self._fallback(hits, exc)
        except (StorageError, OSError) as exc:
            self._storage_errors += 1
            permit.failure(exc)
            return self._fallback(hits, exc)
        except BaseException:
            permit.ignore()  # cancelled, or a caller error (bad cost): not the store's health
            raise
        permit.success()
        return self._counted(decisions)

    def _counted(self, decisions: Sequence[Decision]) -> Decisions:
        """The storage's ``decisions``, counted as allowed (all admit) or denied."""
        if self._failing_since is not None:
            self._recovered()
        for decision in decisions:
            if not decision.allowed:
                self._denied += 1
                break
        else:
            self._allowed += 1
        return Decisions(decisions)

    def _fallback(self, hits: Sequence[Hit], exc: BaseException | None) -> Decisions:
        """What ``on_storage_error`` decides for ``hits`` when the storage cannot."""
        allow = self.on_storage_error == "allow"
        if self._failing_since is None:
            self._failing_since = self._decisions()  # (before this one is counted)
            self._log_failing(hits, exc, allow)
        if allow:
            self._failed_open += 1
            retry = 0.0
        else:
            self._failed_closed += 1
            retry = max(self.breaker.retry_after() or 0.0, 1.0)
        return Decisions(
            Decision(
                allowed=allow,
                limit=h.quota.limit,
                remaining=h.quota.limit if allow else 0,
                reset_after=0.0,
                retry_after=retry,
                policy=h.quota.policy,
                period=h.quota.period,
                reason=STORAGE_UNAVAILABLE,
            )
            for h in hits
        )

    def _log_failing(self, hits: Sequence[Hit], exc: BaseException | None, allow: bool) -> None:
        """The one record of a burst of storage failures (the error's text without keys)."""
        if exc is None:
            reason, error = "breaker_open", None
        else:
            reason = "timeout" if isinstance(exc, TimeoutError) else "error"
            error = error_text(exc, (h.key for h in hits))
        logger.warning(
            "rate-limit storage %s; %s requests until it recovers (logged once per burst)",
            "timed out" if reason == "timeout" else f"failed: {error or 'breaker open'}",
            "allowing" if allow else "denying",
            extra=log_extra(
                "ratelimit_storage_failed",
                storage=type(self._storage).__name__,
                reason=reason,
                error=error,
            ),
        )

    def _recovered(self) -> None:
        if self._failing_since is not None:
            count = self._decisions() - self._failing_since
            logger.warning(
                "rate-limit storage recovered after %d requests decided by on_storage_error",
                count,
                extra=log_extra(
                    "ratelimit_storage_recovered", storage=type(self._storage).__name__, count=count
                ),
            )
            self._failing_since = None

    def _decisions(self) -> int:
        return self._allowed + self._denied + self._failed_open + self._failed_closed

    def metrics(self) -> LimiterMetrics:
        """A snapshot of the limiter's counters."""
        return LimiterMetrics(
            decisions=self._decisions(),
            allowed=self._allowed,
            denied=self._denied,
            storage_errors=self._storage_errors,
            storage_timeouts=self._storage_timeouts,
            failed_open=self._failed_open,
            failed_closed=self._failed_closed,
            short_circuited=self._short_circuited,
            storage_healthy=self.breaker.state is CircuitState.CLOSED,
        )
