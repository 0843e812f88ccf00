"""The circuit-breaker state machine: pure, synchronous, no I/O, ``now`` passed in.

Theory of operation
-------------------
* The fast path is one method pair. A caller asks to run one call with ``admit(now)`` and
  gets a token (``>= 0``) or ``REJECTED``. Every admitted call comes back exactly once as
  ``settle(token, outcome, now, started)`` (``started``: the ``now`` it was admitted at),
  ``outcome`` an ``Outcome``: ``SUCCESS``, ``FAILURE`` or ``IGNORED`` (cancelled, an
  ignored exception, a throttled answer).
* The machine is the only writer of its fields, so these two methods (with ``hold`` and
  the manual controls) keep its invariant in this one module:
  counters only grow, and ``calls == successes + failures + ignored + rejections +
  in_flight``.
* The token is the *epoch* the call was admitted in. Every transition starts a new epoch;
  an outcome from an older epoch still counts in the totals but cannot move the state, so
  calls admitted before a trip, a reset or a half-open round cannot confuse the next one.
* CLOSED admits everything. A failure trips it to OPEN when ``failure_threshold``
  consecutive failures happened, or when the sliding window holds at least
  ``minimum_calls`` outcomes and the failure rate or slow-call rate reaches its threshold.
* OPEN rejects until its deadline: ``reset_timeout``, multiplied by ``backoff_multiplier``
  on each repeated open without a close in between (capped at ``max_reset_timeout``), then
  shortened by up to ``jitter`` (a fraction, drawn from the injected ``random``). The first
  caller after the deadline moves it to HALF_OPEN (lazily: nothing runs in the background).
* HALF_OPEN hands out at most ``half_open_max_calls`` permits; further callers are
  rejected at once. Ignored and cancelled trials give their permit back. A failed (or, with
  a slow-call policy, slow) trial reopens; ``success_threshold`` successes close. A caller
  arriving ``half_open_max_wait`` after it entered HALF_OPEN reopens it, so a permit lost
  by a caller that never reports back cannot wedge the breaker.
* A *hold* (the upstream said 429 + Retry-After, policy ``"hold"``) rejects callers in
  CLOSED and HALF_OPEN until it ends, without a transition and without counting an open.
* Shared state (``CircuitBreaker(shared=...)``, see ``shared``): while ``remote`` is on, a
  half-open round starts with no permits; they arrive through ``grant(n)`` (a store hands
  out the round's global budget), and trial successes are reported through the
  ``on_trial_success`` hook instead of closing the breaker here: the store closes it for
  everyone. A failed trial still reopens at once. A state decided by another instance
  enters through ``adopt(state, now, open_for=..., reason=...)``, as a transition of the
  table like any other (manual states ignore it). With ``remote`` off (the store
  unreachable) the machine keeps its own budget and verdicts. When the instances also count
  failures together, ``on_outcome`` hears of the first call settled since the last
  ``outcomes_reported()``, and of the first failure (or slow call) of a closed breaker that
  did not trip it; ``slow_calls`` totals the slow calls. The owner reads the totals in
  batches: the hook runs at most twice per batch, not once per call.
* DISABLED, FORCED_OPEN and METRICS_ONLY are entered and left only by hand (``reset()``
  returns to CLOSED). DISABLED and METRICS_ONLY admit everything and never trip; only
  METRICS_ONLY keeps the sliding window. FORCED_OPEN rejects everything.
* ``admits_all`` is true while ``admit`` admits whatever ``now`` is (CLOSED without a hold,
  DISABLED, METRICS_ONLY): a caller without a slow-call policy may then skip reading its
  clock and pass any ``now`` (and the same value as ``started``).

Transitions (``TRANSITIONS``; ``check_transition`` raises ``IllegalTransitionError`` for
any other move, and every state change goes through it)::

    from        to            cause
    ---------   -----------   ---------------------------------------------------------
    CLOSED      OPEN          trip: consecutive failures, failure rate or slow-call rate;
                              or opened by another instance
    OPEN        HALF_OPEN     reset timeout elapsed (seen by the next caller, or by another
                              instance)
    HALF_OPEN   CLOSED        trial calls succeeded (across instances when shared)
    HALF_OPEN   OPEN          trial call failed or was slow, or half-open wait exceeded
                              (here or at another instance)
    OPEN        CLOSED        closed by another instance (or manual: reset())
    CLOSED      HALF_OPEN     half-open at another instance (this one missed the open)
    any         CLOSED        manual: reset()
    any         DISABLED,     manual: disable(), force_open(), metrics_only()
                FORCED_OPEN,
                METRICS_ONLY

The closed path is hot, so it writes as little as it can: ``in_flight`` and the two
consecutive counts are derived from the totals (a success in the current epoch only bumps
``successes``; ``_success_mark`` is the value ``successes`` had when the current run of
successes began, ``_failures_in_row`` counts the run of failures that ended it).
"""

