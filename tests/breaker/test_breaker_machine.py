"""The pure breaker state machine: table tests with a fake clock and Hypothesis models (the
machine under three policy sets, and the async ``CircuitBreaker`` around it driven with plain
functions)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fineflow._breaker import machine as machine_module
from fineflow._breaker.breaker import CircuitBreaker
from fineflow._breaker.config import BreakerConfig, CircuitState
from fineflow._breaker.machine import (
    REJECTED,
    TRANSITIONS,
    BreakerMachine,
    IllegalTransitionError,
    Outcome,
    check_transition,
)
from fineflow._errors import CircuitOpenError, ConfigurationError

CLOSED, OPEN, HALF = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN


def state_of(machine: BreakerMachine) -> CircuitState:
    return machine.state  # a call, so mypy does not narrow the state between steps


def admits_all(machine: BreakerMachine) -> bool:
    return machine.admits_all  # (as state_of)


Moves = list[tuple[CircuitState, CircuitState, str, float]]


def make(**options: Any) -> tuple[BreakerMachine, Moves]:
    moves: Moves = []
    machine = BreakerMachine(
        BreakerConfig(**options),
        random=lambda: 0.5,
        on_transition=lambda a, b, reason, now: moves.append((a, b, reason, now)),
    )
    return machine, moves


def fail(machine: BreakerMachine, now: float, n: int = 1) -> None:
    for _ in range(n):
        token = machine.admit(now)
        assert token != REJECTED
        machine.settle(token, Outcome.FAILURE, now, now)


def succeed(machine: BreakerMachine, now: float, n: int = 1, duration: float = 0.0) -> None:
    for _ in range(n):
        token = machine.admit(now)
        assert token != REJECTED
        machine.settle(token, Outcome.SUCCESS, now, now - duration)


def trip(machine: BreakerMachine, now: float = 0.0) -> None:
    fail(machine, now, machine.config.failure_threshold or 1)
    assert state_of(machine) is OPEN


def test_opens_after_five_consecutive_failures_and_success_resets_the_count() -> None:
    machine, moves = make()
    fail(machine, 0.0, 4)
    succeed(machine, 0.0)
    fail(machine, 0.0, 4)
    assert state_of(machine) is CLOSED and machine.consecutive_failures == 4
    fail(machine, 1.0)
    assert state_of(machine) is OPEN
    assert moves == [(CLOSED, OPEN, "5 consecutive failures", 1.0)]
    assert machine.times_opened == 1 and machine.last_state_change == 1.0


def test_open_rejects_until_the_reset_timeout_then_half_open() -> None:
    machine, moves = make()
    trip(machine, 100.0)
    assert machine.admit(129.9) == REJECTED
    assert machine.retry_after(110.0) == pytest.approx(20.0)
    assert machine.admit(130.0) != REJECTED
    assert state_of(machine) is HALF
    assert moves[-1][:2] == (OPEN, HALF)


def test_half_open_admits_exactly_the_budget_and_ignored_permits_return() -> None:
    machine, _ = make(reset_timeout=10.0)
    trip(machine)
    tokens = [machine.admit(10.0) for _ in range(5)]
    assert [t != REJECTED for t in tokens] == [True, True, True, False, False]
    assert machine.half_open_in_flight == 3
    machine.settle(tokens[0], Outcome.IGNORED, 10.0, 10.0)
    assert machine.admit(10.0) != REJECTED
    assert machine.admit(10.0) == REJECTED
    assert machine.retry_after(10.0) is None


def test_half_open_closes_after_success_threshold_and_reopens_on_failure() -> None:
    machine, moves = make(reset_timeout=10.0, success_threshold=2)
    trip(machine)
    a, b = machine.admit(10.0), machine.admit(10.0)
    machine.settle(a, Outcome.SUCCESS, 11.0, 10.0)
    assert state_of(machine) is HALF
    machine.settle(b, Outcome.SUCCESS, 11.0, 10.0)
    assert state_of(machine) is CLOSED
    assert moves[-1] == (HALF, CLOSED, "2 trial calls succeeded", 11.0)
    trip(machine, 20.0)
    token = machine.admit(30.0)
    machine.settle(token, Outcome.FAILURE, 31.0, 30.0)
    assert state_of(machine) is OPEN and machine.times_opened == 3
    assert machine.admit(40.0) == REJECTED  # a fresh reset timeout started at 31


def test_half_open_max_wait_reopens_so_a_lost_permit_cannot_wedge_it() -> None:
    machine, moves = make(reset_timeout=10.0, half_open_max_calls=1, half_open_max_wait=5.0)
    trip(machine)
    lost = machine.admit(10.0)
    assert machine.admit(14.0) == REJECTED and state_of(machine) is HALF
    assert machine.admit(15.0) == REJECTED and state_of(machine) is OPEN
    assert "half-open" in moves[-1][2]
    machine.settle(lost, Outcome.SUCCESS, 16.0, 10.0)  # a stale outcome counts but moves nothing
    assert state_of(machine) is OPEN and machine.successes == 1
    assert machine.admit(25.0) != REJECTED and state_of(machine) is HALF


def test_exponential_backoff_with_jitter_and_cap() -> None:
    machine, _ = make(
        reset_timeout=10.0, backoff_multiplier=2.0, max_reset_timeout=30.0, jitter=0.2
    )
    deadlines = []
    now = 0.0
    trip(machine, now)
    for _ in range(4):
        deadlines.append(machine.retry_after(now))
        now += 100.0
        token = machine.admit(now)
        machine.settle(token, Outcome.FAILURE, now, now)
    # jitter 0.2 * random 0.5 shortens each timeout by 10%
    assert deadlines == pytest.approx([9.0, 18.0, 27.0, 27.0])
    token = machine.admit(now + 100.0)
    machine.settle(token, Outcome.SUCCESS, now + 100.0, now + 100.0)
    succeed(machine, now + 100.0, 2)
    assert state_of(machine) is CLOSED
    trip(machine, 1000.0)
    assert machine.retry_after(1000.0) == pytest.approx(9.0)  # closing resets the backoff


def test_failure_rate_over_a_count_window_needs_minimum_calls() -> None:
    machine, moves = make(
        failure_threshold=None, failure_rate_threshold=0.5, window_size=4, minimum_calls=4
    )
    succeed(machine, 0.0)
    fail(machine, 0.0, 2)
    assert state_of(machine) is CLOSED  # 2/3 but below minimum_calls
    succeed(machine, 0.0)
    assert state_of(machine) is OPEN  # 2/4 >= 0.5
    assert moves[-1][2] == "failure rate 2/4 >= 0.5"


def test_count_window_forgets_the_oldest_outcomes() -> None:
    machine, _ = make(failure_threshold=None, failure_rate_threshold=0.5, window_size=4)
    fail(machine, 0.0, 1)
    succeed(machine, 0.0, 3)  # window f s s s
    succeed(machine, 0.0, 1)  # window s s s s
    assert machine.snapshot("x").failure_rate == 0.0


def test_time_window_drops_old_buckets() -> None:
    machine, _ = make(
        failure_threshold=None,
        failure_rate_threshold=0.6,
        window_type="time",
        window_size=10.0,
        minimum_calls=3,
    )
    succeed(machine, 0.0, 2)
    fail(machine, 0.0, 2)  # 2/4 < 0.6
    fail(machine, 20.0, 1)  # the first four calls fell out of the window
    succeed(machine, 20.0, 1)
    assert state_of(machine) is CLOSED
    fail(machine, 21.0, 1)
    assert state_of(machine) is OPEN  # 2 failures of 3 within the last 10 s


def test_slow_call_rate_trips_and_a_slow_trial_reopens() -> None:
    machine, moves = make(
        failure_threshold=None,
        slow_call_duration=2.0,
        slow_call_rate_threshold=0.5,
        minimum_calls=2,
        reset_timeout=1.0,
    )
    succeed(machine, 0.0, 1, duration=0.1)
    succeed(machine, 0.0, 1, duration=3.0)
    assert state_of(machine) is OPEN and moves[-1][2] == "slow-call rate 1/2 >= 0.5"
    token = machine.admit(5.0)
    machine.settle(token, Outcome.SUCCESS, 8.0, 5.0)
    assert state_of(machine) is OPEN


def test_hold_rejects_without_a_transition_or_an_open() -> None:
    machine, moves = make(max_hold=10.0)
    machine.hold(0.0, 60.0)  # capped
    assert machine.admit(5.0) == REJECTED
    assert machine.retry_after(5.0) == pytest.approx(5.0)
    assert machine.admit(10.0) != REJECTED
    assert moves == [] and machine.times_opened == 0 and machine.rejections == 1


def test_manual_states() -> None:
    machine, moves = make()
    machine.force_open(1.0)
    assert machine.admit(1e9) == REJECTED and machine.retry_after(0.0) is None
    machine.disable(2.0)
    fail(machine, 2.0, 20)
    assert state_of(machine) is CircuitState.DISABLED
    machine.metrics_only(3.0)
    fail(machine, 3.0, 20)
    assert state_of(machine) is CircuitState.METRICS_ONLY
    machine.reset(4.0)
    assert state_of(machine) is CLOSED and machine.consecutive_failures == 0
    assert [m[:2] for m in moves] == [
        (CLOSED, CircuitState.FORCED_OPEN),
        (CircuitState.FORCED_OPEN, CircuitState.DISABLED),
        (CircuitState.DISABLED, CircuitState.METRICS_ONLY),
        (CircuitState.METRICS_ONLY, CLOSED),
    ]
    assert machine.times_opened == 0


def test_outcomes_of_calls_admitted_before_a_reset_are_stale() -> None:
    machine, _ = make(failure_threshold=2)
    tokens = [machine.admit(0.0) for _ in range(3)]
    machine.reset(1.0)
    for token in tokens:
        machine.settle(token, Outcome.FAILURE, 2.0, 2.0)
    assert state_of(machine) is CLOSED and machine.consecutive_failures == 0
    assert machine.failures == 3 and machine.in_flight == 0


def test_admits_all_follows_state_and_hold() -> None:
    machine, _ = make()
    assert admits_all(machine) and machine.admit(0.0) == 0
    machine.reset(0.0)
    assert admits_all(machine) and machine.admit(0.0) == 1  # a reset starts a new epoch
    machine.hold(0.0, 5.0)
    assert not admits_all(machine)
    assert machine.admit(1.0) == REJECTED
    assert machine.admit(6.0) == 1 and admits_all(machine)  # the hold ended
    trip(machine)
    assert not admits_all(machine)
    windowed, _ = make(failure_rate_threshold=0.5)
    timed, _ = make(slow_call_duration=1.0)
    assert admits_all(windowed) and admits_all(timed)  # CLOSED admits without the time


def test_transition_table() -> None:
    assert check_transition(CLOSED, OPEN) == "trip"
    with pytest.raises(IllegalTransitionError, match="DISABLED -> HALF_OPEN"):
        check_transition(CircuitState.DISABLED, HALF)
    assert check_transition(CLOSED, HALF) == "half-open at another instance"
    with pytest.raises(IllegalTransitionError):
        check_transition(OPEN, OPEN)
    assert (CircuitState.DISABLED, OPEN) not in TRANSITIONS
    assert all((s, CLOSED) in TRANSITIONS for s in CircuitState if s is not CLOSED)


def test_the_module_docstring_tables_every_automatic_transition() -> None:
    automatic = {(a.name, b.name) for (a, b), cause in TRANSITIONS.items() if cause != "manual"}
    rows = re.findall(r"^ {4}([A-Z_]+) +([A-Z_]+) {2,}", machine_module.__doc__ or "", re.M)
    assert len(rows) == len(automatic) and set(rows) == automatic


@pytest.mark.parametrize(
    ("options", "fix"),
    [
        ({"failure_threshold": 0}, "e.g. 5"),
        ({"failure_rate_threshold": 50}, "0.5 = 50%"),
        ({"failure_threshold": None}, "no trip policy"),
        ({"window_size": 2.5}, "number of calls"),
        ({"window_type": "time", "window_size": -1}, "seconds > 0"),
        ({"reset_timeout": float("inf")}, "finite"),
        ({"backoff_multiplier": 0.5}, "1.0 turns backoff off"),
        ({"reset_timeout": 100.0, "max_reset_timeout": 50.0}, "must be >= reset_timeout"),
        ({"jitter": 2}, "fraction"),
        ({"half_open_max_calls": 0}, "e.g. 3"),
        ({"half_open_max_calls": 1, "success_threshold": 2}, "raise half_open_max_calls"),
        ({"on_throttle": "retry"}, "'hold'"),
        ({"half_open_max_wait": 0}, "> 0 or None"),
        ({"minimum_calls": 0}, ">= 1"),
    ],
)
def test_config_errors_say_the_fix(options: dict[str, Any], fix: str) -> None:
    with pytest.raises(ConfigurationError, match=fix.replace("(", r"\(")):
        BreakerConfig(**options)


class Reference:
    """A deliberately naive model of the rules: a list of outcomes for the window, one open
    deadline, a permit count. Defaults: consecutive failures only, no backoff."""

    def __init__(self, config: BreakerConfig, random: float = 0.5) -> None:
        self.cfg, self.random = config, random
        self.state = CLOSED
        self.failures_in_row = 0
        self.deadline = self.since = self.hold_until = -1.0
        self.taken = self.good = 0
        self.epoch = 0
        self.next_timeout = config.reset_timeout
        self.outcomes: list[tuple[float, bool, bool]] = []  # (time, failed, slow)

    def go(self, state: CircuitState, now: float) -> None:
        cfg = self.cfg
        self.state, self.epoch = state, self.epoch + 1
        if state is OPEN:
            timeout = self.next_timeout
            self.next_timeout = min(timeout * cfg.backoff_multiplier, cfg.reset_timeout_cap)
            self.deadline = now + timeout * (1.0 - cfg.jitter * self.random)
        if state is HALF:
            self.since, self.taken, self.good = now, 0, 0
        if state is CLOSED:
            self.next_timeout = cfg.reset_timeout
        if state in (CLOSED, CircuitState.METRICS_ONLY):
            self.outcomes = []

    def admit(self, now: float) -> int | None:
        if self.state in (CircuitState.DISABLED, CircuitState.METRICS_ONLY):
            return self.epoch
        if self.state is CircuitState.FORCED_OPEN:
            return None
        if self.state is OPEN:
            if now < self.deadline:
                return None
            self.go(HALF, now)
        if self.state is HALF:
            wait = self.cfg.half_open_max_wait
            if wait is not None and now >= self.since + wait:
                self.go(OPEN, now)
                return None
            if now < self.hold_until or self.taken >= self.cfg.half_open_max_calls:
                return None
            self.taken += 1
            return self.epoch
        return None if now < self.hold_until else self.epoch

    def window(self, now: float) -> list[tuple[float, bool, bool]]:
        """The outcomes the window holds at ``now`` (a time window keeps ten buckets)."""
        cfg = self.cfg
        if cfg.window_type == "count":
            return self.outcomes[-int(cfg.window_size) :]
        width = cfg.window_size / 10
        return [o for o in self.outcomes if math.floor(o[0] / width) > math.floor(now / width) - 10]

    def outcome(self, epoch: int, kind: str, now: float, started: float) -> None:
        if epoch != self.epoch:
            return
        if kind == "ignore":
            self.taken -= self.state is HALF
            return
        cfg = self.cfg
        slow = cfg.slow_call_duration is not None and now - started >= cfg.slow_call_duration
        self.failures_in_row = self.failures_in_row + 1 if kind == "fail" else 0
        if self.state is HALF:
            if kind == "fail" or slow:
                self.go(OPEN, now)
            else:
                self.good += 1
                if self.good >= cfg.successes_to_close:
                    self.go(CLOSED, now)
            return
        if cfg.uses_window and self.state in (CLOSED, CircuitState.METRICS_ONLY):
            self.outcomes.append((now, kind == "fail", slow))
        if self.state is not CLOSED:
            return
        threshold = cfg.failure_threshold
        if kind == "fail" and threshold is not None and self.failures_in_row >= threshold:
            self.go(OPEN, now)
        elif cfg.uses_window:
            self.check_rates(now)

    def check_rates(self, now: float) -> None:
        cfg = self.cfg
        window = self.window(now)
        if len(window) < cfg.minimum_calls:
            return
        failed = sum(f for _, f, _ in window) / len(window)
        slow = sum(s for _, _, s in window) / len(window)
        frt = cfg.failure_rate_threshold
        too_many_failed = frt is not None and failed >= frt
        too_many_slow = cfg.slow_call_duration is not None and slow >= cfg.slow_call_rate_threshold
        if too_many_failed or too_many_slow:
            self.go(OPEN, now)


class MachineModel(RuleBasedStateMachine):
    """The machine against ``Reference`` under any interleaving of calls, time and controls."""

    config = BreakerConfig(
        failure_threshold=3, reset_timeout=10.0, half_open_max_calls=2, half_open_max_wait=25.0
    )

    def __init__(self) -> None:
        super().__init__()
        self.moves: Moves = []
        self.m = BreakerMachine(
            self.config,
            random=lambda: 0.5,
            on_transition=lambda a, b, r, now: self.moves.append((a, b, r, now)),
        )
        self.ref = Reference(self.config, random=0.5)
        self.now = 0.0
        self.in_flight: list[tuple[int, float]] = []  # (token, admitted at)
        self.last: tuple[int, ...] = (0,) * 7

    @rule(dt=st.floats(0.0, 12.0))
    def tick(self, dt: float) -> None:
        self.now += dt

    @rule()
    def acquire(self) -> None:
        state, m = self.m.state, self.m
        deadline_pending = state is OPEN and (m.retry_after(self.now) or 0.0) > 0.0
        token = m.admit(self.now)
        expected = self.ref.admit(self.now)
        assert (token != REJECTED) == (expected is not None)
        if deadline_pending:
            assert token == REJECTED, "OPEN admitted a call before its deadline"
        if token != REJECTED:
            self.in_flight.append((token, self.now))
            if state_of(m) is CLOSED:
                assert m.admits_all, "an admission in CLOSED clears an ended hold"

    @precondition(lambda self: bool(self.in_flight))
    @rule(index=st.integers(0, 50), kind=st.sampled_from(["ok", "fail", "ignore"]))
    def settle(self, index: int, kind: str) -> None:
        token, started = self.in_flight.pop(index % len(self.in_flight))
        outcome = {"ok": Outcome.SUCCESS, "fail": Outcome.FAILURE, "ignore": Outcome.IGNORED}
        self.m.settle(token, outcome[kind], self.now, started)
        self.ref.outcome(token, kind, self.now, started)

    @rule(
        kinds=st.lists(st.sampled_from(["ok", "fail", "ignore"]), min_size=1, max_size=4),
        duration=st.sampled_from([0.0, 1.0, 6.0, 9.0]),
    )
    def calls(self, kinds: list[str], duration: float) -> None:
        """Whole calls one after another, each taking ``duration`` (enough of them to trip
        the rate policies between manual moves)."""
        for kind in kinds:
            started = self.now
            token = self.m.admit(started)
            assert (token != REJECTED) == (self.ref.admit(started) is not None)
            self.now += duration
            if token != REJECTED:
                self.in_flight.append((token, started))
                self.settle(len(self.in_flight) - 1, kind)

    @rule(seconds=st.floats(0.0, 100.0))
    def hold(self, seconds: float) -> None:
        self.m.hold(self.now, seconds)
        until = self.now + min(seconds, self.m.config.max_hold)
        self.ref.hold_until = max(self.ref.hold_until, until)

    @rule(action=st.sampled_from(["reset", "force_open", "disable", "metrics_only"]))
    def manual(self, action: str) -> None:
        getattr(self.m, action)(self.now)
        target = {
            "reset": CLOSED,
            "force_open": CircuitState.FORCED_OPEN,
            "disable": CircuitState.DISABLED,
            "metrics_only": CircuitState.METRICS_ONLY,
        }[action]
        if action == "reset":
            self.ref.hold_until = -1.0
            self.ref.failures_in_row = 0
            self.ref.go(CLOSED, self.now)
            assert state_of(self.m) is CLOSED and self.m.consecutive_failures == 0
        elif self.ref.state is not target:
            self.ref.go(target, self.now)

    @invariant()
    def admits_all_only_when_admission_needs_no_time(self) -> None:
        # DISABLED and METRICS_ONLY admit everyone; CLOSED does once a hold is cleared (by
        # the first admit after it ended, see ``acquire``); no other state ever does.
        m = self.m
        if m.state in (CircuitState.DISABLED, CircuitState.METRICS_ONLY):
            assert m.admits_all
        elif m.state is not CLOSED or m.retry_after(self.now) is not None:
            assert not m.admits_all

    @invariant()
    def agrees_with_the_reference(self) -> None:
        assert state_of(self.m) is self.ref.state
        assert self.m.consecutive_failures == self.ref.failures_in_row
        if self.ref.state is OPEN:  # the (backed-off, jittered) deadline
            assert self.m.retry_after(self.now) == pytest.approx(
                max(self.ref.deadline - self.now, 0.0)
            )

    @invariant()
    def only_legal_transitions(self) -> None:
        assert all((a, b) in TRANSITIONS for a, b, _, _ in self.moves)

    @invariant()
    def permit_budget_holds(self) -> None:
        assert 0 <= self.m.half_open_in_flight <= self.m.config.half_open_max_calls

    @invariant()
    def counters_consistent_and_monotone(self) -> None:
        m = self.m
        assert m.calls == m.successes + m.failures + m.ignored + m.rejections + m.in_flight
        assert m.in_flight == len(self.in_flight)
        now = (m.calls, m.successes, m.failures, m.ignored, m.rejections, m.times_opened)
        assert all(a >= b for a, b in zip(now, self.last, strict=False))
        self.last = now
        assert m.times_opened == sum(1 for _, b, _, _ in self.moves if b is OPEN)


class CountWindowModel(MachineModel):
    """Failure and slow-call rates over the last N calls, with backoff and jitter."""

    config = BreakerConfig(
        failure_threshold=None,
        failure_rate_threshold=0.5,
        slow_call_duration=5.0,
        slow_call_rate_threshold=0.6,
        window_size=4,
        minimum_calls=3,
        reset_timeout=10.0,
        backoff_multiplier=2.0,
        max_reset_timeout=35.0,
        jitter=0.2,
        half_open_max_calls=3,
        success_threshold=2,
        half_open_max_wait=30.0,
    )


class TimeWindowModel(MachineModel):
    """Rates over the last N seconds (ten buckets) with a consecutive-failure threshold too."""

    config = BreakerConfig(
        failure_threshold=4,
        failure_rate_threshold=0.6,
        slow_call_duration=8.0,
        slow_call_rate_threshold=0.5,
        window_type="time",
        window_size=20.0,
        minimum_calls=2,
        reset_timeout=5.0,
        backoff_multiplier=1.5,
        half_open_max_calls=2,
        half_open_max_wait=None,
    )


class Boom(Exception):
    pass


class Interrupted(BaseException):
    """Stands for a cancellation: not an ``Exception``, so it never counts."""


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never suspends (a call of a plain function, inline) to its end."""
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value
    coroutine.close()
    raise AssertionError("the call suspended")


