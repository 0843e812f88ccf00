"""Circuit-breaker events and how listeners (sync or async) receive them."""

from __future__ import annotations

import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, cast

from .._errors import ConfigurationError
from .._logfields import error_text, log_extra
from .config import CircuitState

__all__ = [
    "EVENT_KINDS",
    "BreakerEvent",
    "EventKind",
    "Listener",
    "Listeners",
    "is_async_callable",
]

EventKind = Literal["state_change", "success", "failure", "rejection"]
EVENT_KINDS: tuple[EventKind, ...] = ("state_change", "success", "failure", "rejection")

logger = logging.getLogger("fineflow.breaker")


@dataclass(frozen=True, slots=True)
class BreakerEvent:
    """Something that happened to a breaker, as passed to its listeners.

    Attributes:
        kind: ``"state_change"``, ``"success"``, ``"failure"`` or ``"rejection"``.
        breaker: the breaker's name.
        state: the state after the event (the new state for a state change).
        from_state: the previous state (state changes only).
        reason: why the state changed (state changes only).
        time: the breaker clock's reading.
        exception: the exception that made the call fail, when there was one.
    """

    kind: EventKind
    breaker: str
    state: CircuitState
    from_state: CircuitState | None
    reason: str | None
    time: float
    exception: BaseException | None


AsyncListener = Callable[[BreakerEvent], Awaitable[None]]
Listener = Callable[[BreakerEvent], None] | AsyncListener


def is_async_callable(fn: object) -> bool:
    """Whether calling ``fn`` gives a coroutine: an ``async def`` function, a partial of one,
    or an object whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - async callable objects
    )


class Listeners:
    """Listener bookkeeping for ``CircuitBreaker``: sync listeners run at once, async ones
    are queued and awaited by ``flush_events`` in the task that produced the event."""

    def __init__(self) -> None:
        self._sync: dict[EventKind, list[Callable[[BreakerEvent], object]]] = {
            k: [] for k in EVENT_KINDS
        }
        self._async: dict[EventKind, list[AsyncListener]] = {k: [] for k in EVENT_KINDS}
        self._pending: deque[tuple[AsyncListener, BreakerEvent]] = deque()
        self._update_flags()

    def _update_flags(self) -> None:
        def has(kind: EventKind) -> bool:
            return bool(self._sync[kind] or self._async[kind])

        self._has_state_change = has("state_change")
        self._has_success = has("success")
        self._has_failure = has("failure")
        self._has_rejection = has("rejection")
        # Events can be pending only while this is true (it stays true until they are
        # delivered, even if the last async listener was removed in between).
        self._has_async = bool(self._pending) or any(self._async.values())

    def add_listener(self, kind: EventKind, listener: Listener) -> None:
        """Call ``listener(event)`` on every event of ``kind`` (see ``CircuitBreaker``).

        Raises:
            ConfigurationError: unknown ``kind`` or ``listener`` not callable.
        """
        if kind not in EVENT_KINDS:
            raise ConfigurationError(f"unknown event kind {kind!r}; use one of {EVENT_KINDS}")
        if not callable(listener):
            raise ConfigurationError(f"listener must be callable (got {listener!r})")
        if is_async_callable(listener):
            self._async[kind].append(cast("AsyncListener", listener))
        else:
            self._sync[kind].append(listener)
        self._update_flags()

    def remove_listener(self, kind: EventKind, listener: Listener) -> None:
        """Stop calling ``listener`` for ``kind``.

        Raises:
            ValueError: it was not registered for ``kind``.
        """
        if is_async_callable(listener):
            self._async[kind].remove(cast("AsyncListener", listener))
        else:
            self._sync[kind].remove(listener)
        self._update_flags()

    def _dispatch(self, event: BreakerEvent) -> None:
        for listener in self._sync[event.kind]:
            try:
                listener(event)
            except Exception as exc:
                _log_listener_failure(event, exc)
        for async_listener in self._async[event.kind]:
            self._pending.append((async_listener, event))

    @property
    def events_pending(self) -> bool:
        """Whether async listeners wait for ``flush_events()`` (cheap: no await to ask)."""
        return bool(self._pending)

    async def flush_events(self) -> None:
        """Await the async listeners of every queued event, each event exactly once.

        The guarded-call methods call this themselves; call it after the synchronous
        control methods (``reset()`` ...) or hand-settled permits to deliver their events
        right away.
        """
        pending = self._pending
        while pending:
            listener, event = pending.popleft()
            try:
                await listener(event)
            except Exception as exc:
                _log_listener_failure(event, exc)
        if self._has_async and not any(self._async.values()):
            self._update_flags()  # the last async listener went away meanwhile


def _log_listener_failure(event: BreakerEvent, exc: Exception) -> None:
    logger.exception(
        "breaker %r: %s listener failed",
        event.breaker,
        event.kind,
        extra=log_extra(
            "circuit_breaker_listener_failed",
            breaker=event.breaker,
            reason=f"{event.kind} listener",
            error=error_text(exc),
        ),
    )
