"""The pure breaker state machine: table tests with a fake clock and a Hypothesis model."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fineflow._breaker import machine as machine_module
from fineflow._breaker.config import BreakerConfig, CircuitState
from fineflow._breaker.machine import (
    REJECTED,
    TRANSITIONS,
    BreakerMachine,
    IllegalTransitionError,
    Outcome,
    check_transition,
)
from fineflow._errors import ConfigurationError

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
    with pytest.raises(IllegalTransitionError, match="CLOSED -> HALF_OPEN"):
        check_transition(CLOSED, HALF)
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
    """A deliberately naive model: consecutive failures, one open deadline, permits."""

    def __init__(self, threshold: int, timeout: float, budget: int, wait: float) -> None:
        self.threshold, self.timeout, self.budget, self.wait = threshold, timeout, budget, wait
        self.state = CLOSED
        self.failures_in_row = 0
        self.deadline = self.since = self.hold_until = -1.0
        self.taken = self.good = 0
        self.epoch = 0

    def go(self, state: CircuitState, now: float) -> None:
        self.state, self.epoch = state, self.epoch + 1
        if state is OPEN:
            self.deadline = now + self.timeout
        if state is HALF:
            self.since, self.taken, self.good = now, 0, 0

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
            if now >= self.since + self.wait:
                self.go(OPEN, now)
                return None
            if now < self.hold_until or self.taken >= self.budget:
                return None
            self.taken += 1
            return self.epoch
        return None if now < self.hold_until else self.epoch

    def outcome(self, epoch: int, kind: str, now: float) -> None:
        if epoch != self.epoch:
            return
        if kind == "ignore":
            self.taken -= self.state is HALF
            return
        self.failures_in_row = self.failures_in_row + 1 if kind == "fail" else 0
        if self.state is HALF:
            if kind == "fail":
                self.go(OPEN, now)
            else:
                self.good += 1
                if self.good >= self.budget:
                    self.go(CLOSED, now)
        elif self.state is CLOSED and self.failures_in_row >= self.threshold:
            self.go(OPEN, now)


class MachineModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.moves: Moves = []
        config = BreakerConfig(
            failure_threshold=3, reset_timeout=10.0, half_open_max_calls=2, half_open_max_wait=25.0
        )
        self.m = BreakerMachine(
            config, on_transition=lambda a, b, r, now: self.moves.append((a, b, r, now))
        )
        self.ref = Reference(3, 10.0, 2, 25.0)
        self.now = 0.0
        self.in_flight: list[int] = []
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
            self.in_flight.append(token)
            if state_of(m) is CLOSED:
                assert m.admits_all, "an admission in CLOSED clears an ended hold"

    @precondition(lambda self: bool(self.in_flight))
    @rule(index=st.integers(0, 50), kind=st.sampled_from(["ok", "fail", "ignore"]))
    def settle(self, index: int, kind: str) -> None:
        token = self.in_flight.pop(index % len(self.in_flight))
        if kind == "ok":
            self.m.settle(token, Outcome.SUCCESS, self.now, self.now)
        elif kind == "fail":
            self.m.settle(token, Outcome.FAILURE, self.now, self.now)
        else:
            self.m.settle(token, Outcome.IGNORED, self.now, self.now)
        self.ref.outcome(token, kind, self.now)

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


TestMachineModel = MachineModel.TestCase