class WrapperModel(RuleBasedStateMachine):
    """``CircuitBreaker.call``/``execute`` with plain functions against ``Reference``: the
    async wrapper classifies what the function did and settles it like the machine model."""

    options: dict[str, Any] = {
        "failure_threshold": 3,
        "failure_rate_threshold": 0.5,
        "slow_call_duration": 5.0,
        "slow_call_rate_threshold": 0.6,
        "window_size": 4,
        "minimum_calls": 3,
        "reset_timeout": 3.0,
        "backoff_multiplier": 2.0,
        "max_reset_timeout": 8.0,
        "jitter": 0.2,
        "half_open_max_calls": 3,
        "success_threshold": 2,
        "half_open_max_wait": 30.0,
    }
    # what the function does -> how the reference counts it
    KINDS = {"ok": "ok", "raise": "fail", "bad": "fail", "ignored": "ignore", "cancel": "ignore"}

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.breaker = CircuitBreaker(
            "model",
            ignore_exceptions=(KeyError,),
            failure_if=lambda result: result == "bad",
            clock=lambda: self.now,
            random=lambda: 0.5,
            **self.options,
        )
        self.ref = Reference(self.breaker.config, random=0.5)
        self.events: list[str] = []
        for kind in ("success", "failure", "rejection"):
            self.breaker.add_listener(kind, lambda e: self.events.append(e.kind))

    def function(self, kind: str, duration: float) -> Callable[[], str]:
        def fn() -> str:
            self.now += duration  # the call takes this long on the breaker's clock
            if kind == "raise":
                raise Boom
            if kind == "ignored":
                raise KeyError(kind)
            if kind == "cancel":
                raise Interrupted
            return kind

        return fn

    @rule(dt=st.floats(0.0, 12.0))
    def tick(self, dt: float) -> None:
        self.now += dt

    @rule(
        kind=st.sampled_from(sorted(KINDS)),
        duration=st.sampled_from([0.0, 6.0]),
        fallback=st.booleans(),
    )
    def call(self, kind: str, duration: float, fallback: bool) -> None:
        started = self.now
        epoch = self.ref.admit(started)
        fn = self.function(kind, duration)
        try:
            if fallback:
                result = run(self.breaker.execute(fn, fallback=lambda: "fallback"))
                assert result.from_fallback == (epoch is None)
                assert result.value == ("fallback" if epoch is None else kind)
            else:
                assert run(self.breaker.call(fn)) == kind
        except CircuitOpenError:
            assert epoch is None and not fallback
        except (Boom, KeyError, Interrupted):
            assert epoch is not None
        if epoch is not None:
            self.ref.outcome(epoch, self.KINDS[kind], self.now, started)

    @rule()
    def reset(self) -> None:
        self.breaker.reset()
        self.ref.hold_until = -1.0
        self.ref.failures_in_row = 0
        self.ref.go(CLOSED, self.now)

    @invariant()
    def agrees_with_the_reference(self) -> None:
        m = self.breaker.metrics()
        assert m.state is self.ref.state
        assert m.consecutive_failures == self.ref.failures_in_row
        assert m.in_flight == 0
        assert self.events.count("success") == m.total_successes
        assert self.events.count("failure") == m.total_failures
        assert self.events.count("rejection") == m.total_rejections
        assert m.total_fallbacks <= m.total_rejections


