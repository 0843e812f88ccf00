"""Breaker state shared between instances: the values, the store protocol and the reference
rules of the shared row (pure: no I/O, no clock; ``now`` is a parameter).

Theory of operation
-------------------
* Calls are still decided in process by each instance's ``BreakerMachine``. What is shared
  is one *row* per breaker name in a store (PostgreSQL, Redis, or a ``MemoryStorage`` for
  one process): its state (CLOSED, OPEN, HALF_OPEN), a *generation* bumped by every shared
  transition, the open deadline on the store's clock, the backoff step, and the trial
  permits granted and trial successes of the current half-open round.
* A deadline travels as the time *remaining* on the store's clock when the row was read
  (``SharedState.open_for``), so instance clocks are never compared.
* Every change is one atomic step of the row (``step_row`` here; one SQL function or one
  Lua script in the real stores), chosen by an ``Action``:

  ``OPEN``      a closed row opens (an open or half-open row is left as it is: the caller
                adopts it). Failures seen anywhere are evidence, so this ignores generations.
  ``ACQUIRE``   ask for trial permits: an open row past its deadline turns HALF_OPEN; a
                half-open row grants at most ``half_open_max_calls`` in total across all
                instances, or reopens when its round had no verdict within the wait.
  ``SUCCESS``   a trial of round ``generation`` succeeded: enough of them close the row.
  ``FAILURE``   a trial of round ``generation`` failed: the row reopens, backed off.
  ``CLOSE``     a manual ``reset()``: the row closes and forgets its backoff.

  A ``SUCCESS`` or ``FAILURE`` whose generation is not the row's is stale and changes
  nothing. Every change of state bumps the generation, and the store tells every instance
  (PostgreSQL NOTIFY, Redis pub/sub, a direct call in process).
* With ``shared_failures=True`` the instances also count a closed breaker's outcomes
  together: each counts in process and reports a ``Tally`` in batches (``link``'s
  ``COUNT_INTERVAL`` and ``QUIET_INTERVAL``; never a round trip per call), which
  ``count_row`` adds to the row of the same closed generation (a tally of an older one is
  stale and dropped):

  - the *streak*, failures since the last success as the tallies arrive: a tally with a
    success sets it to the failures after that success, one without adds its failures;
    ``failure_threshold`` opens the row;
  - a sliding window of calls, failures and slow calls, estimated from two fixed windows
    (the current one and the one before, weighted by how much of it still overlaps): of
    ``window_seconds`` on the store's clock, or of ``window_calls`` calls (the current window
    ends when it holds that many). The failure rate and slow-call rate open the row once the
    estimate holds ``minimum_calls``.

  The counters belong to one closed generation: any transition starts them afresh.
* The reopen timeout is ``min(reset_timeout * backoff_multiplier ** step,
  max_reset_timeout) * shorten``; ``shorten`` (``1 - jitter * random()``) is drawn by the
  instance that sends the step.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

from .config import BreakerConfig, CircuitState

__all__ = [
    "DEFAULT_SHARED_WAIT",
    "Action",
    "BreakerStore",
    "SharedPolicy",
    "SharedRow",
    "SharedState",
    "SharesBreakers",
    "Tally",
    "Task",
    "Watcher",
    "breaker_channel",
    "count_row",
    "step_row",
]

#: Seconds a shared half-open round may go without a verdict when ``half_open_max_wait`` is
#: ``None``: permits granted to an instance that crashed must not wedge the breaker.
DEFAULT_SHARED_WAIT = 120.0

# Backoff exponents are capped so a long run of reopens cannot overflow a float.
_MAX_STEP = 64


class Action(enum.Enum):
    """What one step of a shared row does (see the module docstring)."""

    # Open a closed row (a trip somewhere).
    OPEN = "open"
    # Ask for trial permits (moves a due open row to half-open).
    ACQUIRE = "acquire"
    # A trial of the round succeeded.
    SUCCESS = "success"
    # A trial of the round failed (or the round had no verdict in time).
    FAILURE = "failure"
    # Close by hand (``reset()``).
    CLOSE = "close"


@dataclass(frozen=True, slots=True)
class SharedState:
    """The shared row as one instance sees it after a step or a notification.

    Attributes:
        state: CLOSED, OPEN or HALF_OPEN.
        generation: bumped by every shared transition; larger is newer.
        open_for: seconds until the open deadline on the store's clock (0.0 when due or
            not open).
        granted: trial permits granted to this instance by this step (``ACQUIRE``).
        failures: the shared streak after a ``count`` (failures counted across instances
            since the last success; 0 otherwise).
    """

    state: CircuitState
    generation: int
    open_for: float = 0.0
    granted: int = 0
    failures: int = 0


@dataclass(frozen=True, slots=True)
class Tally:
    """A closed breaker's outcomes one instance counted since its last report (a value).

    Attributes:
        successes: calls that succeeded.
        failures: calls that failed.
        slow: calls (of either kind) slower than ``slow_call_duration``.
        trailing: failures after the last success among them (``failures`` when there was
            no success).
    """

    successes: int = 0
    failures: int = 0
    slow: int = 0
    trailing: int = 0

    @property
    def calls(self) -> int:
        """Calls counted (ignored outcomes are not)."""
        return self.successes + self.failures


@dataclass(frozen=True, slots=True)
class SharedPolicy:
    """What a store needs of a breaker's configuration to step its row (a value).

    Attributes:
        reset_timeout: seconds of the first open.
        backoff_multiplier: factor on the timeout of each repeated open.
        max_reset_timeout: cap of the backed-off timeout.
        half_open_max_calls: trial permits granted in total per half-open round.
        successes_to_close: trial successes that close the row.
        half_open_max_wait: seconds a half-open round may last without a verdict.
        failure_threshold: the shared streak that opens the row (``None``: not counted).
        failure_rate: the shared failure rate that opens it (``None``: no such policy).
        slow_rate: the shared slow-call rate that opens it (``None``: no such policy).
        minimum_calls: calls the window estimate must hold before a rate opens it.
        window_calls: the size of a count window (0: the window is of ``window_seconds``).
        window_seconds: the length of a time window (used when ``window_calls`` is 0).
    """

    reset_timeout: float
    backoff_multiplier: float
    max_reset_timeout: float
    half_open_max_calls: int
    successes_to_close: int
    half_open_max_wait: float
    failure_threshold: int | None = None
    failure_rate: float | None = None
    slow_rate: float | None = None
    minimum_calls: int = 1
    window_calls: int = 0
    window_seconds: float = 60.0

    @classmethod
    def of(cls, config: BreakerConfig) -> SharedPolicy:
        """The shared policy of ``config`` (``half_open_max_wait`` ``None``:
        ``DEFAULT_SHARED_WAIT``)."""
        wait = config.half_open_max_wait
        count = config.window_type == "count"
        return cls(
            reset_timeout=config.reset_timeout,
            backoff_multiplier=config.backoff_multiplier,
            max_reset_timeout=config.reset_timeout_cap,
            half_open_max_calls=config.half_open_max_calls,
            successes_to_close=config.successes_to_close,
            half_open_max_wait=DEFAULT_SHARED_WAIT if wait is None else wait,
            failure_threshold=config.failure_threshold,
            failure_rate=config.failure_rate_threshold,
            slow_rate=(
                None if config.slow_call_duration is None else config.slow_call_rate_threshold
            ),
            minimum_calls=config.minimum_calls,
            window_calls=int(config.window_size) if count else 0,
            window_seconds=0.0 if count else float(config.window_size),
        )

    def timeout(self, step: int, shorten: float) -> float:
        """Seconds the ``step``-th consecutive open lasts (0: the first)."""
        backed_off = self.reset_timeout * self.backoff_multiplier ** min(step, _MAX_STEP)
        return min(backed_off, self.max_reset_timeout) * shorten


@dataclass(frozen=True, slots=True)
class SharedRow:
    """The stored row of one breaker name (the reference form of the SQL table and the
    Redis hash). Times are readings of the store's clock, in seconds."""

    state: CircuitState = CircuitState.CLOSED
    generation: int = 0
    open_until: float = 0.0
    step: int = 0
    granted: int = 0
    successes: int = 0
    half_open_since: float = 0.0
    # The shared counting of a closed row (see ``count_row``), valid for generation ``counted``.
    counted: int = -1
    streak: int = 0
    window_start: float = 0.0
    calls: int = 0
    failures: int = 0
    slow: int = 0
    previous_calls: int = 0
    previous_failures: int = 0
    previous_slow: int = 0

    def seen_at(self, now: float, granted: int = 0) -> SharedState:
        """The row as a ``SharedState`` read at ``now``."""
        open_for = max(self.open_until - now, 0.0) if self.state is CircuitState.OPEN else 0.0
        streak = self.streak if self.counted == self.generation else 0
        return SharedState(self.state, self.generation, open_for, granted, streak)


