"""Shared breaker state in Redis: the Lua script held to the reference rules (the steps and
the shared failure counting), instances counting failures together until the row opens,
another OS process adopting an open, the script forgotten by the server (NOSCRIPT), and a
throwaway server going away and coming back (never the machine's own server)."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from redis_fixtures import (  # noqa: F401 - the fixtures redis_server, redis_storage, throwaway
    redis_server_fixture,
    redis_storage_fixture,
    throwaway_fixture,
)

from fineflow import CircuitState, RedisStorage
from fineflow._breaker.shared import (
    Action,
    SharedPolicy,
    SharedRow,
    SharedState,
    Tally,
    count_row,
    step_row,
)
from fineflow._storage.base import storage_key
from fineflow._storage.redis.scripts import BREAKER, Names
from fineflow.testing.redis import RedisServer, delete_prefix, unique_prefix
from shared_breaker_helpers import (
    an_open_reaches_a_child,
    eventually,
    opened,
    redis_instances,
    the_store_going_away_and_coming_back,
)

pytestmark = pytest.mark.anyio

OPEN, CLOSED = CircuitState.OPEN, CircuitState.CLOSED
ACTIONS = st.sampled_from(list(Action))


@pytest.fixture(scope="module")
def reference_prefix(redis_server: RedisServer) -> Iterator[str]:
    """The prefix the differential test steps rows under (Hypothesis runs many examples in
    one test function, so it is made once)."""
    prefix = unique_prefix("ffreference")
    yield prefix
    anyio.run(delete_prefix, redis_server.url, prefix)


@settings(max_examples=60)
@given(
    steps=st.lists(st.tuples(ACTIONS, st.integers(0, 3), st.booleans()), min_size=1, max_size=12),
    reset=st.sampled_from([0.0, 1000.0]),
    max_calls=st.integers(1, 3),
    to_close=st.integers(1, 3),
)
def test_the_script_follows_the_reference(
    redis_server: RedisServer,
    reference_prefix: str,
    steps: list[tuple[Action, int, bool]],
    reset: float,
    max_calls: int,
    to_close: int,
) -> None:
    """The Lua script against ``step_row``: the reference at a constant ``now`` (a reset
    timeout of 0 or 1000 s is due or not whatever the milliseconds the calls take)."""
    policy = SharedPolicy(reset, 2.0, max(reset, 1.0) * 8, max_calls, to_close, 1e6)
    names = Names(reference_prefix)
    name = secrets.token_hex(6)
    channel = names.breakers_channel
    row = SharedRow()
    with redis.Redis.from_url(redis_server.url) as client:
        for action, want, stale in steps:
            generation = row.generation - 1 if stale else row.generation
            row, granted = step_row(row, action, 0.0, policy, generation=generation, want=want)
            args = [action.value, generation, want, reset * 1000, 2.0]
            args += [policy.max_reset_timeout * 1000, 1.0, max_calls, to_close, 1e9]
            key = names.breaker(name)
            reply = client.eval(BREAKER.text.decode(), 1, key, *args, channel, name, "publish")
            state, generation_got, open_ms, granted_got = reply
            assert (state.decode(), generation_got, granted_got) == (
                row.state.value,
                row.generation,
                granted,
            )
            expected_ms = row.open_until * 1000 if row.state is OPEN else 0.0
            assert abs(float(open_ms) - expected_ms) < 1000.0


COUNTING = (
    "counted",
    "streak",
    "calls",
    "failures",
    "slow",
    "previous_calls",
    "previous_failures",
    "previous_slow",
)


@st.composite
def tallies(draw: st.DrawFn) -> Tally:
    """A tally one instance may report: ``trailing`` failures after its last success (all of
    them when there was none)."""
    successes, failures = draw(st.integers(0, 6)), draw(st.integers(0, 3))
    slow = draw(st.integers(0, successes + failures))
    trailing = failures if successes == 0 else draw(st.integers(0, failures))
    return Tally(successes, failures, slow, trailing)


# Rates that often sit exactly on an estimate (the arithmetic is exact: see the test).
RATES = st.none() | st.sampled_from([0.25, 1 / 3, 0.4, 0.5, 0.6, 2 / 3, 0.75, 1.0])


@st.composite
def counting_policies(draw: st.DrawFn) -> SharedPolicy:
    """A policy with a count window, or a time window of 1e6 s: no window of it ends while
    the test runs, so the server's clock cannot change the answer."""
    # Due at once (the row soon closes again through its trials) or never during the test.
    reset = draw(st.sampled_from([0.0, 0.0, 1000.0]))
    return SharedPolicy(
        reset,
        2.0,
        max(reset, 1.0) * 8,
        draw(st.integers(1, 3)),
        draw(st.integers(1, 2)),
        1e6,
        failure_threshold=draw(st.none() | st.integers(1, 10)),
        failure_rate=draw(RATES),
        slow_rate=draw(RATES),
        minimum_calls=draw(st.integers(1, 6)),
        window_calls=draw(st.just(0) | st.integers(1, 20)),
        window_seconds=1e6,
    )