class SharedMachineModel(RuleBasedStateMachine):
    """A machine whose half-open permits and verdicts come from a shared store (``remote``):
    ``grant``, ``adopt`` and ``follow`` under any interleaving with calls and time. No
    permit is handed out beyond what was granted (or the local budget while not remote),
    adopted states take the store's deadline, and every move is in the table."""

    config = BreakerConfig(
        failure_threshold=2, reset_timeout=10.0, half_open_max_calls=3, success_threshold=2
    )

    def __init__(self) -> None:
        super().__init__()
        self.moves: Moves = []
        self.trial_successes = 0
        self.m = BreakerMachine(
            self.config,
            random=lambda: 0.5,
            on_transition=lambda a, b, r, now: self.moves.append((a, b, r, now)),
            remote=True,
            on_trial_success=lambda now: self.count_trial_success(),
        )
        self.now = 0.0
        self.in_flight: list[tuple[int, float]] = []
        self.granted = 0  # granted in the current round
        self.admitted = 0  # admitted in the current round

    def count_trial_success(self) -> None:
        self.trial_successes += 1

    @rule(dt=st.floats(0.0, 12.0))
    def tick(self, dt: float) -> None:
        self.now += dt

    @rule()
    def acquire(self) -> None:
        before = len(self.moves)
        token = self.m.admit(self.now)
        if len(self.moves) != before and self.moves[-1][1] is HALF:
            self.granted = self.admitted = 0  # a new round
        if token != REJECTED:
            self.in_flight.append((token, self.now))
            if state_of(self.m) is HALF:
                self.admitted += 1
                limit = self.granted if self.m.remote else self.config.half_open_max_calls
                assert self.admitted <= max(limit, self.granted), "a permit never granted"

    @precondition(lambda self: bool(self.in_flight))
    @rule(index=st.integers(0, 50), kind=st.sampled_from(list(Outcome)))
    def settle(self, index: int, kind: Outcome) -> None:
        token, started = self.in_flight.pop(index % len(self.in_flight))
        was_half = state_of(self.m) is HALF
        self.m.settle(token, kind, self.now, started)
        if was_half and kind is Outcome.IGNORED and state_of(self.m) is HALF:
            self.admitted = max(self.admitted - 1, 0)  # the permit came back
        if self.m.remote and was_half and kind is Outcome.SUCCESS:
            assert state_of(self.m) is not CLOSED, "only the store closes a shared round"

    @rule(permits=st.integers(0, 4))
    def grant(self, permits: int) -> None:
        if state_of(self.m) is HALF:
            self.granted = min(self.granted + permits, self.config.half_open_max_calls)
        self.m.grant(permits)

    @rule(state=st.sampled_from([CLOSED, OPEN, HALF]), open_for=st.floats(0.0, 50.0))
    def adopt(self, state: CircuitState, open_for: float) -> None:
        before = state_of(self.m)
        self.m.adopt(state, self.now, open_for=open_for, reason="by another instance")
        if before in (CLOSED, OPEN, HALF):
            assert state_of(self.m) is state
        if state_of(self.m) is OPEN and before in (CLOSED, OPEN, HALF):
            assert self.m.retry_after(self.now) == pytest.approx(open_for)
        if state is HALF and before in (CLOSED, OPEN, HALF):
            self.granted = self.admitted = 0  # a new round

    @rule(remote=st.booleans())
    def follow(self, remote: bool) -> None:
        self.m.follow(remote)
        if state_of(self.m) is HALF:
            self.granted = max(self.granted, self.admitted)

    @rule(action=st.sampled_from(["reset", "force_open"]))
    def manual(self, action: str) -> None:
        getattr(self.m, action)(self.now)
        if action == "force_open":
            self.m.adopt(CLOSED, self.now, reason="ignored while forced open")
            assert state_of(self.m) is CircuitState.FORCED_OPEN

    @invariant()
    def only_legal_transitions(self) -> None:
        assert all((a, b) in TRANSITIONS for a, b, _, _ in self.moves)

    @invariant()
    def permit_budget_holds(self) -> None:
        assert 0 <= self.m.half_open_in_flight <= self.config.half_open_max_calls

    @invariant()
    def counters_consistent(self) -> None:
        m = self.m
        assert m.calls == m.successes + m.failures + m.ignored + m.rejections + m.in_flight
        assert m.in_flight == len(self.in_flight)


