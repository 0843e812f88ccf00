"""BreakerRegistry: shared defaults, lookup, bulk metrics and reset, bounded size."""

from __future__ import annotations

import pytest

from fineflow._breaker.config import CircuitState
from fineflow._breaker.registry import BreakerRegistry
from fineflow._errors import ConfigurationError


def test_get_or_create_returns_one_breaker_per_name_with_defaults() -> None:
    registry = BreakerRegistry(failure_threshold=2, reset_timeout=5.0)
    ai = registry.get_or_create("ai-service", half_open_max_calls=1)
    assert registry.get_or_create("ai-service") is ai
    assert registry.get_or_create("ai-service", half_open_max_calls=1) is ai
    assert ai.config.failure_threshold == 2 and ai.config.half_open_max_calls == 1
    with pytest.raises(ConfigurationError, match="already exists"):
        registry.get_or_create("ai-service", half_open_max_calls=2)
    assert "ai-service" in registry and "other" not in registry
    assert [b.name for b in registry] == ["ai-service"]


def test_metrics_of_all_and_reset_all() -> None:
    registry = BreakerRegistry()
    a, b = registry.get_or_create("a"), registry.get_or_create("b")
    a.force_open()
    b.force_open()
    assert {n: m.state for n, m in registry.metrics().items()} == {
        "a": CircuitState.FORCED_OPEN,
        "b": CircuitState.FORCED_OPEN,
    }
    registry.reset_all()
    assert all(m.state is CircuitState.CLOSED for m in registry.metrics().values())


def test_bounded_registry_evicts_idle_closed_breakers_first() -> None:
    registry = BreakerRegistry(max_size=2)
    registry.get_or_create("a").force_open()
    registry.get_or_create("b")
    registry.get_or_create("c")
    assert sorted(b.name for b in registry) == ["a", "c"]
    assert len(registry) == 2


def test_invalid_defaults_fail_at_construction() -> None:
    with pytest.raises(ConfigurationError, match="failure_threshold"):
        BreakerRegistry(failure_threshold=0)
    with pytest.raises(ConfigurationError, match="max_size"):
        BreakerRegistry(max_size=0)
    with pytest.raises(TypeError):
        BreakerRegistry(no_such_option=1)


def test_get_circuit_breaker_uses_the_process_wide_registry() -> None:
    import fineflow as ff

    name = "test-default-registry-payments"
    payments = ff.get_circuit_breaker(name, failure_threshold=2)
    try:
        assert ff.get_circuit_breaker(name) is payments  # elsewhere: by name alone
        assert ff.get_circuit_breaker(name, failure_threshold=2) is payments
        assert ff.default_registry.get(name) is payments
        assert isinstance(ff.default_registry, ff.BreakerRegistry)
        with pytest.raises(ConfigurationError, match="already exists"):
            ff.get_circuit_breaker(name, failure_threshold=3)
        with pytest.raises(ConfigurationError):
            ff.get_circuit_breaker("test-default-registry-bad", failure_threshold=0)
        assert "test-default-registry-bad" not in ff.default_registry
    finally:
        ff.default_registry.reset_all()


def test_threads_asking_for_a_new_name_get_one_breaker() -> None:
    import threading

    registry = BreakerRegistry()
    start = threading.Barrier(8)
    got: list[object] = []

    def ask() -> None:
        start.wait()
        got.append(registry.get_or_create("shared", failure_threshold=3))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(got) == 8 and len({id(b) for b in got}) == 1 and len(registry) == 1
