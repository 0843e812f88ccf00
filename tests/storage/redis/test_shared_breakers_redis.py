"""Shared breaker state in Redis: the Lua script held to the reference rules, another OS
process adopting an open, the script forgotten by the server (NOSCRIPT), and a throwaway
server going away and coming back (never the machine's own server)."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator

import anyio
import anyio.to_thread
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from redis_fixtures import (  # noqa: F401 - the fixtures redis_server, throwaway
    redis_server_fixture,
    throwaway_fixture,
)

from fineflow import CircuitState, RedisStorage
from fineflow._breaker.shared import Action, SharedPolicy, SharedRow, step_row
from fineflow._storage.redis.scripts import BREAKER, Names
from fineflow.testing.redis import RedisServer, delete_prefix, unique_prefix
from shared_breaker_helpers import an_open_reaches_a_child, the_store_going_away_and_coming_back

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