def _reopen(row: SharedRow, now: float, policy: SharedPolicy, shorten: float) -> SharedRow:
    return SharedRow(
        state=CircuitState.OPEN,
        generation=row.generation + 1,
        open_until=now + policy.timeout(row.step, shorten),
        step=row.step + 1,
    )


def step_row(
    row: SharedRow,
    action: Action,
    now: float,
    policy: SharedPolicy,
    *,
    generation: int = 0,
    want: int = 0,
    shorten: float = 1.0,
) -> tuple[SharedRow, int]:
    """One atomic step of a shared row: ``(new row, permits granted)``.

    Args:
        row: the row before (``SharedRow()`` for a name never seen).
        action: what to do (see the module docstring).
        now: the store's clock, in seconds.
        policy: the breaker's shared policy.
        generation: the round a ``SUCCESS`` or ``FAILURE`` belongs to.
        want: permits asked for by an ``ACQUIRE``.
        shorten: jitter factor in ``(0, 1]`` for a timeout this step starts.

    The generation changes exactly when the state does (or a round restarts).
    """
    closed, opened, half = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN
    if action is Action.OPEN:
        return (_reopen(row, now, policy, shorten) if row.state is closed else row), 0
    if action is Action.CLOSE:
        return SharedRow(generation=row.generation + 1), 0
    if action is Action.ACQUIRE:
        if row.state is opened and now >= row.open_until:
            row = replace(row, state=half, generation=row.generation + 1, half_open_since=now)
            row = replace(row, granted=0, successes=0, open_until=0.0)
        if row.state is not half:
            return row, 0
        if now >= row.half_open_since + policy.half_open_max_wait:
            return _reopen(row, now, policy, shorten), 0
        grant = max(min(want, policy.half_open_max_calls - row.granted), 0)
        return replace(row, granted=row.granted + grant), grant
    # SUCCESS or FAILURE of a trial
    if row.state is not half or row.generation != generation:
        return row, 0  # stale: another verdict came first
    if action is Action.FAILURE:
        return _reopen(row, now, policy, shorten), 0
    if row.successes + 1 >= policy.successes_to_close:
        return SharedRow(generation=row.generation + 1), 0
    return replace(row, successes=row.successes + 1), 0


