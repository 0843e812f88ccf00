"""The async circuit breaker: the pure state machine wired to a clock, listeners and logging.

One guarded call, whichever way it comes in (``call``, ``execute``, ``async with``, or a
``Permit`` from ``try_acquire``, which the ASGI and aiohttp middlewares use):

1. *Admit*: ``BreakerMachine.admit(start)``. ``start`` is a clock reading, skipped (0.0)
   while the machine admits all and no slow-call policy needs the call's duration. A
   rejection is an event; ``call`` raises ``CircuitOpenError``, ``execute`` may answer with
   its fallback instead.
2. *Run* the call with nothing held. ``fn(*args, **kwargs)`` is called on the event loop
   and what it returns is awaited if it is awaitable, so a plain function runs inline and a
   coroutine function is awaited; with ``to_thread=True`` a plain function runs in a worker
   thread (``anyio.to_thread.run_sync``) instead.
3. *Classify* what it returned or raised into an ``Outcome`` (``_outcome_of_result``,
   ``_outcome_of_exception``; a throttled answer goes through the ``on_throttle`` policy).
4. *Settle*: ``BreakerMachine.settle(token, outcome, now, start)``, then the success or
   failure event (``_settle``; when nothing listens or classifies, ``call`` settles a
   success with the machine alone).
5. Await the async listeners of the events the call caused (``flush_events``).

There is no lock anywhere: every touch of the machine is synchronous and so atomic with
respect to other tasks of the event loop, and the guarded call is awaited with nothing held.
A breaker belongs to one event loop thread (asyncio or trio, through anyio).
"""

from __future__ import annotations

import functools
import inspect
import logging
import random as _random_module
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from contextvars import ContextVar
from types import TracebackType
from typing import Any, ParamSpec, Self, TypeVar, overload

import anyio.to_thread

from .._errors import CircuitOpenError, ConfigurationError
from .._logfields import log_extra
from . import live
from .config import BreakerConfig, BreakerMetrics, CircuitState, ThrottlePolicy, WindowType
from .events import BreakerEvent, EventKind, Listener, Listeners, is_async_callable
from .http import DEFAULT_HOLD
from .link import SharedLink
from .machine import BreakerMachine, Outcome
from .result import BreakerResult
from .shared import SharesBreakers

__all__ = ["CircuitBreaker", "Permit", "check_shared"]


T = TypeVar("T")
P = ParamSpec("P")
HookArgs = ParamSpec("HookArgs")

logger = logging.getLogger("fineflow.breaker")

_SUCCESS, _FAILURE, _IGNORED = Outcome.SUCCESS, Outcome.FAILURE, Outcome.IGNORED

_Frame = tuple[int, float, "_Frame | None"]


