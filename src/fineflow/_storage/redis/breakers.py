"""Shared circuit-breaker state in Redis: the ``BreakerStore`` of a ``RedisStorage``.

Each breaker's row is one hash, ``{prefix}:b:{{prefix}}:<name>`` (see ``scripts.Names``).
A step, or a count of a closed breaker's outcomes (``count``), is one call of
``lua/breaker.lua`` (EVALSHA; loaded again after NOSCRIPT) on the server's clock; it
publishes the row on the storage's channel whenever its generation changes. One pub/sub
subscription per storage (its own connection, as a subscribed connection takes no other
command) hears those while the storage is open and breakers watch it;
``hub.ListeningStore`` restarts it with backoff when it is lost and tells the breakers when
notifications stop and flow again.

On one server the script PUBLISHes and the storage SUBSCRIBEs. On a Cluster it SPUBLISHes
and the storage SSUBSCRIBEs (sharded pub/sub, Redis 7+), through redis-py's asyncio
``ClusterPubSub``: every breaker row of a storage and its channel share one hash tag, so the
script publishes in its own slot, and a change is delivered by that slot's master alone
(a plain PUBLISH on a Cluster goes to every node over the cluster bus).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

from ..._breaker.config import CircuitState
from ..._breaker.hub import ListeningStore
from ..._breaker.shared import Action, SharedPolicy, SharedState, Tally
from ..base import storage_key
from .admin import Client
from .errors import translated
from .scripts import BREAKER, Names, load

__all__ = ["RedisBreakerStore"]

_READ = "read"  # the script's action that changes nothing (its other arguments unused)
_READ_ARGS = ("0",) * 9


def _brief(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).partition(chr(10))[0]}"


def _step_args(policy: SharedPolicy, generation: int, want: int, shorten: float) -> tuple[str, ...]:
    """The script's ARGV 2 to 10: generation, want and the reopen and half-open policy."""
    return (
        str(generation),
        str(want),
        repr(policy.reset_timeout * 1000.0),
        repr(policy.backoff_multiplier),
        repr(policy.max_reset_timeout * 1000.0),
        repr(shorten),
        str(policy.half_open_max_calls),
        str(policy.successes_to_close),
        repr(policy.half_open_max_wait * 1000.0),
    )


def _optional(threshold: float | None) -> str:
    """A threshold of the script: ``''`` for none."""
    return "" if threshold is None else repr(threshold)


class RedisBreakerStore(ListeningStore):
    """The breaker rows of one storage prefix (see the module docstring).

    Args:
        names: the storage's key names.
        client: returns the storage's open client (raises ``StorageClosedError`` otherwise).
        cluster: whether the client is a ``RedisCluster`` (sharded pub/sub).
    """

    def __init__(self, names: Names, client: Callable[[], Client], *, cluster: bool) -> None:
        super().__init__(key=storage_key, describe=_brief)
        self._names = names
        self._client = client
        self.channel = names.breakers_channel
        self._publish = "spublish" if cluster else "publish"

    # -- BreakerStore ----------------------------------------------------------------------

    async def read(self, name: str) -> SharedState:
        """The row of ``name`` now, on the server's clock."""
        return await self._run(name, _READ, _READ_ARGS, "reading shared breaker state")

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
        """One call of the breaker script on the row of ``name``."""
        args = _step_args(policy, generation, want, shorten)
        return await self._run(name, action.value, args, f"shared breaker step {action.value!r}")

    async def count(
        self,
        name: str,
        tally: Tally,
        policy: SharedPolicy,
        *,
        generation: int,
        shorten: float = 1.0,
    ) -> SharedState:
        """The breaker script's ``count`` on the row of ``name``: ``count_row`` on the
        server's clock; the shared streak comes back in ``failures``."""
        args = _step_args(policy, generation, 0, shorten)
        counting = (
            str(tally.successes),
            str(tally.failures),
            str(tally.slow),
            str(tally.trailing),
            _optional(policy.failure_threshold),
            _optional(policy.failure_rate),
            _optional(policy.slow_rate),
            str(policy.minimum_calls),
            str(policy.window_calls),
            repr(policy.window_seconds * 1000.0),
        )
        return await self._run(name, "count", args, "shared breaker count", counting)

    # -- the script ------------------------------------------------------------------------

    async def _run(
        self,
        name: str,
        action: str,
        args: tuple[str, ...],
        what: str,
        extra: tuple[str, ...] = (),
    ) -> SharedState:
        """One call of the script: ``args`` are its ARGV after the action (the step's),
        ``extra`` those after the channel, name and publish command (a count's)."""
        self.listen_if_watched()
        stored = storage_key(name)
        keys_and_args = (
            self._names.breaker(stored),
            action,
            *args,
            self.channel,
            stored,
            self._publish,
            *extra,
        )
        with translated(what):
            client = self._client()
            try:
                reply = await client.evalsha(BREAKER.sha, 1, *keys_and_args)
            except NoScriptError:
                await load(client, BREAKER)
                reply = await client.evalsha(BREAKER.sha, 1, *keys_and_args)
        state, generation, open_ms, fourth = reply
        circuit = CircuitState(state.decode() if isinstance(state, bytes) else state)
        open_for = float(open_ms) / 1000.0
        if action == "count":  # the script answers a count with the streak, not permits
            return SharedState(circuit, int(generation), open_for, 0, int(fourth))
        return SharedState(circuit, int(generation), open_for, int(fourth))

    # -- the subscription (ListeningStore) --------------------------------------------------

    async def subscribe(
        self, ready: Callable[[], None], deliver: Callable[[str | bytes], None]
    ) -> None:
        """Subscribe on a connection of its own until it fails (see ``ListeningStore``)."""
        client = self._client()
        if isinstance(client, RedisCluster):
            async with client.pubsub() as sharded:
                await sharded.ssubscribe(self.channel)
                while True:
                    message = await sharded.get_sharded_message(timeout=1.0)
                    _dispatch(message, ready, deliver)
        else:
            pubsub: PubSub
            async with client.pubsub() as pubsub:
                await pubsub.subscribe(self.channel)
                async for message in pubsub.listen():
                    _dispatch(message, ready, deliver)


def _dispatch(
    message: dict[str, Any] | None,
    ready: Callable[[], None],
    deliver: Callable[[str | bytes], None],
) -> None:
    """One pub/sub message: the subscription's confirmation, or a change."""
    if message is None:
        return
    kind = message["type"]
    kind = kind.decode() if isinstance(kind, bytes) else kind
    if kind in ("subscribe", "ssubscribe"):
        ready()
    elif kind in ("message", "smessage"):
        deliver(message["data"])