def count_row(
    row: SharedRow,
    tally: Tally,
    now: float,
    policy: SharedPolicy,
    *,
    generation: int,
    shorten: float = 1.0,
) -> SharedRow:
    """Add one instance's ``tally`` to a closed row's shared counting (see the module
    docstring); the row opens when the streak or a windowed rate reaches its threshold.

    Args:
        row: the row before.
        tally: the outcomes counted since the instance's last report.
        now: the store's clock, in seconds.
        policy: the breaker's shared policy.
        generation: the closed generation the outcomes were counted in; any other is stale
            (the row is returned as it is).
        shorten: jitter factor in ``(0, 1]`` for the open this step may start.

    The arithmetic is written in the same order as in ``breaker_count()`` (SQL) and
    ``lua/breaker.lua`` (which counts time in milliseconds), so that the three agree.
    """
    if row.state is not CircuitState.CLOSED or row.generation != generation:
        return row
    if row.counted != row.generation:  # the first tally of this closed generation
        row = replace(_window_ended(row, now, adjacent=False), counted=row.generation, streak=0)
    if policy.window_calls == 0:
        row = _roll_time_window(row, now, policy.window_seconds)
    streak = tally.trailing if tally.successes > 0 else row.streak + tally.failures
    row = replace(
        row,
        streak=streak,
        calls=row.calls + tally.calls,
        failures=row.failures + tally.failures,
        slow=row.slow + tally.slow,
    )
    if policy.window_calls > 0 and row.calls >= policy.window_calls:
        row = _window_ended(row, row.window_start)  # a full count window
    return _reopen(row, now, policy, shorten) if _trips(row, now, policy) else row


def _window_ended(row: SharedRow, start: float, *, adjacent: bool = True) -> SharedRow:
    """The current window becomes the previous one (none, if not ``adjacent`` to the new
    one starting at ``start``), and the new one is empty."""
    return replace(
        row,
        window_start=start,
        previous_calls=row.calls if adjacent else 0,
        previous_failures=row.failures if adjacent else 0,
        previous_slow=row.slow if adjacent else 0,
        calls=0,
        failures=0,
        slow=0,
    )


def _roll_time_window(row: SharedRow, now: float, width: float) -> SharedRow:
    """A time window's row at ``now``: windows ended since its start are rolled over."""
    if now - row.window_start < width:
        return row
    ended = math.floor((now - row.window_start) / width)
    return _window_ended(row, row.window_start + ended * width, adjacent=ended == 1)