# ("count", tally, generation offset) or (action, want, generation offset): mostly tallies,
# some of a stale generation, and steps that move the generation.
OFFSETS = st.sampled_from([0, 0, 0, 0, -1, 1])
COUNT_OPS = st.tuples(st.just("count"), tallies(), OFFSETS)
STEP_OPS = st.tuples(ACTIONS, st.integers(0, 3), OFFSETS)
OPS = st.sampled_from([COUNT_OPS] * 4 + [STEP_OPS]).flatmap(lambda ops: ops)


async def stored_counting(storage: RedisStorage, name: str) -> dict[str, int]:
    """The counting fields of ``name``'s hash (missing: -1 for counted, 0 otherwise)."""
    key = storage.names.breaker(storage_key(name))
    values = await storage.client.hmget(key, list(COUNTING))
    return {
        field: int(value) if value is not None else (-1 if field == "counted" else 0)
        for field, value in zip(COUNTING, values, strict=True)
    }


@given(
    policy=counting_policies(),
    ops=st.lists(OPS, min_size=1, max_size=30),
    shorten=st.sampled_from([1.0, 0.5]),
)
async def test_breaker_count_follows_the_reference(
    redis_server: RedisServer,
    reference_prefix: str,
    policy: SharedPolicy,
    ops: list[tuple[str | Action, Tally | int, int]],
    shorten: float,
) -> None:
    """The script's ``count`` (through ``RedisBreakerStore.count``) against ``count_row``,
    mixed with ``step_row`` steps, the reference at a constant ``now``: the state, the
    generation, the streak and the stored counters agree exactly.

    Exactly, not nearly: a count window's arithmetic does not involve the clock (the same
    doubles in the same order in both), and a time window of 1e6 s never ends while the
    test runs, so its previous window stays empty and the clock's weight multiplies zeros
    (checked below): a rate sitting exactly at its threshold trips both or neither.
    """
    name = secrets.token_hex(6)
    row = SharedRow()
    async with RedisStorage(redis_server.url, prefix=reference_prefix) as storage:
        store = storage.breaker_store()
        for op, arg, offset in ops:
            generation = row.generation + offset
            got: SharedState
            if op == "count":
                assert isinstance(arg, Tally)
                row = count_row(row, arg, 0.0, policy, generation=generation, shorten=shorten)
                got = await store.count(name, arg, policy, generation=generation, shorten=shorten)
                assert (got.state, got.generation, got.failures) == (
                    row.state,
                    row.generation,
                    row.seen_at(0.0).failures,
                )
                assert got.granted == 0
            else:
                assert isinstance(op, Action) and isinstance(arg, int)
                row, granted = step_row(
                    row, op, 0.0, policy, generation=generation, want=arg, shorten=shorten
                )
                got = await store.step(
                    name, op, policy, generation=generation, want=arg, shorten=shorten
                )
                assert (got.state, got.generation, got.granted) == (
                    row.state,
                    row.generation,
                    granted,
                )
            expected = row.open_until if row.state is OPEN else 0.0
            assert abs(got.open_for - expected) < 1.0
            stored = await stored_counting(storage, name)
            if row.counted == row.generation:
                assert stored == {f: getattr(row, f) for f in COUNTING}
                if policy.window_calls == 0:  # what makes the time windows exact (above)
                    assert (row.previous_calls, row.previous_failures, row.previous_slow) == (
                        0,
                        0,
                        0,
                    )
            else:  # stale counters (the script leaves them for the next count to reset)
                assert stored["counted"] != row.generation


@dataclass(eq=False)
class Heard:
    """A watcher recording what the store told it."""

    changes: list[SharedState] = field(default_factory=list)
    connections: int = 0

    def changed(self, state: SharedState) -> None:
        self.changes.append(state)

    def connected(self) -> None:
        self.connections += 1

    def disconnected(self, reason: str) -> None:
        pass


THRESHOLD_OF_SIX = SharedPolicy(30.0, 2.0, 600.0, 1, 1, 120.0, failure_threshold=6)


