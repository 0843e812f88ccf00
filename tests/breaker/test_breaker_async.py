"""The async breaker under real concurrency, on asyncio and trio."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Coroutine
from types import SimpleNamespace
from typing import Any, assert_type

import anyio
import anyio.lowlevel
import pytest

from fineflow._breaker.breaker import CircuitBreaker
from fineflow._breaker.config import CircuitState
from fineflow._breaker.events import BreakerEvent
from fineflow._breaker.http import http_throttle
from fineflow._breaker.result import BreakerResult
from fineflow._errors import CircuitOpenError, ConfigurationError
from fineflow.testing import FakeClock

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def state_of(breaker: CircuitBreaker) -> CircuitState:
    return breaker.state  # a call, so mypy does not narrow the state between steps


class Boom(Exception):
    pass


async def ok(value: int = 1) -> int:
    return value


async def boom() -> None:
    raise Boom


async def trip(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.config.failure_threshold or 1):
        with pytest.raises(Boom):
            await breaker.call(boom)
    assert state_of(breaker) is CircuitState.OPEN


async def test_call_trips_and_raises_a_fresh_open_error_each_time() -> None:
    clock = FakeClock(start=1000.0)
    breaker = CircuitBreaker("svc", clock=clock)
    assert await breaker.call(ok, 7) == 7
    await trip(breaker)
    clock.now += 10
    errors = []
    for _ in range(2):
        with pytest.raises(CircuitOpenError) as info:
            await breaker.call(ok)
        errors.append(info.value)
    assert errors[0] is not errors[1]
    assert errors[0].name == "svc" and errors[0].retry_after == pytest.approx(20.0)
    m = breaker.metrics()
    assert (m.total_calls, m.total_successes, m.total_failures, m.total_rejections) == (8, 1, 5, 2)
    assert m.consecutive_failures == 5 and m.times_opened == 1
    assert m.last_failure_time == 1000.0 and m.last_state_change == 1000.0


async def test_no_lock_is_held_across_the_guarded_await() -> None:
    breaker = CircuitBreaker("svc")
    release = anyio.Event()
    peak = 0

    async def wait() -> None:
        nonlocal peak
        peak = max(peak, breaker.metrics().in_flight)
        await release.wait()

    async with anyio.create_task_group() as tg:
        for _ in range(200):
            tg.start_soon(breaker.call, wait)
        await anyio.wait_all_tasks_blocked()
        assert breaker.metrics().in_flight == 200
        release.set()
    assert peak == 200 and breaker.metrics().total_successes == 200


async def test_half_open_admits_exactly_the_budget_under_concurrency() -> None:
    clock = FakeClock(start=1000.0)
    breaker = CircuitBreaker("svc", clock=clock, half_open_max_calls=3)
    await trip(breaker)
    clock.now += 30
    release = anyio.Event()
    admitted = rejected = 0

    async def trial() -> None:
        nonlocal admitted
        admitted += 1
        await release.wait()

    async def caller() -> None:
        nonlocal rejected
        try:
            await breaker.call(trial)
        except CircuitOpenError:
            rejected += 1

    async with anyio.create_task_group() as tg:
        for _ in range(300):
            tg.start_soon(caller)
        await anyio.wait_all_tasks_blocked()
        assert (admitted, rejected) == (3, 297)
        assert state_of(breaker) is CircuitState.HALF_OPEN
        release.set()
    assert state_of(breaker) is CircuitState.CLOSED


async def test_cancellation_never_counts_and_returns_half_open_permits() -> None:
    clock = FakeClock(start=1000.0)
    breaker = CircuitBreaker("svc", clock=clock, half_open_max_calls=1, failure_threshold=1)
    async with anyio.create_task_group() as tg:
        for _ in range(200):
            tg.start_soon(breaker.call, anyio.sleep_forever)
        await anyio.wait_all_tasks_blocked()
        tg.cancel_scope.cancel()
    m = breaker.metrics()
    assert (m.total_failures, m.total_ignored, m.in_flight) == (0, 200, 0)
    assert state_of(breaker) is CircuitState.CLOSED

    await trip(breaker)
    clock.now += 30
    with anyio.move_on_after(0.01):
        await breaker.call(anyio.sleep_forever)
    assert state_of(breaker) is CircuitState.HALF_OPEN
    assert await breaker.call(ok, 2) == 2  # the cancelled trial gave its permit back
    assert state_of(breaker) is CircuitState.CLOSED


async def test_a_timeout_inside_the_call_is_a_failure() -> None:
    breaker = CircuitBreaker("svc", failure_threshold=1)

    async def slow() -> None:
        with anyio.fail_after(0.01):
            await anyio.sleep_forever()

    with pytest.raises(TimeoutError):
        await breaker.call(slow)
    assert state_of(breaker) is CircuitState.OPEN


async def test_listeners_see_every_transition_once() -> None:
    clock = FakeClock(start=1000.0)
    breaker = CircuitBreaker("svc", clock=clock, failure_threshold=3, half_open_max_calls=2)
    sync_seen: list[tuple[CircuitState | None, CircuitState]] = []
    async_seen: list[tuple[CircuitState | None, CircuitState]] = []
    kinds: list[str] = []

    def on_change(event: BreakerEvent) -> None:
        sync_seen.append((event.from_state, event.state))

    async def on_change_async(event: BreakerEvent) -> None:
        await anyio.lowlevel.checkpoint()
        async_seen.append((event.from_state, event.state))

    async def on_any(event: BreakerEvent) -> None:
        kinds.append(event.kind)

    breaker.add_listener("state_change", on_change)
    breaker.add_listener("state_change", on_change_async)
    for kind in ("success", "failure", "rejection"):
        breaker.add_listener(kind, on_any)

    async def worker(i: int) -> None:
        for round_ in range(20):
            try:
                if (i + round_) % 7:
                    await breaker.call(boom)
                else:
                    await breaker.call(ok)
            except (Boom, CircuitOpenError):
                pass
            await anyio.lowlevel.checkpoint()
            clock.now += 1

    async with anyio.create_task_group() as tg:
        for i in range(100):
            tg.start_soon(worker, i)
    await breaker.flush_events()
    m = breaker.metrics()
    assert sync_seen == async_seen or sorted(map(str, sync_seen)) == sorted(map(str, async_seen))
    assert len(async_seen) == len(sync_seen) > 0
    assert sum(1 for _, new in sync_seen if new is CircuitState.OPEN) == m.times_opened
    assert kinds.count("success") == m.total_successes
    assert kinds.count("failure") == m.total_failures
    assert kinds.count("rejection") == m.total_rejections


async def test_execute_with_sync_and_async_fallbacks() -> None:
    breaker = CircuitBreaker("svc", failure_threshold=1)
    result = await breaker.execute(ok, 3, fallback=lambda: -1)
    assert (result.value, result.state, result.from_fallback) == (3, CircuitState.CLOSED, False)
    await trip(breaker)

    async def async_fallback() -> int:
        return -2

    first = await breaker.execute(ok, fallback=lambda: None)
    assert (first.value, first.state, first.from_fallback) == (None, CircuitState.OPEN, True)
    assert (await breaker.execute(ok, fallback=async_fallback)).value == -2
    with pytest.raises(CircuitOpenError):
        await breaker.execute(ok)
    m = breaker.metrics()
    assert (m.total_fallbacks, m.total_rejections) == (2, 3)
    with pytest.raises(AttributeError):
        first.value = 5  # type: ignore[misc]  # read-only for mypy too


async def test_decorator_and_context_manager() -> None:
    breaker = CircuitBreaker("svc", failure_threshold=2)

    @breaker
    async def double(x: int) -> int:
        return 2 * x

    assert await double(4) == 8 and double.__name__ == "double"
    async with breaker, breaker:  # nesting keeps one frame per level
        pass
    assert breaker.metrics().total_successes == 3
    with anyio.move_on_after(0.01):
        async with breaker:
            await anyio.sleep_forever()
    assert breaker.metrics().total_ignored == 1
    for _ in range(2):
        with pytest.raises(Boom):
            async with breaker:
                raise Boom
    with pytest.raises(CircuitOpenError):
        async with breaker:
            pass
    with pytest.raises(CircuitOpenError):
        await double(1)


async def test_classification_of_exceptions_and_results() -> None:
    breaker = CircuitBreaker(
        "svc",
        failure_threshold=2,
        record_exceptions=(Boom,),
        ignore_exceptions=(KeyError,),
        failure_if=lambda r: r.status >= 500,
    )

    async def raise_(exc: Exception) -> None:
        raise exc

    async def respond(status: int) -> Any:
        return SimpleNamespace(status=status)

    for exc in (KeyError("k"), ValueError("not recorded: a success")):
        with pytest.raises(type(exc)):
            await breaker.call(raise_, exc)
    assert (await breaker.call(respond, 503)).status == 503
    m = breaker.metrics()
    assert (m.total_ignored, m.total_successes, m.total_failures) == (1, 1, 1)
    await breaker.call(respond, 502)
    assert state_of(breaker) is CircuitState.OPEN


@pytest.mark.parametrize("policy", ["ignore", "failure", "hold"])
async def test_throttle_policies(policy: str) -> None:
    clock = FakeClock(start=1000.0)
    breaker = CircuitBreaker(
        "svc",
        clock=clock,
        failure_threshold=1,
        on_throttle=policy,  # type: ignore[arg-type]
        throttle=http_throttle,
        max_hold=10.0,
    )

    async def throttled() -> Any:
        return SimpleNamespace(status=429, headers={"Retry-After": "120"})

    await breaker.call(throttled)
    m = breaker.metrics()
    if policy == "failure":
        assert state_of(breaker) is CircuitState.OPEN and m.total_failures == 1
    elif policy == "hold":
        assert state_of(breaker) is CircuitState.CLOSED and m.times_opened == 0
        with pytest.raises(CircuitOpenError) as info:
            await breaker.call(ok)
        assert info.value.retry_after == pytest.approx(10.0)  # capped by max_hold
        clock.now += 10
        assert await breaker.call(ok) == 1
    else:
        assert state_of(breaker) is CircuitState.CLOSED and m.total_ignored == 1


async def test_manual_control_metrics_only_and_logging(caplog: pytest.LogCaptureFixture) -> None:
    breaker = CircuitBreaker("svc", failure_threshold=1)
    changes: list[str] = []

    async def record(event: BreakerEvent) -> None:
        changes.append(event.state.value)

    breaker.add_listener("state_change", record)
    with caplog.at_level(logging.INFO, logger="fineflow.breaker"):
        breaker.metrics_only()
        for _ in range(3):
            with pytest.raises(Boom):
                await breaker.call(boom)
        assert state_of(breaker) is CircuitState.METRICS_ONLY
        breaker.force_open()
        with pytest.raises(CircuitOpenError) as info:
            await breaker.call(ok)
        assert info.value.retry_after is None
        breaker.disable()
        for _ in range(3):
            with pytest.raises(Boom):
                await breaker.call(boom)
        assert state_of(breaker) is CircuitState.DISABLED
        breaker.reset()
        await breaker.flush_events()
    assert changes == ["metrics_only", "forced_open", "disabled", "closed"]
    records = [r for r in caplog.records if r.name == "fineflow.breaker"]
    assert [(r.from_state, r.to_state) for r in records] == [  # type: ignore[attr-defined]
        ("closed", "metrics_only"),
        ("metrics_only", "forced_open"),
        ("forced_open", "disabled"),
        ("disabled", "closed"),
    ]
    assert all(r.event == "circuit_breaker_transition" for r in records)  # type: ignore[attr-defined]
    assert all(r.breaker == "svc" and r.reason for r in records)  # type: ignore[attr-defined]
    assert records[1].levelno == logging.WARNING


async def test_listener_errors_never_reach_the_call(caplog: pytest.LogCaptureFixture) -> None:
    breaker = CircuitBreaker("svc")

    def bad(event: BreakerEvent) -> None:
        raise RuntimeError("listener bug")

    breaker.add_listener("success", bad)
    assert await breaker.call(ok) == 1
    assert "listener failed" in caplog.text
    with pytest.raises(ConfigurationError, match="unknown event kind"):
        breaker.add_listener("opened", bad)  # type: ignore[arg-type]


def test_constructor_validation() -> None:
    with pytest.raises(ConfigurationError, match="non-empty"):
        CircuitBreaker("")
    with pytest.raises(ConfigurationError, match="tuple of exception classes"):
        CircuitBreaker("x", record_exceptions=[ValueError])  # type: ignore[arg-type]


async def test_fast_paths_keep_every_metric() -> None:
    """call and execute inline the closed path; the metrics must not notice."""
    clock = FakeClock(start=1000.0)
    breaker = CircuitBreaker("svc", clock=clock)
    clock.now = 1001.0
    assert await breaker.call(ok, 3) == 3
    clock.now = 1002.0
    value, state, from_fallback = await breaker.execute(ok, 4)  # a named tuple
    assert (value, state, from_fallback) == (4, CircuitState.CLOSED, False)
    with pytest.raises(Boom):
        await breaker.call(boom)
    m = breaker.metrics()
    assert (m.total_calls, m.total_successes, m.total_failures, m.in_flight) == (3, 2, 1, 0)
    assert (m.last_success_time, m.last_failure_time) == (1002.0, 1002.0)
    assert (m.consecutive_successes, m.consecutive_failures) == (0, 1)
    clock.now = 1003.0
    await breaker.execute(ok)
    m = breaker.metrics()
    assert (m.consecutive_successes, m.consecutive_failures, m.last_success_time) == (1, 0, 1003.0)


async def test_a_call_admitted_before_a_reset_extends_no_run() -> None:
    breaker = CircuitBreaker("svc", failure_threshold=3)
    for _ in range(2):
        with pytest.raises(Boom):
            await breaker.call(boom)
    entered, gate = anyio.Event(), anyio.Event()

    async def slow() -> int:
        entered.set()
        await gate.wait()
        return 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(breaker.call, slow)
        await entered.wait()
        assert breaker.metrics().in_flight == 1
        breaker.reset()
        with pytest.raises(Boom):
            await breaker.call(boom)
        gate.set()
    m = breaker.metrics()
    # The stale success counts in the totals, but neither ends the new run of failures
    # nor starts a run of successes.
    assert (m.total_successes, m.consecutive_failures, m.consecutive_successes) == (1, 1, 0)
    assert m.in_flight == 0


async def test_success_listeners_and_classifiers_leave_the_fast_path() -> None:
    breaker = CircuitBreaker("svc", failure_if=lambda result: result == 500)
    assert (await breaker.execute(ok, 500)).value == 500
    assert breaker.metrics().total_failures == 1
    plain = CircuitBreaker("plain")
    seen: list[str] = []

    async def on_success(event: BreakerEvent) -> None:
        seen.append(event.kind)

    await plain.call(ok)
    plain.add_listener("success", on_success)
    await plain.call(ok)
    await plain.execute(ok)
    assert seen == ["success", "success"]
    plain.remove_listener("success", on_success)
    await plain.call(ok)
    assert seen == ["success", "success"]
    assert plain.metrics().total_successes == 4


async def test_async_listener_removed_with_events_pending_still_gets_them() -> None:
    breaker = CircuitBreaker("svc")
    seen: list[str] = []

    async def on_change(event: BreakerEvent) -> None:
        seen.append(f"{event.from_state} -> {event.state}")

    breaker.add_listener("state_change", on_change)
    breaker.force_open()  # queued for the async listener
    breaker.remove_listener("state_change", on_change)
    breaker.reset()  # no listener any more: nothing queued
    await breaker.call(ok)  # the next guarded call delivers what was queued
    assert seen == ["CircuitState.CLOSED -> CircuitState.FORCED_OPEN"]
    await breaker.call(ok)
    assert seen == ["CircuitState.CLOSED -> CircuitState.FORCED_OPEN"]


async def test_the_inlined_path_passes_positional_and_keyword_arguments() -> None:
    async def echo(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return args, kwargs

    breaker = CircuitBreaker("svc")
    assert await breaker.call(echo) == ((), {})
    assert await breaker.call(echo, 1, 2) == ((1, 2), {})
    assert await breaker.call(echo, 1, key="v") == ((1,), {"key": "v"})
    assert (await breaker.execute(echo)).value == ((), {})
    assert (await breaker.execute(echo, 1, key="v")).value == ((1,), {"key": "v"})
    assert breaker.metrics().total_successes == 5


async def test_what_changes_during_a_call_decides_how_its_success_counts() -> None:
    """A success listener, a hold or a reset arriving while a call on the quiet closed path
    is awaited sends its success through the full path (event, staleness) instead."""
    clock = FakeClock(start=1000.0)
    breaker = CircuitBreaker("svc", clock=clock, on_throttle="hold")
    seen: list[str] = []
    entered, gate = anyio.Event(), anyio.Event()

    async def slow() -> int:
        entered.set()
        await gate.wait()
        return 1

    async def run(change: Any) -> None:
        nonlocal entered, gate
        entered, gate = anyio.Event(), anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(breaker.call, slow)
            await entered.wait()
            assert breaker.metrics().in_flight == 1
            change()
            gate.set()
        assert breaker.metrics().in_flight == 0

    def on_success(event: BreakerEvent) -> None:
        seen.append(event.kind)

    def hold() -> None:  # an upstream's 429 with Retry-After: 5, under on_throttle="hold"
        permit = breaker.try_acquire()
        assert permit is not None
        permit.throttled(5.0)

    await run(lambda: breaker.add_listener("success", on_success))
    assert seen == ["success"]
    breaker.remove_listener("success", on_success)
    await run(hold)
    m = breaker.metrics()
    assert (m.total_successes, m.consecutive_successes, m.last_success_time) == (2, 2, 1000.0)
    clock.now = 1010.0
    await breaker.call(ok)  # the hold ended: back on the inlined path
    await run(breaker.reset)
    m = breaker.metrics()
    # The stale success counts in the totals only.
    assert (m.total_successes, m.consecutive_successes) == (4, 0)
    assert m.last_success_time == 1010.0


def pending(breaker: CircuitBreaker) -> bool:
    return breaker.events_pending  # a call, so mypy does not narrow it between steps


async def test_events_pending_until_flushed() -> None:
    breaker = CircuitBreaker("pending", failure_threshold=1)
    seen: list[str] = []

    async def on_failure(event: BreakerEvent) -> None:
        seen.append(event.kind)

    breaker.add_listener("failure", on_failure)
    assert not pending(breaker)
    permit = breaker.try_acquire()
    assert permit is not None
    permit.failure()
    assert pending(breaker)  # queued, not yet delivered
    assert seen == []
    await breaker.flush_events()
    assert not pending(breaker)
    assert seen == ["failure"]


# -- synchronous callables ------------------------------------------------------------------


def sync_ok(value: int = 1, *, plus: int = 0) -> int:
    return value + plus


def sync_boom() -> None:
    raise Boom


@pytest.mark.parametrize("to_thread", [False, True])
async def test_sync_callables_are_classified_like_async_ones(to_thread: bool) -> None:
    clock = FakeClock(start=1000.0)
    seen: list[str] = []
    breaker = CircuitBreaker(
        "svc",
        failure_threshold=2,
        ignore_exceptions=(KeyError,),
        failure_if=lambda r: r == 500,
        to_thread=to_thread,
        clock=clock,
    )
    breaker.add_listener("success", lambda e: seen.append(e.kind))
    breaker.add_listener("failure", lambda e: seen.append(e.kind))
    assert await breaker.call(sync_ok, 2, plus=3) == 5
    assert (await breaker.execute(sync_ok, 4, fallback=lambda: -1)).value == 4

    def missing() -> None:
        raise KeyError("x")

    with pytest.raises(KeyError):
        await breaker.call(missing)  # ignored: neither success nor failure
    assert await breaker.call(sync_ok, 500) == 500  # a failure by failure_if
    with pytest.raises(Boom):
        await breaker.call(sync_boom)
    assert state_of(breaker) is CircuitState.OPEN
    with pytest.raises(CircuitOpenError):
        await breaker.call(sync_ok)
    rejected = await breaker.execute(sync_ok, fallback=lambda: -1)
    assert (rejected.value, rejected.from_fallback) == (-1, True)
    m = breaker.metrics()
    assert (m.total_successes, m.total_failures, m.total_ignored) == (2, 2, 1)
    assert (m.total_rejections, m.total_fallbacks, m.in_flight) == (2, 1, 0)
    assert seen == ["success", "success", "failure", "failure"]


async def test_to_thread_runs_plain_functions_off_the_event_loop_thread() -> None:
    import threading

    loop_thread = threading.get_ident()
    inline = CircuitBreaker("inline")
    threaded = CircuitBreaker("threaded", to_thread=True)
    assert await inline.call(threading.get_ident) == loop_thread
    assert await threaded.call(threading.get_ident) != loop_thread
    assert (await threaded.execute(threading.get_ident)).value != loop_thread

    async def where() -> int:
        return threading.get_ident()

    assert await threaded.call(where) == loop_thread  # coroutine functions stay on the loop
    assert await threaded.call(functools.partial(where)) == loop_thread
    assert threaded.metrics().total_successes == 4


async def test_a_plain_function_returning_an_awaitable_is_awaited() -> None:
    breaker = CircuitBreaker("svc")
    assert await breaker.call(lambda: ok(7)) == 7  # e.g. aiohttp's session.get(url)
    assert (await breaker.execute(lambda: ok(8))).value == 8
    assert breaker.metrics().total_successes == 2


async def test_the_decorator_accepts_plain_functions() -> None:
    breaker = CircuitBreaker("svc", failure_threshold=1, to_thread=True)

    @breaker
    def add(a: int, b: int = 0) -> int:
        return a + b

    @breaker
    def fails() -> None:
        raise Boom

    assert add.__name__ == "add"
    assert await add(1, b=2) == 3
    with pytest.raises(Boom):
        await fails()
    with pytest.raises(CircuitOpenError):
        await add(1)


async def test_a_threaded_call_cancelled_while_running_counts_as_what_it_did() -> None:
    # A worker thread cannot be interrupted: anyio waits for it, so the call finishes and
    # its outcome is known (a cancellation that stops a call before it ends never counts).
    import threading

    release = threading.Event()
    breaker = CircuitBreaker("svc", to_thread=True)

    def blocked() -> None:
        release.wait(10)

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(breaker.call, blocked)
            await anyio.wait_all_tasks_blocked()
            scope.cancel()
            release.set()  # the worker thread finishes its work
    m = breaker.metrics()
    assert (m.total_successes, m.total_failures, m.total_ignored, m.in_flight) == (1, 0, 0, 0)


def test_to_thread_must_be_a_bool() -> None:
    with pytest.raises(ConfigurationError, match="to_thread"):
        CircuitBreaker("svc", to_thread="yes")  # type: ignore[arg-type]


async def test_a_type_error_from_the_call_is_its_failure_not_a_plain_result() -> None:
    breaker = CircuitBreaker("svc")

    async def bad_async() -> None:
        raise TypeError("from the coroutine")

    def bad_sync() -> None:
        raise TypeError("from the function")

    for fn in (bad_async, bad_sync):
        with pytest.raises(TypeError, match="from the"):
            await breaker.call(fn)
        with pytest.raises(TypeError, match="from the"):
            await breaker.execute(fn)

    def nothing() -> None:
        pass

    await breaker.call(nothing)  # a plain None is a result too
    m = breaker.metrics()
    assert (m.total_failures, m.total_successes) == (4, 1)


async def test_the_types_users_see_for_plain_and_async_functions() -> None:
    # Checked by mypy (the test suite is type-checked): the overloads give the result type
    # of the function, whether it is a coroutine function or a plain one.
    breaker = CircuitBreaker("svc")
    assert_type(await breaker.call(ok, 1), int)
    assert_type(await breaker.call(sync_ok, 1, plus=2), int)
    assert_type(await breaker.execute(ok, 1), BreakerResult[int])
    assert_type(await breaker.execute(sync_ok, 1), BreakerResult[int])

    @breaker
    def plain(x: int) -> str:
        return str(x)

    @breaker
    async def coroutine(x: int) -> str:
        return str(x)

    guarded: list[Callable[[int], Coroutine[Any, Any, str]]] = [plain, coroutine]
    assert_type(await plain(1), str)
    assert [await fn(1) for fn in guarded] == ["1", "1"]