TestMachineModel = MachineModel.TestCase
TestSharedMachineModel = SharedMachineModel.TestCase
TestCountWindowModel = CountWindowModel.TestCase
TestTimeWindowModel = TimeWindowModel.TestCase
TestWrapperModel = WrapperModel.TestCase


def test_on_outcome_hears_the_first_call_and_failure_per_report_and_slow_calls_count() -> None:
    heard: list[tuple[float, bool]] = []
    config = BreakerConfig(failure_threshold=None, slow_call_duration=1.0, minimum_calls=100)
    m = BreakerMachine(config, on_outcome=lambda now, failed: heard.append((now, failed)))
    m.settle(m.admit(0.5), Outcome.SUCCESS, 0.5, 0.5)
    for t in (1.0, 2.0, 3.0):
        m.settle(m.admit(t), Outcome.FAILURE, t, t)
    assert heard == [(0.5, False), (1.0, True)]  # the first call, then the first failure
    m.outcomes_reported()
    m.settle(m.admit(4.0), Outcome.SUCCESS, 4.0, 4.0)  # fast: a call, no failure
    m.settle(m.admit(5.0), Outcome.SUCCESS, 7.0, 5.0)  # slow: told as a failure
    m.settle(m.admit(8.0), Outcome.SUCCESS, 9.5, 8.0)  # slow again: already told
    assert heard[2:] == [(4.0, False), (7.0, True)]
    assert (m.failures, m.successes, m.slow_calls) == (3, 4, 2)


def test_failures_before_an_open_do_not_count_after_a_close_from_another_instance() -> None:
    m = BreakerMachine(BreakerConfig(failure_threshold=2), remote=True)
    m.settle(m.admit(0.0), Outcome.FAILURE, 0.0, 0.0)
    m.adopt(CircuitState.OPEN, 1.0, open_for=30.0, reason="opened by another instance")
    m.adopt(CircuitState.CLOSED, 2.0, reason="closed by another instance")
    assert m.consecutive_failures == 0
    m.settle(m.admit(3.0), Outcome.FAILURE, 3.0, 3.0)
    assert (m.state, m.consecutive_failures) == (CircuitState.CLOSED, 1)


def test_a_closed_period_decided_elsewhere_starts_afresh() -> None:
    m = BreakerMachine(BreakerConfig(failure_threshold=2), remote=True)
    m.settle(m.admit(0.0), Outcome.FAILURE, 0.0, 0.0)
    m.adopt(CircuitState.CLOSED, 1.0, reason="")  # a reset at another instance
    m.settle(m.admit(2.0), Outcome.FAILURE, 2.0, 2.0)
    assert (m.state, m.consecutive_failures) == (CircuitState.CLOSED, 1)