def _trips(row: SharedRow, now: float, policy: SharedPolicy) -> bool:
    """Whether the row's streak, or a rate over the estimated sliding window (the previous
    window weighted by how much of it still overlaps), reaches its threshold."""
    if policy.failure_threshold is not None and row.streak >= policy.failure_threshold:
        return True
    if policy.window_calls > 0:
        weight = 1.0 - row.calls / policy.window_calls
    else:
        weight = 1.0 - (now - row.window_start) / policy.window_seconds
    calls = row.previous_calls * weight + row.calls
    if calls < policy.minimum_calls or calls <= 0:
        return False
    failures = row.previous_failures * weight + row.failures
    slow = row.previous_slow * weight + row.slow
    failure_rate, slow_rate = policy.failure_rate, policy.slow_rate
    return (failure_rate is not None and failures / calls >= failure_rate) or (
        slow_rate is not None and slow / calls >= slow_rate
    )


_MAX_CHANNEL_BYTES = 63  # PostgreSQL's identifier limit (NAMEDATALEN - 1)


def breaker_channel(schema: str) -> str:
    """The notification channel of a store's breakers in ``schema`` (a plain identifier):
    PostgreSQL's LISTEN channel, as ``breaker_notify()`` names it. A channel longer than
    PostgreSQL's 63-byte limit names the schema by its MD5 instead: cut short, two long
    schemas with a common start would hear each other's breakers."""
    channel = f"fineflow_breakers.{schema}"
    if len(channel.encode()) <= _MAX_CHANNEL_BYTES:
        return channel
    return f"fineflow_breakers.{hashlib.md5(schema.encode()).hexdigest()}"


class Task(Protocol):
    """Background work a store runs for a breaker; cancelled on the breaker's ``aclose()``."""

    def cancel(self) -> Any:
        """Stop the work."""


class Watcher(Protocol):
    """What a store calls back when the shared rows change (one per breaker)."""

    def changed(self, state: SharedState) -> None:
        """Another instance (or this one) changed the row of the watched name."""

    def connected(self) -> None:
        """The store's notifications (re)started: changes may have been missed, re-read."""

    def disconnected(self, reason: str) -> None:
        """The store's notifications stopped (``reason``: why); they restart by themselves."""


class BreakerStore(Protocol):
    """Shared breaker rows: what ``CircuitBreaker(shared=...)`` uses of a storage.

    Every step is one atomic statement or script on the store's clock. A store also owns
    the background work done against it (``spawn``), so closing the storage stops it.
    """

    async def read(self, name: str) -> SharedState:
        """The row of ``name`` now (a CLOSED generation 0 row if there is none).

        Raises:
            Exception: the store failed (callers go on with their local state).
        """
        ...

    async def step(
        self,
        name: str,
        action: Action,
        policy: SharedPolicy,
        *,
        generation: int = 0,
        want: int = 0,
        shorten: float = 1.0,
    ) -> SharedState:
        """``step_row`` on the row of ``name``, atomically; tells every watcher if the
        state changed. Returns the row after the step, with the permits granted.

        Raises:
            Exception: the store failed (callers go on with their local state).
        """
        ...

    async def count(
        self,
        name: str,
        tally: Tally,
        policy: SharedPolicy,
        *,
        generation: int,
        shorten: float = 1.0,
    ) -> SharedState:
        """``count_row`` on the row of ``name``, atomically; tells every watcher if the row
        opened. Returns the row after the step, with the shared streak in ``failures``.

        Raises:
            Exception: the store failed (the tally is dropped; calls go on locally).
        """
        ...

    def watch(self, name: str, watcher: Watcher) -> None:
        """Call ``watcher`` on changes of ``name`` (held weakly) and start listening if the
        storage is open; ``watcher.connected()`` follows once notifications flow."""

    def unwatch(self, name: str, watcher: Watcher) -> None:
        """Stop calling ``watcher``."""

    def spawn(self, work: Callable[[], Coroutine[Any, Any, None]]) -> Task | None:
        """Run ``work()`` in the background until done, cancelled, or the storage closes;
        ``None`` if it cannot (no running event loop, or the storage is closed)."""
        ...


@runtime_checkable
class SharesBreakers(Protocol):
    """A storage that can hold breaker state shared between instances (``shared=``)."""

    def breaker_store(self) -> BreakerStore:
        """The storage's one ``BreakerStore``."""
        ...
