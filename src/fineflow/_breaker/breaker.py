"""The async circuit breaker: the pure state machine wired to a clock, listeners and logging.

There is no lock anywhere: every touch of the machine is synchronous and so atomic with
respect to other tasks of the event loop, and the guarded call is awaited with nothing held.
A breaker belongs to one event loop thread (asyncio or trio, through anyio).
"""

from __future__ import annotations

import functools
import logging
import random as _random_module
import time
from collections.abc import Awaitable, Callable, Coroutine
from contextvars import ContextVar
from types import TracebackType
from typing import Any, ParamSpec, Self, TypeVar, cast

from .._errors import CircuitOpenError, ConfigurationError
from .config import BreakerConfig, BreakerMetrics, CircuitState, ThrottlePolicy, WindowType
from .events import BreakerEvent, EventKind, Listener, Listeners
from .http import DEFAULT_HOLD
from .machine import REJECTED, BreakerMachine
from .permit import _FAILURE, _IGNORED, _SUCCESS, BreakerResult, Permit, _result

__all__ = ["BreakerResult", "CircuitBreaker", "Permit"]


T = TypeVar("T")
P = ParamSpec("P")

logger = logging.getLogger("fineflow.breaker")

_Frame = tuple[int, float, "_Frame | None"]


class CircuitBreaker(Listeners):
    """An async circuit breaker around calls to one dependency.

    Args:
        name: identifies the breaker in errors, logs and metrics.
        failure_threshold: consecutive failures that trip it (``None``: policy off).
        failure_rate_threshold: failure fraction over the window that trips it (``None``).
        slow_call_duration: seconds from which a call counts as slow (``None``: off).
        slow_call_rate_threshold: slow fraction over the window that trips it.
        window_type: ``"count"`` (last N calls) or ``"time"`` (last N seconds).
        window_size: N for the window.
        minimum_calls: outcomes the window needs before a rate can trip it.
        reset_timeout: seconds OPEN waits before half-open.
        backoff_multiplier: factor on the timeout for each repeated open (1.0: off).
        max_reset_timeout: cap of the backed-off timeout.
        jitter: fraction by which a timeout is randomly shortened (0.0: off).
        half_open_max_calls: the half-open permit budget.
        success_threshold: trial successes that close it (default: the whole budget).
        half_open_max_wait: seconds after which half-open without a verdict reopens.
        on_throttle: ``"ignore"``, ``"failure"`` or ``"hold"`` for throttled outcomes.
        max_hold: cap, in seconds, of a ``"hold"``.
        record_exceptions: exception types that count as failures.
        ignore_exceptions: exception types that count as neither (checked first).
        failure_if: predicate on a result that makes it a failure.
        throttle: returns ``None`` or retry-after seconds for a throttled result/exception
            (``fineflow._breaker_http.http_throttle`` understands HTTP 429 objects).
        clock: monotonic clock in seconds.
        random: jitter source returning floats in ``[0, 1)``.

    Raises:
        ConfigurationError: an option is invalid; the message says the fix.
    """

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int | None = 5,
        failure_rate_threshold: float | None = None,
        slow_call_duration: float | None = None,
        slow_call_rate_threshold: float = 1.0,
        window_type: WindowType = "count",
        window_size: float = 100,
        minimum_calls: int = 10,
        reset_timeout: float = 30.0,
        backoff_multiplier: float = 1.0,
        max_reset_timeout: float | None = None,
        jitter: float = 0.0,
        half_open_max_calls: int = 3,
        success_threshold: int | None = None,
        half_open_max_wait: float | None = 120.0,
        on_throttle: ThrottlePolicy = "ignore",
        max_hold: float = 60.0,
        record_exceptions: tuple[type[BaseException], ...] = (Exception,),
        ignore_exceptions: tuple[type[BaseException], ...] = (),
        failure_if: Callable[[Any], bool] | None = None,
        throttle: Callable[[object], float | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        random: Callable[[], float] = _random_module.random,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"name must be a non-empty str (got {name!r})")
        for label, types in (("record", record_exceptions), ("ignore", ignore_exceptions)):
            if not isinstance(types, tuple) or not all(
                isinstance(t, type) and issubclass(t, BaseException) for t in types
            ):
                raise ConfigurationError(
                    f"{label}_exceptions must be a tuple of exception classes "
                    f"(got {types!r}); e.g. (ConnectionError, TimeoutError)"
                )
        self.config = BreakerConfig(
            failure_threshold=failure_threshold,
            failure_rate_threshold=failure_rate_threshold,
            slow_call_duration=slow_call_duration,
            slow_call_rate_threshold=slow_call_rate_threshold,
            window_type=window_type,
            window_size=window_size,
            minimum_calls=minimum_calls,
            reset_timeout=reset_timeout,
            backoff_multiplier=backoff_multiplier,
            max_reset_timeout=max_reset_timeout,
            jitter=jitter,
            half_open_max_calls=half_open_max_calls,
            success_threshold=success_threshold,
            half_open_max_wait=half_open_max_wait,
            on_throttle=on_throttle,
            max_hold=max_hold,
        )
        self.name = name
        self._record = record_exceptions
        self._ignore = ignore_exceptions
        self._failure_if = failure_if
        self._throttle = throttle
        self._untimed = slow_call_duration is None
        self._clock = clock
        # Before the listener flags: ``_update_flags`` tells the machine whether it is quiet.
        self._machine = BreakerMachine(self.config, random=random, on_transition=self._moved)
        super().__init__()
        self._frames: ContextVar[_Frame | None] = ContextVar(f"breaker:{name}", default=None)
        self._last_fallback: BreakerResult[Any] | None = None

    def _update_flags(self) -> None:
        super()._update_flags()
        # A success needs no classification and no event, and no async listener can have
        # left events pending: folded into the machine's ``_hot_token``, the hot path's check.
        self._machine.set_quiet(
            self._failure_if is None
            and self._throttle is None
            and not self._has_success
            and not self._has_async
        )

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.name!r} {self._machine.state.value}>"

    # -- guarded calls ----------------------------------------------------------------------

    async def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``await fn(*args, **kwargs)`` through the breaker.

        Returns:
            The call's result.

        Raises:
            CircuitOpenError: the breaker rejected the call (a new instance every time).
            BaseException: whatever the call raised, after recording it.
        """
        machine = self._machine
        token = machine._hot_token
        if token >= 0:
            # The closed path's cost is mostly Python calls and attribute loads and writes,
            # so BreakerMachine.acquire and on_success are inlined for a plain, quiet breaker
            # (see BreakerMachine._refresh): admission needs no clock, and a success while
            # ``_hot_token`` is unchanged (same epoch, still no listener or classifier to
            # consult, nothing pending) is two attribute writes and one clock read.
            machine.calls += 1
            try:
                # Without kwargs, the call skips building the call from an (empty) dict.
                result = await (fn(*args, **kwargs) if kwargs else fn(*args))  # type: ignore[call-arg]
            except BaseException as exc:
                self._on_exception(token, 0.0, exc)
                if self._pending and isinstance(exc, Exception):
                    await self.flush_events()
                raise
            if token == machine._hot_token:
                machine.successes += 1
                machine.last_success_time = self._clock()
                return result
            self._on_result(token, 0.0, result)
        else:
            if machine._fast and self._untimed:
                # Admitted for sure (a window to feed, say): the start time is never needed.
                machine.calls += 1
                token = machine._epoch
                start = 0.0
            else:
                start = self._clock()
                token = machine.acquire(start)
                if token < 0:
                    if self._has_rejection or self._pending:
                        await self._rejected(start)
                    raise CircuitOpenError(self.name, machine.retry_after(start))
            try:
                result = await fn(*args, **kwargs)
            except BaseException as exc:
                self._on_exception(token, start, exc)
                if self._pending and isinstance(exc, Exception):
                    await self.flush_events()
                raise
            self._on_result(token, start, result)
        if self._pending:
            await self.flush_events()
        return result

    async def execute(
        self,
        fn: Callable[..., Awaitable[T]],
        /,
        *args: Any,
        fallback: Callable[[], T | Awaitable[T]] | None = None,
        **kwargs: Any,
    ) -> BreakerResult[T]:
        """Run the call through the breaker, answering a rejection with ``fallback()``.

        Args:
            fn: the async callable to guard.
            fallback: sync or async callable without arguments whose value is returned
                (``from_fallback=True``) when the breaker rejects the call.

        Returns:
            A ``BreakerResult`` with the value, the state and where the value came from.

        Raises:
            CircuitOpenError: rejected and no ``fallback`` was given.
            BaseException: whatever the call raised, after recording it (the fallback
                answers rejections only, not failures).
        """
        machine = self._machine
        token = machine._hot_token
        if token >= 0:
            # The same inlined closed path as ``call``.
            machine.calls += 1
            try:
                result = await (fn(*args, **kwargs) if kwargs else fn(*args))
            except BaseException as exc:
                self._on_exception(token, 0.0, exc)
                if self._pending and isinstance(exc, Exception):
                    await self.flush_events()
                raise
            if token == machine._hot_token:
                machine.successes += 1
                machine.last_success_time = self._clock()
                return _result(BreakerResult, (result, machine.state, False))
            self._on_result(token, 0.0, result)
            if self._pending:
                await self.flush_events()
            return _result(BreakerResult, (result, machine.state, False))
        start = self._clock()
        if start < machine._reject_until:
            # BreakerMachine.acquire's rejection, inlined: the open path is meant to be cheap.
            machine.calls += 1
            machine.rejections += 1
            token = REJECTED
        else:
            token = machine.acquire(start)
        if token < 0:
            if fallback is None:
                raise await self._rejected(start)
            if self._has_rejection:
                self._emit("rejection", start, None)
            machine.fallbacks += 1
            value = fallback()
            if hasattr(value, "__await__"):
                value = await cast("Awaitable[T]", value)
            if self._pending:
                await self.flush_events()
            state = machine.state
            last = self._last_fallback
            # Results are immutable, so a constant fallback reuses one instance.
            if last is not None and last.value is value and last.state is state:
                return last
            self._last_fallback = last = _result(BreakerResult, (value, state, True))
            return last
        result = await self._call_admitted(token, start, fn, *args, **kwargs)
        return _result(BreakerResult, (result, machine.state, False))

    async def _call_admitted(
        self, token: int, start: float, fn: Callable[..., Awaitable[T]], /, *a: Any, **kw: Any
    ) -> T:
        try:
            result = await fn(*a, **kw)
        except BaseException as exc:
            self._on_exception(token, start, exc)
            if self._pending and isinstance(exc, Exception):
                await self.flush_events()
            raise
        self._on_result(token, start, result)
        if self._pending:
            await self.flush_events()
        return result

    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        """Decorate an async function so every call goes through ``call``."""

        @functools.wraps(fn)
        async def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
            return await self.call(fn, *args, **kwargs)

        return guarded

    async def __aenter__(self) -> Self:
        """Take a permit for the ``async with`` body.

        Raises:
            CircuitOpenError: the breaker rejected the call.
        """
        start = self._clock()
        token = self._machine.acquire(start)
        if token < 0:
            raise await self._rejected(start)
        # Per task (and nesting level) state lives in a context variable, never on self.
        self._frames.set((token, start, self._frames.get()))
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        frame = self._frames.get()
        if frame is None:
            raise RuntimeError("CircuitBreaker.__aexit__ without a matching __aenter__")
        token, start, parent = frame
        self._frames.set(parent)
        if exc is None:
            self._settle(_SUCCESS, token, start, None)
        else:
            self._on_exception(token, start, exc)
        if self._pending and (exc is None or isinstance(exc, Exception)):
            await self.flush_events()

    def try_acquire(self) -> Permit | None:
        """Take a permit without running anything; ``None`` when rejected.

        The caller must settle the permit exactly once (``success()``, ``failure()``,
        ``ignore()``, ...). Async listeners run at the next ``flush_events()``.
        """
        start = self._clock()
        token = self._machine.acquire(start)
        if token < 0:
            if self._has_rejection:
                self._emit("rejection", start, None)
            return None
        return Permit(self, token, start)

    def retry_after(self) -> float | None:
        """Seconds until the breaker may admit a call again, ``None`` when unknown."""
        return self._machine.retry_after(self._clock())

    # -- state and control ------------------------------------------------------------------

    @property
    def state(self) -> CircuitState:
        """The current state (OPEN turns HALF_OPEN only when the next caller arrives)."""
        return self._machine.state

    def metrics(self) -> BreakerMetrics:
        """A frozen snapshot of the state and counters."""
        return self._machine.snapshot(self.name)

    def reset(self) -> None:
        """Return to CLOSED, forgetting failures, holds and backoff (totals are kept)."""
        self._machine.reset(self._clock())

    def force_open(self) -> None:
        """Reject every call until ``reset()``."""
        self._machine.force_open(self._clock())

    def disable(self) -> None:
        """Admit every call and never trip until ``reset()``."""
        self._machine.disable(self._clock())

    def metrics_only(self) -> None:
        """Admit every call and keep measuring, but never trip, until ``reset()``."""
        self._machine.metrics_only(self._clock())

    # -- recording --------------------------------------------------------------------------

    async def _rejected(self, now: float) -> CircuitOpenError:
        if self._has_rejection:
            self._emit("rejection", now, None)
        if self._pending:
            await self.flush_events()
        return CircuitOpenError(self.name, self._machine.retry_after(now))

    def _on_exception(self, token: int, start: float, exc: BaseException) -> None:
        if not isinstance(exc, Exception):  # cancellation, KeyboardInterrupt, SystemExit
            self._settle(_IGNORED, token, start, None)
            return
        if self._throttle is not None:
            retry_after = self._throttle(exc)
            if retry_after is not None:
                self._settle_throttled(token, start, retry_after, exc)
                return
        if isinstance(exc, self._ignore):
            self._settle(_IGNORED, token, start, None)
        elif isinstance(exc, self._record):
            self._settle(_FAILURE, token, start, exc)
        else:
            self._settle(_SUCCESS, token, start, None)

    def _on_result(self, token: int, start: float, result: object) -> None:
        if self._throttle is not None:
            retry_after = self._throttle(result)
            if retry_after is not None:
                self._settle_throttled(token, start, retry_after, None)
                return
        failed = self._failure_if is not None and self._failure_if(result)
        self._settle(_FAILURE if failed else _SUCCESS, token, start, None)

    def _settle_throttled(
        self, token: int, start: float, retry_after: float | None, exc: BaseException | None
    ) -> None:
        policy = self.config.on_throttle
        if policy == "failure":
            self._settle(_FAILURE, token, start, exc)
            return
        if policy == "hold":
            seconds = DEFAULT_HOLD if retry_after is None else retry_after
            self._machine.hold(self._clock(), seconds)
        self._settle(_IGNORED, token, start, None)

    def _settle(self, outcome: int, token: int, start: float, exc: BaseException | None) -> None:
        machine = self._machine
        if outcome == _IGNORED:
            machine.on_ignored(token)
            return
        now = self._clock()
        if outcome == _SUCCESS:
            machine.on_success(token, now, now - start)
            if self._has_success:
                self._emit("success", now, None)
        else:
            machine.on_failure(token, now, now - start)
            if self._has_failure:
                self._emit("failure", now, exc)

    def _moved(self, old: CircuitState, new: CircuitState, reason: str, now: float) -> None:
        level = logging.WARNING if new in _ALARMING else logging.INFO
        logger.log(
            level,
            "circuit breaker %r: %s -> %s (%s)",
            self.name,
            old.value,
            new.value,
            reason,
            extra={"breaker": self.name, "from_state": old, "to_state": new, "reason": reason},
        )
        if self._has_state_change:
            self._emit("state_change", now, None, old, reason)

    def _emit(
        self,
        kind: EventKind,
        now: float,
        exc: BaseException | None,
        old: CircuitState | None = None,
        reason: str | None = None,
    ) -> None:
        event = BreakerEvent(kind, self.name, self._machine.state, old, reason, now, exc)
        self._dispatch(event)

    def add_listener(self, kind: EventKind, listener: Listener) -> None:
        """Call ``listener(event)`` on every event of ``kind``.

        Args:
            kind: ``"state_change"``, ``"success"``, ``"failure"`` or ``"rejection"``.
            listener: a sync callable, run at once, or an async one, awaited (never spawned
                as a task) by the task whose call caused the event, before that call returns.
                Events of ``reset()`` and the other synchronous methods, and of permits
                settled by hand, reach async listeners at the next ``call``/``execute``/
                ``async with`` or ``await breaker.flush_events()``. A listener's exception
                is logged and never reaches the guarded call.

        Raises:
            ConfigurationError: unknown ``kind`` or ``listener`` not callable.
        """
        super().add_listener(kind, listener)


_ALARMING = frozenset({CircuitState.OPEN, CircuitState.FORCED_OPEN})