@pytest.fixture(params=["redis", "redis_cluster"])
def instances(request: pytest.FixtureRequest) -> Iterator[Callable[[], RedisStorage]]:
    """Instances of one service on the session's server, or on its throwaway Cluster."""
    with redis_instances(cluster=request.param == "redis_cluster") as factory:
        yield factory


async def test_instances_count_failures_together_until_the_row_opens(
    instances: Callable[[], RedisStorage],
) -> None:
    """Three instances report two failures each: the third report reaches the threshold of
    six, the row opens, and a subscriber hears of it."""
    policy = THRESHOLD_OF_SIX
    async with opened(instances, 4) as (one, two, three, listener):
        heard = Heard()
        listener.breaker_store().watch("api", heard)
        await eventually(lambda: heard.connections > 0, "the subscription")

        streaks = []
        for storage in (one, two):
            state = await storage.breaker_store().count(
                "api", Tally(0, 2, 0, 2), policy, generation=0
            )
            assert (state.state, state.generation) == (CLOSED, 0)
            streaks.append(state.failures)
        assert streaks == [2, 4]
        state = await three.breaker_store().count("api", Tally(0, 2, 0, 2), policy, generation=0)
        assert (state.state, state.generation, state.failures) == (OPEN, 1, 0)
        assert 29.0 < state.open_for <= 30.0

        await eventually(lambda: bool(heard.changes), "the open, published")
        (change,) = heard.changes
        assert (change.state, change.generation) == (OPEN, 1)
        assert 29.0 < change.open_for <= 30.0
        assert (await one.breaker_store().read("api")).state is OPEN


async def test_a_stale_count_changes_nothing(instances: Callable[[], RedisStorage]) -> None:
    """A tally of another generation than the row's, or of a row that is not closed, is
    dropped: the hash stays as it was and nothing is published."""
    policy = THRESHOLD_OF_SIX
    async with opened(instances, 2) as (one, listener):
        heard = Heard()
        listener.breaker_store().watch("api", heard)
        await eventually(lambda: heard.connections > 0, "the subscription")
        store = one.breaker_store()
        key = one.names.breaker(storage_key("api"))
        five = Tally(0, 5, 0, 5)

        state = await store.count("api", Tally(1, 3, 0, 3), policy, generation=0)
        assert (state.state, state.generation, state.failures) == (CLOSED, 0, 3)
        before = await one.client.hgetall(key)
        for stale in (1, -1):
            state = await store.count("api", five, policy, generation=stale)
            assert (state.state, state.generation, state.failures) == (CLOSED, 0, 3)
            assert await one.client.hgetall(key) == before

        assert (await store.step("api", Action.OPEN, policy)).generation == 1
        await eventually(lambda: bool(heard.changes), "the open, published")
        before = await one.client.hgetall(key)
        for stale in (0, 1):  # the old closed generation, and the open row's own
            state = await store.count("api", five, policy, generation=stale)
            assert (state.state, state.generation, state.failures) == (OPEN, 1, 0)
            assert await one.client.hgetall(key) == before

        assert (await store.step("api", Action.CLOSE, policy)).generation == 2
        state = await store.count("api", Tally(0, 1, 0, 1), policy, generation=2)
        assert (state.state, state.generation, state.failures) == (CLOSED, 2, 1)
        await eventually(lambda: heard.changes[-1].generation == 2, "the close, published")
        # (one channel delivers in order: a publish of a stale count would come before)
        assert [c.generation for c in heard.changes] == [1, 2]


@pytest.mark.parametrize(
    ("rates", "second", "opens"),
    [
        ((0.5, None), Tally(2, 3), True),  # 10 * 0.5 + 5 calls, 4 * 0.5 + 3 failures: 0.5
        ((0.5, None), Tally(3, 2), False),  # 10 calls, 4 failures: 0.4
        ((None, 0.5), Tally(5, 0, slow=3), True),  # 10 calls, 2 + 3 slow: 0.5
        ((None, 0.5), Tally(5, 0, slow=2), False),  # 10 calls, 4 slow: 0.4
    ],
)
async def test_the_previous_count_window_weighs_what_is_left_of_it(
    redis_storage: RedisStorage,
    rates: tuple[float | None, float | None],
    second: Tally,
    opens: bool,
) -> None:
    """A count window of ten holding five calls leaves half of the previous one in the
    estimate: a rate exactly at its threshold opens the row (doubles agree to the last bit
    here), one below does not; as ``count_row`` has it."""
    failure_rate, slow_rate = rates
    policy = SharedPolicy(
        30.0,
        2.0,
        600.0,
        1,
        1,
        120.0,
        failure_rate=failure_rate,
        slow_rate=slow_rate,
        window_calls=10,
        window_seconds=0.0,
    )
    store = redis_storage.breaker_store()
    row = SharedRow()
    for tally in (Tally(6, 4, slow=4), second):  # the first fills a window: 0.4 of each
        row = count_row(row, tally, 0.0, policy, generation=0)
        state = await store.count("api", tally, policy, generation=0)
        assert (state.state, state.generation, state.failures) == (
            row.state,
            row.generation,
            row.seen_at(0.0).failures,
        )
    assert state.state is (OPEN if opens else CLOSED)
    if not opens:
        expected = {f: getattr(row, f) for f in COUNTING}
        assert await stored_counting(redis_storage, "api") == expected