from __future__ import annotations

import enum
import random as _random_module
from collections.abc import Callable

from .config import BreakerConfig, BreakerMetrics, CircuitState, CountWindow, TimeWindow

__all__ = [
    "REJECTED",
    "TRANSITIONS",
    "BreakerMachine",
    "IllegalTransitionError",
    "Outcome",
    "OutcomeHook",
    "TransitionHook",
    "TrialHook",
    "check_transition",
]

#: What ``admit`` returns to a caller it turns away: never a token.
REJECTED = -1
_NEVER = float("-inf")
_FOREVER = float("inf")


class Outcome(enum.Enum):
    """How an admitted call ended, as ``BreakerMachine.settle`` counts it."""

    # The call worked: ends a run of failures, counts towards closing a half-open breaker.
    SUCCESS = "success"
    # The call failed: may trip a closed breaker, reopens a half-open one.
    FAILURE = "failure"
    # Neither (cancelled, an ignored exception, a throttled answer): a half-open trial gives
    # its permit back.
    IGNORED = "ignored"


_SUCCESS, _FAILURE = Outcome.SUCCESS, Outcome.FAILURE
_C, _O, _H = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN
_MANUAL_TARGETS = (
    CircuitState.CLOSED,
    CircuitState.DISABLED,
    CircuitState.FORCED_OPEN,
    CircuitState.METRICS_ONLY,
)

#: Every legal ``(from, to)`` move and what causes it.
TRANSITIONS: dict[tuple[CircuitState, CircuitState], str] = {
    **{(s, t): "manual" for s in CircuitState for t in _MANUAL_TARGETS if s is not t},
    (_C, _O): "trip",
    (_O, _H): "reset timeout elapsed",
    (_H, _C): "trial calls succeeded",
    (_H, _O): "trial call failed or half-open wait exceeded",
    (_O, _C): "closed by another instance, or reset()",
    (_C, _H): "half-open at another instance",
}

#: Called on every transition with ``(from, to, reason, now)``.
TransitionHook = Callable[[CircuitState, CircuitState, str, float], None]

#: Called with ``now`` for each successful trial call while ``remote`` is on.
TrialHook = Callable[[float], None]

#: Called with ``(now, failed)``: see ``BreakerMachine``'s ``on_outcome``.
OutcomeHook = Callable[[float, bool], None]


class IllegalTransitionError(RuntimeError):
    """A state change that is not in ``TRANSITIONS`` was attempted (a bug, never user input)."""


def check_transition(old: CircuitState, new: CircuitState) -> str:
    """Return the cause of the move ``old -> new``.

    Raises:
        IllegalTransitionError: the move is not in ``TRANSITIONS``.
    """
    try:
        return TRANSITIONS[old, new]
    except KeyError:
        raise IllegalTransitionError(f"illegal transition {old.name} -> {new.name}") from None


