"""What a breaker offers the exporters: the live set, transition counts, wall-clock times
and structured transition logs."""

from __future__ import annotations

import gc
import logging
import uuid

import pytest

import fineflow as ff
from fineflow._breaker.live import breakers, figures
from fineflow.testing import FakeClock

pytestmark = pytest.mark.anyio

WALL_START = 1_800_000_000.0


def boom() -> None:
    raise ConnectionError("down")


def named(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def test_metrics_carry_wall_clock_times_beside_the_monotonic_ones() -> None:
    clock, wall = FakeClock(100.0), FakeClock(WALL_START)
    breaker = ff.CircuitBreaker(named("wall"), failure_threshold=1, clock=clock, wall_clock=wall)
    m = breaker.metrics()
    assert (m.last_success_at, m.last_failure_at, m.last_state_change_at) == (None, None, None)
    await breaker.call(lambda: 1)
    clock.advance(5)
    wall.advance(5)
    with pytest.raises(ConnectionError):
        await breaker.call(boom)
    clock.advance(10)
    wall.advance(10)
    m = breaker.metrics()
    assert m.last_success_time == 100.0
    assert m.last_success_at == WALL_START
    assert m.last_failure_time == 105.0
    assert m.last_failure_at == WALL_START + 5
    assert m.last_state_change_at == WALL_START + 5


async def test_transitions_are_counted_by_from_and_to() -> None:
    clock = FakeClock(0.0)
    breaker = ff.CircuitBreaker(
        named("moves"), failure_threshold=1, reset_timeout=10, half_open_max_calls=1, clock=clock
    )
    for _ in range(2):
        with pytest.raises(ConnectionError):
            await breaker.call(boom)
        clock.advance(10)
    await breaker.call(lambda: 1)
    opened, closed, half = ff.CircuitState.OPEN, ff.CircuitState.CLOSED, ff.CircuitState.HALF_OPEN
    assert breaker.transitions() == {
        (closed, opened): 1,
        (opened, half): 2,
        (half, opened): 1,
        (half, closed): 1,
    }
    breaker.transitions().clear()  # a copy
    assert len(breaker.transitions()) == 4


async def test_the_live_set_drops_a_breaker_with_its_last_reference() -> None:
    breaker = ff.CircuitBreaker(named("live"))
    name = breaker.name
    assert name in [b.name for b in breakers()]
    del breaker
    # no gc.collect(): the breaker holds no reference cycle through its machine
    assert name not in [b.name for b in breakers()]
    gc.collect()
    assert name not in [f.name for f in figures()]


async def test_every_transition_log_record_carries_structured_fields(
    caplog: pytest.LogCaptureFixture,
) -> None:
    name = named("logs")
    breaker = ff.CircuitBreaker(name, failure_threshold=2)
    with caplog.at_level(logging.INFO, logger="fineflow.breaker"):
        for _ in range(2):
            with pytest.raises(ConnectionError):
                await breaker.call(boom)
        breaker.reset()
    records = [r for r in caplog.records if getattr(r, "breaker", None) == name]
    fields = [
        (r.event, r.from_state, r.to_state, r.reason)  # type: ignore[attr-defined]
        for r in records
    ]
    assert fields == [
        ("circuit_breaker_transition", "closed", "open", "2 consecutive failures"),
        ("circuit_breaker_transition", "open", "closed", "reset"),
    ]
    assert records[0].getMessage() == (
        f"circuit breaker {name!r}: closed -> open (2 consecutive failures)"
    )
    assert records[0].levelno == logging.WARNING


async def test_the_json_logging_example_of_the_docs(caplog: pytest.LogCaptureFixture) -> None:
    import json

    fields = ("event", "breaker", "from_state", "to_state", "reason")

    class JsonFormatter(logging.Formatter):  # as in docs/observability.md
        def format(self, record: logging.LogRecord) -> str:
            entry = {"level": record.levelname, "message": record.getMessage()}
            entry.update({f: getattr(record, f) for f in fields if hasattr(record, f)})
            return json.dumps(entry)

    name = named("json")
    breaker = ff.CircuitBreaker(name, failure_threshold=1)
    with caplog.at_level(logging.INFO, logger="fineflow.breaker"), pytest.raises(ConnectionError):
        await breaker.call(boom)
    (record,) = [r for r in caplog.records if getattr(r, "breaker", None) == name]
    assert json.loads(JsonFormatter().format(record)) == {
        "level": "WARNING",
        "message": f"circuit breaker {name!r}: closed -> open (1 consecutive failures)",
        "event": "circuit_breaker_transition",
        "breaker": name,
        "from_state": "closed",
        "to_state": "open",
        "reason": "1 consecutive failures",
    }