WIDTH = 10.0  # seconds of the time window below


@pytest.mark.parametrize(
    ("windows_ago", "opens"),
    [
        (0.2, False),  # 4 failures of 10 * 0.8 + 6 calls: 0.29
        (0.5, True),  # 4 of 10 * 0.5 + 6: 0.36
        (1.5, True),  # now the previous window: 4 * 0.5 of 4 * 0.5 + 2: 0.5
        (2.5, False),  # forgotten: 0 of 2
    ],
)
async def test_a_time_window_ends_on_the_servers_clock(
    redis_storage: RedisStorage, windows_ago: float, opens: bool
) -> None:
    """A window of ten seconds that began ``windows_ago`` windows ago on the server's clock,
    holding 4 failed calls (and a previous one of 10 good calls), gets 2 good calls: the
    failure rate of a third opens the row or not as ``count_row`` has it at the server's
    time read just before (the weights differ by milliseconds per ten seconds; the rates
    are far from the threshold)."""
    policy = SharedPolicy(30.0, 2.0, 600.0, 1, 1, 120.0, failure_rate=1 / 3, window_seconds=WIDTH)
    client = redis_storage.client
    seconds, micros = await client.time()
    now = seconds + micros / 1e6
    row = SharedRow(
        counted=0, window_start=now - windows_ago * WIDTH, calls=4, failures=4, previous_calls=10
    )
    fields: dict[Any, float] = {f: getattr(row, f) for f in COUNTING}
    fields["window_start"] = row.window_start * 1000.0
    key = redis_storage.names.breaker(storage_key("api"))
    await client.hset(key, mapping=fields)

    tally = Tally(successes=2)
    expected = count_row(row, tally, now, policy, generation=0)
    state = await redis_storage.breaker_store().count("api", tally, policy, generation=0)
    assert (state.state, state.generation) == (expected.state, expected.generation)
    assert state.state is (OPEN if opens else CLOSED)
    if not opens:
        stored = await stored_counting(redis_storage, "api")
        assert stored == {f: getattr(expected, f) for f in COUNTING}
        start = await client.hget(key, "window_start")
        assert start is not None
        assert float(start) == pytest.approx(expected.window_start * 1000.0, abs=0.01)


async def test_an_open_reaches_another_process(redis_server: RedisServer) -> None:
    prefix = unique_prefix("ffbreakers")
    async with RedisStorage(redis_server.url, prefix=prefix) as storage:
        await an_open_reaches_a_child(storage, ["redis", redis_server.url, prefix])
    await delete_prefix(redis_server.url, prefix)


async def test_a_server_without_the_script_gets_it_again(throwaway: RedisServer) -> None:
    async with RedisStorage(throwaway.url) as storage:
        store = storage.breaker_store()
        assert (await store.read("api")).state is CLOSED  # loads it (NOSCRIPT)
        with redis.Redis.from_url(throwaway.url) as client:
            client.script_flush()
        policy = SharedPolicy(30.0, 2.0, 600.0, 1, 1, 120.0)
        assert (await store.step("api", Action.OPEN, policy)).state is OPEN


@pytest.mark.slow
async def test_the_server_going_away_and_coming_back(
    throwaway: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Stopped: each instance goes on with its local state and says so once. Restarted
    (empty: no persistence): both rejoin, and an open made meanwhile reaches the other."""
    process = throwaway.process
    assert process is not None
    caplog.set_level(logging.INFO, "fineflow.breaker")

    def storages() -> RedisStorage:
        return RedisStorage(throwaway.url, connect_timeout=1.0, socket_timeout=1.0)

    await the_store_going_away_and_coming_back(storages, process.stop, process.start, caplog)