class BreakerMachine:
    """The state and counters of one breaker; see the module docstring for the rules.

    Every public attribute is read-only for other code: only the machine's methods write.

    Args:
        config: the policies.
        random: source of jitter, a callable returning a float in ``[0, 1)``.
        on_transition: called synchronously on every state change.
        remote: start with half-open permits and verdicts coming from a shared store
            (see ``follow``).
        on_trial_success: called with ``now`` for each successful trial while ``remote``.
        on_outcome: called with ``(now, failed)`` for the first call settled since
            ``outcomes_reported()`` (``failed`` ``False``), and for the first failure or slow
            call (of the current epoch) since then that leaves the breaker CLOSED (``True``).
    """

    __slots__ = (
        "_call_told",
        "_epoch",
        "_failure_told",
        "_failures_in_row",
        "_half_open_since",
        "_hold_until",
        "_next_timeout",
        "_on_outcome",
        "_on_transition",
        "_on_trial_success",
        "_open_until",
        "_permit_limit",
        "_permits_used",
        "_plain",
        "_random",
        "_reject_until",
        "_remote",
        "_success_mark",
        "_trial_successes",
        "_window",
        "admits_all",
        "calls",
        "config",
        "failures",
        "ignored",
        "last_failure_time",
        "last_state_change",
        "last_success_time",
        "rejections",
        "slow_calls",
        "state",
        "successes",
        "times_opened",
    )

    def __init__(
        self,
        config: BreakerConfig,
        *,
        random: Callable[[], float] = _random_module.random,
        on_transition: TransitionHook | None = None,
        remote: bool = False,
        on_trial_success: TrialHook | None = None,
        on_outcome: OutcomeHook | None = None,
    ) -> None:
        self.config = config
        self._on_outcome = on_outcome
        # Whether on_outcome was told of a call / a failure since outcomes_reported() (both
        # true without a hook: one check on the hot path, never a call).
        self._call_told = self._failure_told = on_outcome is None
        self._random = random
        self._on_transition = on_transition
        self._remote = remote
        self._on_trial_success = on_trial_success
        self._permit_limit = config.half_open_max_calls
        self.state = CircuitState.CLOSED
        self._epoch = 0
        self._open_until = self._half_open_since = 0.0
        self._hold_until = _NEVER
        self._next_timeout = config.reset_timeout
        self._permits_used = self._trial_successes = 0
        self._window: CountWindow | TimeWindow | None = None
        self._failures_in_row = self._success_mark = 0
        self.last_failure_time: float | None = None
        self.last_success_time: float | None = None
        self.last_state_change: float | None = None
        self.calls = self.successes = self.failures = self.ignored = 0
        self.rejections = self.times_opened = self.slow_calls = 0
        self._new_window()
        self._refresh()

    # -- the fast path: admit, then settle ------------------------------------------------

    def admit(self, now: float) -> int:
        """Ask to run one call at ``now``: a token ``>= 0`` to settle later, or ``REJECTED``.

        While ``admits_all`` is true, ``now`` is not read.
        """
        self.calls += 1
        if self.admits_all:
            return self._epoch
        if now < self._reject_until:
            self.rejections += 1
            return REJECTED
        return self._admit_slow(now)

    def settle(self, token: int, outcome: Outcome, now: float, started: float) -> None:
        """Record how the call admitted with ``token`` ended, at ``now``.

        Args:
            token: what ``admit`` returned for the call (settle each token exactly once).
            outcome: ``SUCCESS``, ``FAILURE`` or ``IGNORED``.
            now: the time the outcome is known.
            started: the ``now`` the call was admitted at; ``now - started`` is its
                duration, read only with a slow-call policy.
        """
        if not self._call_told:
            self._tell(now, False)
        if outcome is _SUCCESS:
            self.successes += 1
            self.last_success_time = now
            if token != self._epoch:
                self._success_mark += 1  # a stale outcome extends no run and ends none
            elif not self._plain:
                self._succeeded(now, now - started)
        elif outcome is _FAILURE:
            self.failures += 1
            self.last_failure_time = now
            if token == self._epoch:
                self._failed(now, now - started)
        else:
            self.ignored += 1
            if token == self._epoch and self.state is _H:
                self._permits_used -= 1

    def _admit_slow(self, now: float) -> int:
        state = self.state
        if state is _O:
            if now < self._open_until:
                self.rejections += 1
                return REJECTED
            self._move(_H, now, "reset timeout elapsed")
        elif state is _C:
            if now < self._hold_until:
                self.rejections += 1
                return REJECTED
            self._hold_until = _NEVER
            self._refresh()
            return self._epoch
        elif state is CircuitState.FORCED_OPEN:
            self.rejections += 1
            return REJECTED
        # HALF_OPEN (DISABLED and METRICS_ONLY always admit all)
        wait = self.config.half_open_max_wait
        if wait is not None and now >= self._half_open_since + wait:
            self._move(_O, now, f"no verdict {wait:g}s after half-open")
        elif now >= self._hold_until and self._permits_used < self._permit_limit:
            self._permits_used += 1
            return self._epoch
        self.rejections += 1
        return REJECTED

    def _succeeded(self, now: float, duration: float) -> None:
        cfg = self.config
        slow = cfg.slow_call_duration is not None and duration >= cfg.slow_call_duration
        self.slow_calls += slow
        if self.state is _H:
            if slow:
                self._move(_O, now, f"trial call slower than {cfg.slow_call_duration:g}s")
                return
            self._trial_successes += 1
            if self._remote:  # the store closes it, for every instance
                if self._on_trial_success is not None:
                    self._on_trial_success(now)
            elif self._trial_successes >= cfg.successes_to_close:
                self._move(_C, now, f"{self._trial_successes} trial calls succeeded")
        elif self._window is not None:
            self._window.add(now, False, slow)
            if self.state is _C:
                self._check_rates(self._window, now)
                if slow:
                    self._heard_failure(now)

    def _failed(self, now: float, duration: float) -> None:
        if self.successes != self._success_mark:  # this failure ends a run of successes
            self._success_mark = self.successes
            self._failures_in_row = 0
        self._failures_in_row += 1
        state = self.state
        if state is _H:
            self._move(_O, now, "trial call failed")
            return
        cfg = self.config
        slow = cfg.slow_call_duration is not None and duration >= cfg.slow_call_duration
        self.slow_calls += slow
        if self._window is not None and state is not CircuitState.DISABLED:
            self._window.add(now, True, slow)
        if state is _C:
            ft = cfg.failure_threshold
            if ft is not None and self._failures_in_row >= ft:
                self._move(_O, now, f"{self._failures_in_row} consecutive failures")
            elif self._window is not None:
                self._check_rates(self._window, now)
            self._heard_failure(now)

    def _heard_failure(self, now: float) -> None:
        if not self._failure_told and self.state is _C:
            self._tell(now, True)

    def _tell(self, now: float, failed: bool) -> None:
        self._call_told = True
        self._failure_told |= failed
        if self._on_outcome is not None:
            self._on_outcome(now, failed)

    def outcomes_reported(self, *, failures_only: bool = False) -> None:
        """The owner has read the totals: tell ``on_outcome`` of the next call and the next
        failure again (``failures_only``: of the next failure only)."""
        if self._on_outcome is not None:
            self._failure_told = False
            if not failures_only:
                self._call_told = False

    def retry_after(self, now: float) -> float | None:
        """Seconds until a caller may be admitted again, or ``None`` when unknown."""
        state = self.state
        if state is _O:
            return max(self._open_until - now, 0.0)
        if (state is _C or state is _H) and self._hold_until > now:
            return self._hold_until - now
        return None

    # -- counters derived from the totals -----------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Admitted calls whose outcome has not been reported yet."""
        return self.calls - self.successes - self.failures - self.ignored - self.rejections

    @property
    def consecutive_successes(self) -> int:
        """Successes (of the current epoch) since the last failure or reset."""
        return self.successes - self._success_mark

    @property
    def consecutive_failures(self) -> int:
        """Failures (of the current epoch) since the last success or reset."""
        return self._failures_in_row if self.successes == self._success_mark else 0

    @property
    def half_open_in_flight(self) -> int:
        """Trial calls of the current half-open round still running (0 outside HALF_OPEN)."""
        return self._permits_used - self._trial_successes if self.state is _H else 0

    # -- other writes -----------------------------------------------------------------------

    def hold(self, now: float, seconds: float) -> None:
        """Reject callers for ``seconds`` (capped by ``max_hold``) without changing state."""
        until = now + min(max(seconds, 0.0), self.config.max_hold)
        if until > self._hold_until and until > now:
            self._hold_until = until
            self._refresh()

    def _check_rates(self, window: CountWindow | TimeWindow, now: float) -> None:
        cfg = self.config
        if cfg.window_type == "time":
            window.expire(now)
        calls = window.calls
        if calls < cfg.minimum_calls:
            return
        frt = cfg.failure_rate_threshold
        if frt is not None and window.failures / calls >= frt:
            self._move(_O, now, f"failure rate {window.failures}/{calls} >= {frt:g}")
        elif (
            cfg.slow_call_duration is not None
            and window.slow / calls >= cfg.slow_call_rate_threshold
        ):
            srt = cfg.slow_call_rate_threshold
            self._move(_O, now, f"slow-call rate {window.slow}/{calls} >= {srt:g}")

    # -- manual control ---------------------------------------------------------------------

    def reset(self, now: float) -> None:
        """Return to CLOSED with a fresh window, no hold and no backoff; totals are kept."""
        self._hold_until = _NEVER
        self._next_timeout = self.config.reset_timeout
        if self.state is not _C:
            self._move(_C, now, "reset")
        else:
            self._epoch += 1
            self._new_window()
        self._failures_in_row = 0
        self._success_mark = self.successes
        self._refresh()

    def force_open(self, now: float) -> None:
        """Reject every call until ``reset()`` (or another manual state)."""
        if self.state is not CircuitState.FORCED_OPEN:
            self._move(CircuitState.FORCED_OPEN, now, "forced open")

    def disable(self, now: float) -> None:
        """Admit every call and never trip until ``reset()``."""
        if self.state is not CircuitState.DISABLED:
            self._move(CircuitState.DISABLED, now, "disabled")

    def metrics_only(self, now: float) -> None:
        """Admit every call, keep the window and counters, never trip until ``reset()``."""
        if self.state is not CircuitState.METRICS_ONLY:
            self._move(CircuitState.METRICS_ONLY, now, "metrics only")

    # -- state shared with other instances -------------------------------------------------

    @property
    def remote(self) -> bool:
        """Whether half-open permits and verdicts come from a shared store (see ``follow``)."""
        return self._remote

    def follow(self, remote: bool) -> None:
        """Take half-open permits and the closing verdict from a shared store (``True``), or
        decide them here with the local budget (``False``: the store is unreachable).

        Switching in the middle of a half-open round keeps the permits already used: on
        ``False`` the rest of the local budget becomes available; on ``True`` no more are
        handed out until ``grant``.
        """
        if remote == self._remote:
            return
        self._remote = remote
        if self.state is _H:
            self._permit_limit = self._permits_used if remote else self.config.half_open_max_calls

    def grant(self, permits: int) -> None:
        """Receive ``permits`` trial permits of the current half-open round from the shared
        store (ignored outside HALF_OPEN; the total never exceeds ``half_open_max_calls``)."""
        if self.state is _H and permits > 0:
            limit = self._permit_limit + permits
            self._permit_limit = min(limit, self.config.half_open_max_calls)

    def adopt(self, state: CircuitState, now: float, *, open_for: float = 0.0, reason: str) -> None:
        """Enter ``state``, decided by another instance through the shared store.

        OPEN takes the store's deadline (``open_for`` seconds from ``now``; already OPEN,
        only the deadline changes); HALF_OPEN starts a new round (with no permits while
        ``remote``); CLOSED closes (already CLOSED: a new closed period, its window and
        consecutive failures afresh, as after ``reset()``). The move goes through
        ``check_transition`` and the transition hook like any other, with ``reason``.
        DISABLED, FORCED_OPEN and METRICS_ONLY, set by hand, ignore it.

        Raises:
            ValueError: ``state`` is not CLOSED, OPEN or HALF_OPEN.
        """
        if state not in (_C, _O, _H):
            raise ValueError(f"only CLOSED, OPEN or HALF_OPEN can be shared (got {state})")
        current = self.state
        if current not in (_C, _O, _H):
            return
        if current is not state:
            self._move(state, now, reason, open_for=max(open_for, 0.0))
        elif state is _O:
            self._open_until = now + max(open_for, 0.0)
            self._refresh()
        elif state is _H:  # a new round: trials of the old one no longer count
            self._epoch += 1
            self._new_round(now)
        else:  # a new closed period decided elsewhere (a reset): start it afresh
            self._epoch += 1
            self._new_window()
            self._failures_in_row = 0

    # -- internals --------------------------------------------------------------------------

    def _move(
        self, new: CircuitState, now: float, reason: str, open_for: float | None = None
    ) -> None:
        old = self.state
        check_transition(old, new)
        self.state = new
        self._epoch += 1
        self.last_state_change = now
        cfg = self.config
        if new is _O:
            self.times_opened += 1
            timeout = self._next_timeout
            self._next_timeout = min(timeout * cfg.backoff_multiplier, cfg.reset_timeout_cap)
            if open_for is not None:  # a deadline set by the shared store
                timeout = open_for
            elif cfg.jitter:
                timeout *= 1.0 - cfg.jitter * self._random()
            self._open_until = now + timeout
        elif new is _H:
            self._new_round(now)
        elif new is _C:
            self._next_timeout = cfg.reset_timeout
            self._new_window()
            self._failures_in_row = 0  # failures before an open never count towards the next
        elif new is CircuitState.METRICS_ONLY:
            self._new_window()
        self._refresh()
        if self._on_transition is not None:
            self._on_transition(old, new, reason, now)

    def _new_round(self, now: float) -> None:
        self._half_open_since = now
        self._permits_used = self._trial_successes = 0
        self._permit_limit = 0 if self._remote else self.config.half_open_max_calls

    def _new_window(self) -> None:
        cfg = self.config
        if not cfg.uses_window:
            self._window = None
        elif cfg.window_type == "count":
            self._window = CountWindow(int(cfg.window_size))
        else:
            self._window = TimeWindow(cfg.window_size)

    def _refresh(self) -> None:
        state = self.state
        self.admits_all = (state is _C and self._hold_until == _NEVER) or state in (
            CircuitState.DISABLED,
            CircuitState.METRICS_ONLY,
        )
        # A success needs nothing but the counters (no window, no slow-call check).
        self._plain = state is CircuitState.DISABLED or (
            state is _C and self._window is None and self.config.slow_call_duration is None
        )
        # Callers arriving before this are rejected with no further question (OPEN before its
        # deadline, FORCED_OPEN, a hold in CLOSED); HALF_OPEN always asks ``_admit_slow``.
        if state is _O:
            self._reject_until = self._open_until
        elif state is CircuitState.FORCED_OPEN:
            self._reject_until = _FOREVER
        elif state is _C:
            self._reject_until = self._hold_until
        else:
            self._reject_until = _NEVER

    def snapshot(
        self, name: str, *, fallbacks: int = 0, wall_offset: float | None = None
    ) -> BreakerMetrics:
        """A frozen copy of the state and counters, with the owner's name and fallbacks.

        Args:
            name: the owner's name.
            fallbacks: the owner's count of fallbacks served.
            wall_offset: wall clock minus monotonic clock, read by the owner now; adds the
                ``*_at`` epoch times (``None``: they stay ``None``).
        """
        window = self._window
        calls = window.calls if window is not None else 0

        def wall(t: float | None) -> float | None:
            return None if t is None or wall_offset is None else t + wall_offset

        return BreakerMetrics(
            name=name,
            state=self.state,
            consecutive_failures=self.consecutive_failures,
            consecutive_successes=self.consecutive_successes,
            last_failure_time=self.last_failure_time,
            last_success_time=self.last_success_time,
            total_calls=self.calls,
            total_successes=self.successes,
            total_failures=self.failures,
            total_ignored=self.ignored,
            total_rejections=self.rejections,
            total_fallbacks=fallbacks,
            in_flight=self.in_flight,
            times_opened=self.times_opened,
            last_state_change=self.last_state_change,
            failure_rate=window.failures / calls if window is not None and calls else None,
            slow_call_rate=window.slow / calls if window is not None and calls else None,
            last_failure_at=wall(self.last_failure_time),
            last_success_at=wall(self.last_success_time),
            last_state_change_at=wall(self.last_state_change),
        )