async def _in_thread(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run ``fn`` for a ``to_thread`` breaker: a plain function in a worker thread, a
    coroutine function on the event loop; an awaitable result is awaited on the loop."""
    if is_async_callable(fn):
        return await fn(*args, **kwargs)
    result = await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))
    if inspect.isawaitable(result):
        result = await result
    return result


def _check_options(
    name: object,
    to_thread: object,
    record_exceptions: object,
    ignore_exceptions: object,
) -> None:
    """Raise ``ConfigurationError`` for the options ``BreakerConfig`` does not check."""
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"name must be a non-empty str (got {name!r})")
    if not isinstance(to_thread, bool):
        raise ConfigurationError(f"to_thread must be True or False (got {to_thread!r})")
    for label, types in (("record", record_exceptions), ("ignore", ignore_exceptions)):
        if not isinstance(types, tuple) or not all(
            isinstance(t, type) and issubclass(t, BaseException) for t in types
        ):
            raise ConfigurationError(
                f"{label}_exceptions must be a tuple of exception classes "
                f"(got {types!r}); e.g. (ConnectionError, TimeoutError)"
            )


def check_shared(shared: object) -> SharesBreakers | None:
    """``shared`` if it is ``None`` or a ``SharesBreakers`` storage.

    Raises:
        ConfigurationError: anything else.
    """
    if shared is None or isinstance(shared, SharesBreakers):
        return shared
    raise ConfigurationError(
        f"shared must be a storage that can share breaker state (PostgresStorage, "
        f"RedisStorage or MemoryStorage), got {shared!r}"
    )


def _weak(method: Callable[HookArgs, None]) -> Callable[HookArgs, None]:
    """A hook for the machine that holds the breaker's bound ``method`` weakly: without a
    reference cycle a dropped breaker is freed at once (and leaves the live set), not at
    the next garbage collection."""
    ref = weakref.WeakMethod(method)

    def hook(*args: HookArgs.args, **kwargs: HookArgs.kwargs) -> None:
        bound = ref()
        if bound is not None:
            bound(*args, **kwargs)

    return hook


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
            (``fineflow.http_throttle`` understands HTTP 429 objects).
        to_thread: run plain (synchronous) callables in a worker thread through
            ``anyio.to_thread.run_sync`` instead of inline on the event loop. Coroutine
            functions are awaited on the loop either way.
        clock: monotonic clock in seconds.
        wall_clock: wall clock in epoch seconds, read only by ``metrics()`` to give the
            ``*_at`` times (never by a call).
        random: jitter source returning floats in ``[0, 1)``.
        shared: a storage (``PostgresStorage``, ``RedisStorage``, ``MemoryStorage``) that
            shares this breaker's state with every instance using the same name there:
            opens, closes and a global half-open trial budget, while calls are still
            decided in process (see "Sharing state between instances" in the docs). Needs
            asyncio; the storage must be open for the state to be shared.
        shared_failures: with ``shared``, also count a closed breaker's failures with the
            other instances': their sum trips the breaker everywhere (``failure_threshold``
            failures since the last success, and the rates over the window), reported in
            batches (0.1 s after a failure, else 1 s after a call), never a round trip per
            call. Each instance still trips on its own evidence too.

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
        to_thread: bool = False,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        random: Callable[[], float] = _random_module.random,
        shared: SharesBreakers | None = None,
        shared_failures: bool = False,
    ) -> None:
        _check_options(name, to_thread, record_exceptions, ignore_exceptions)
        shared = check_shared(shared)
        if shared_failures and shared is None:
            raise ConfigurationError(
                f"circuit breaker {name!r}: shared_failures=True counts failures across "
                "instances through a shared storage; pass shared=storage too"
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
        self.to_thread = to_thread
        self._untimed = slow_call_duration is None
        self._clock = clock
        self._wall_clock = wall_clock
        # Transitions by (from, to), counted where they are logged: never touched by a call.
        self._transitions: dict[tuple[CircuitState, CircuitState], int] = {}
        self._machine = BreakerMachine(
            self.config,
            random=random,
            on_transition=_weak(self._moved),
            remote=shared is not None,
            on_trial_success=_weak(self._trial_succeeded),
            on_outcome=_weak(self._heard) if shared_failures else None,
        )
        self.shared = shared
        self.shared_failures = shared_failures
        self._link = (
            None
            if shared is None
            else SharedLink(
                name,
                shared.breaker_store(),
                self._machine,
                clock=clock,
                random=random,
                count=shared_failures,
            )
        )
        self._fallbacks = 0  # the breaker serves fallbacks, the machine never sees them
        super().__init__()
        self._frames: ContextVar[_Frame | None] = ContextVar(f"breaker:{name}", default=None)
        self._last_fallback: BreakerResult[Any] | None = None
        live.track(self)

    def _update_flags(self) -> None:
        super()._update_flags()
        # A result needs no classification and a success no event, and no async listener can
        # have left events pending: a success is then only ``BreakerMachine.settle``.
        self._quiet = (
            self._failure_if is None
            and self._throttle is None
            and not self._has_success
            and not self._has_async
        )

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.name!r} {self._machine.state.value}>"

    # -- guarded calls ----------------------------------------------------------------------

    @overload
    async def call(
        self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> T: ...

    @overload
    async def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T: ...

    async def call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` through the breaker, awaiting it if it is awaitable.

        ``fn`` may be a coroutine function or a plain function: a plain one runs inline on
        the event loop, or in a worker thread when the breaker was made with
        ``to_thread=True``. Either way the same rules classify what it returns or raises.

        Returns:
            The call's result.

        Raises:
            CircuitOpenError: the breaker rejected the call (a new instance every time).
            BaseException: whatever the call raised, after recording it.
        """
        # ``_admit``, written out: a Python call is a tenth of this path's cost.
        machine = self._machine
        start = 0.0 if machine.admits_all and self._untimed else self._clock()
        token = machine.admit(start)
        if token < 0:
            raise await self._rejected(start)
        try:
            if self.to_thread:
                result = await _in_thread(fn, args, kwargs)
            else:
                # Without kwargs, the call skips building the call from an (empty) dict.
                result = fn(*args, **kwargs) if kwargs else fn(*args)
                # Await first, ask later: a coroutine function's call costs nothing more
                # than before (a type test here would cost the async path ~3%), and a plain
                # function's result is told apart by the TypeError ``await`` raises on it.
                try:
                    result = await result
                except TypeError:
                    if inspect.isawaitable(result):
                        raise  # the awaited call itself raised TypeError

        except BaseException as exc:
            await self._settle_exception(token, start, exc)
            raise
        if self._quiet:  # ``_settle`` without events, for a success
            now = self._clock()
            machine.settle(token, _SUCCESS, now, start)
            return result
        self._settle(token, start, self._outcome_of_result(result))
        if self._pending:
            await self.flush_events()
        return result

    @overload
    async def execute(
        self,
        fn: Callable[..., Awaitable[T]],
        /,
        *args: Any,
        fallback: Callable[[], T | Awaitable[T]] | None = None,
        **kwargs: Any,
    ) -> BreakerResult[T]: ...

    @overload
    async def execute(
        self,
        fn: Callable[..., T],
        /,
        *args: Any,
        fallback: Callable[[], T | Awaitable[T]] | None = None,
        **kwargs: Any,
    ) -> BreakerResult[T]: ...

    async def execute(
        self,
        fn: Callable[..., Any],
        /,
        *args: Any,
        fallback: Callable[[], Any] | None = None,
        **kwargs: Any,
    ) -> BreakerResult[Any]:
        """Run the call through the breaker, answering a rejection with ``fallback()``.

        Args:
            fn: the callable to guard, run as ``call`` runs it (a coroutine function, or a
                plain function inline or, with ``to_thread=True``, in a worker thread).
            fallback: sync or async callable without arguments whose value is returned
                (``from_fallback=True``) when the breaker rejects the call.

        Returns:
            A ``BreakerResult`` with the value, the state and where the value came from.

        Raises:
            CircuitOpenError: rejected and no ``fallback`` was given.
            BaseException: whatever the call raised, after recording it (the fallback
                answers rejections only, not failures).
        """
        # ``_admit``, written out as in ``call``: the rejection path is meant to be cheap.
        machine = self._machine
        start = 0.0 if machine.admits_all and self._untimed else self._clock()
        token = machine.admit(start)
        if token < 0:
            if fallback is None:
                raise await self._rejected(start)
            if self._link is not None:
                self._link.rejected()
            if self._has_rejection:
                self._emit("rejection", start, None)
            self._fallbacks += 1
            value = fallback()
            if hasattr(value, "__await__"):
                value = await value
            if self._pending:
                await self.flush_events()
            state = machine.state
            last = self._last_fallback
            # Results are immutable, so a constant fallback reuses one instance.
            if last is not None and last.value is value and last.state is state:
                return last
            self._last_fallback = last = BreakerResult(value, state, True)
            return last
        try:
            if self.to_thread:
                result = await _in_thread(fn, args, kwargs)
            else:
                result = fn(*args, **kwargs)
                try:  # as in ``call``
                    result = await result
                except TypeError:
                    if inspect.isawaitable(result):
                        raise

        except BaseException as exc:
            await self._settle_exception(token, start, exc)
            raise
        self._settle(token, start, self._outcome_of_result(result))
        if self._pending:
            await self.flush_events()
        return BreakerResult(result, self._machine.state, False)

    @overload
    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]: ...

    @overload
    def __call__(self, fn: Callable[P, T]) -> Callable[P, Coroutine[Any, Any, T]]: ...

    def __call__(self, fn: Callable[..., Any]) -> Callable[..., Coroutine[Any, Any, Any]]:
        """Decorate a function so every call goes through ``call``.

        The decorated function is a coroutine function even when ``fn`` is a plain one
        (the breaker is async): ``await guarded(...)``.
        """

        @functools.wraps(fn)
        async def guarded(*args: Any, **kwargs: Any) -> Any:
            return await self.call(fn, *args, **kwargs)

        return guarded

    async def __aenter__(self) -> Self:
        """Take a permit for the ``async with`` body.

        Raises:
            CircuitOpenError: the breaker rejected the call.
        """
        token, start = self._admit()
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
        if exc is not None:
            await self._settle_exception(token, start, exc)
            return
        self._settle(token, start, _SUCCESS)
        if self._pending:
            await self.flush_events()

    def try_acquire(self) -> Permit | None:
        """Take a permit without running anything; ``None`` when rejected.

        The caller must settle the permit exactly once (``success()``, ``failure()``,
        ``ignore()``, ...). Async listeners run at the next ``flush_events()``.
        """
        token, start = self._admit()
        if token < 0:
            if self._link is not None:
                self._link.rejected()
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
        offset = self._wall_clock() - self._clock()
        return self._machine.snapshot(self.name, fallbacks=self._fallbacks, wall_offset=offset)

    def transitions(self) -> dict[tuple[CircuitState, CircuitState], int]:
        """How often each ``(from, to)`` state change happened (a copy; moves that never
        happened are absent)."""
        return dict(self._transitions)

    def reset(self) -> None:
        """Return to CLOSED, forgetting failures, holds and backoff (totals are kept).

        A shared breaker closes the shared state too, for every instance (in the
        background).
        """
        self._machine.reset(self._clock())
        if self._link is not None:
            self._link.reset()

    async def sync(self) -> bool:
        """Read the shared state now and adopt it (a shared breaker, at startup).

        A shared breaker also reads it by itself when the storage starts listening, without
        blocking any call; this waits for it. Never raises because of the store.

        Returns:
            ``True`` if the state was read (always, for a breaker without ``shared``);
            ``False`` if the store failed (logged once; the breaker goes on locally).
        """
        return True if self._link is None else await self._link.sync()

    async def aclose(self) -> None:
        """Stop sharing: no more notifications, background work cancelled. The breaker
        goes on with its local state. (Closing the storage stops the work too.)"""
        self.detach()

    def detach(self) -> None:
        """``aclose()``, synchronously (what a registry does to a breaker it evicts)."""
        if self._link is not None:
            self._link.detach()
            self._machine.follow(False)

    def force_open(self) -> None:
        """Reject every call until ``reset()``."""
        self._machine.force_open(self._clock())

    def disable(self) -> None:
        """Admit every call and never trip until ``reset()``."""
        self._machine.disable(self._clock())

    def metrics_only(self) -> None:
        """Admit every call and keep measuring, but never trip, until ``reset()``."""
        self._machine.metrics_only(self._clock())

    # -- admitting and settling --------------------------------------------------------------

    def _admit(self) -> tuple[int, float]:
        """Ask the machine for a permit: ``(token, start)``, the token ``< 0`` if rejected."""
        machine = self._machine
        # The clock is read only when the machine needs the time to decide or a slow-call
        # policy needs the call's duration: else ``start`` is 0.0, read by neither ``admit``
        # nor ``settle``.
        start = 0.0 if machine.admits_all and self._untimed else self._clock()
        return machine.admit(start), start

    async def _rejected(self, now: float) -> CircuitOpenError:
        if self._link is not None:
            self._link.rejected()
        if self._has_rejection:
            self._emit("rejection", now, None)
        if self._pending:
            await self.flush_events()
        return CircuitOpenError(self.name, self._machine.retry_after(now))

    def _settle(
        self, token: int, start: float, outcome: Outcome, exc: BaseException | None = None
    ) -> None:
        """Settle an admitted call: the machine counts it, then listeners hear of it."""
        now = self._clock()
        self._machine.settle(token, outcome, now, start)
        if outcome is _SUCCESS:
            if self._has_success:
                self._emit("success", now, None)
        elif outcome is _FAILURE and self._has_failure:
            self._emit("failure", now, exc)

    async def _settle_exception(self, token: int, start: float, exc: BaseException) -> None:
        self._settle(token, start, self._outcome_of_exception(exc), exc)
        if self._pending and isinstance(exc, Exception):
            await self.flush_events()

    def _outcome_of_exception(self, exc: BaseException) -> Outcome:
        if not isinstance(exc, Exception):  # cancellation, KeyboardInterrupt, SystemExit
            return _IGNORED
        if self._throttle is not None:
            retry_after = self._throttle(exc)
            if retry_after is not None:
                return self._throttled(retry_after)
        if isinstance(exc, self._ignore):
            return _IGNORED
        return _FAILURE if isinstance(exc, self._record) else _SUCCESS

    def _outcome_of_result(self, result: object) -> Outcome:
        if self._throttle is not None:
            retry_after = self._throttle(result)
            if retry_after is not None:
                return self._throttled(retry_after)
        failed = self._failure_if is not None and self._failure_if(result)
        return _FAILURE if failed else _SUCCESS

    def _throttled(self, retry_after: float | None) -> Outcome:
        """Apply the ``on_throttle`` policy to a throttled answer; the outcome to settle."""
        policy = self.config.on_throttle
        if policy == "failure":
            return _FAILURE
        if policy == "hold":
            seconds = DEFAULT_HOLD if retry_after is None else retry_after
            self._machine.hold(self._clock(), seconds)
        return _IGNORED

    def _heard(self, now: float, failed: bool) -> None:
        if self._link is not None:
            self._link.heard(now, failed)

    def _trial_succeeded(self, now: float) -> None:
        if self._link is not None:
            self._link.trial_succeeded(now)

    def _moved(self, old: CircuitState, new: CircuitState, reason: str, now: float) -> None:
        if self._link is not None:
            self._link.moved(old, new, now)
        key = (old, new)
        self._transitions[key] = self._transitions.get(key, 0) + 1
        level = logging.WARNING if new in _ALARMING else logging.INFO
        logger.log(
            level,
            "circuit breaker %r: %s -> %s (%s)",
            self.name,
            old.value,
            new.value,
            reason,
            extra=log_extra(
                "circuit_breaker_transition",
                breaker=self.name,
                from_state=old.value,
                to_state=new.value,
                reason=reason,
            ),
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


class Permit:
    """One admitted call, to be settled exactly once (later settlements are ignored).

    Returned by ``CircuitBreaker.try_acquire`` for code that cannot wrap the call in
    ``call``/``async with`` (the ASGI and aiohttp middlewares use it). Every method settles
    through the same path as ``call``; async listeners run at the next ``flush_events()``.
    """

    __slots__ = ("_breaker", "_start", "_token", "done")

    def __init__(self, breaker: CircuitBreaker, token: int, start: float) -> None:
        self._breaker = breaker
        self._token = token
        self._start = start
        self.done = False

    def _settle(self, outcome: Outcome, exc: BaseException | None = None) -> None:
        if not self.done:
            self.done = True
            self._breaker._settle(self._token, self._start, outcome, exc)

    def success(self) -> None:
        """The call succeeded."""
        self._settle(_SUCCESS)

    def failure(self, exc: BaseException | None = None) -> None:
        """The call failed (``exc`` is passed on to failure listeners)."""
        self._settle(_FAILURE, exc)

    def ignore(self) -> None:
        """The call was cancelled or its outcome says nothing about health."""
        self._settle(_IGNORED)

    def throttled(self, retry_after: float | None) -> None:
        """The upstream answered 429; apply the breaker's ``on_throttle`` policy."""
        if not self.done:
            self._settle(self._breaker._throttled(retry_after))

    def exception(self, exc: BaseException) -> None:
        """Settle by classifying ``exc`` as ``call`` does (cancellation is ignored)."""
        if not self.done:
            self._settle(self._breaker._outcome_of_exception(exc), exc)

    def result(self, value: object) -> None:
        """Settle by classifying a result as ``call`` does (``failure_if``, ``throttle``)."""
        if not self.done:
            self._settle(self._breaker._outcome_of_result(value))
