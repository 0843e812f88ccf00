"""The Lua scripts, the names of what they store, and the arguments they take.

The state of one limited key lives in one hash, ``{prefix}:k:{<key>}``, one field per
(endpoint, policy): ``<endpoint>\0<policy>`` (see ``lua/decide.lua`` for the values). So every
quota of one key is in one Cluster slot (the key is the hash tag) and decided in one script,
and ``status``/``reset`` of a key read one hash.

The shared row of a circuit breaker lives in one hash, ``{prefix}:b:{{prefix}}:<name>``
(see ``lua/breaker.lua``), and its changes go out on the channel ``{prefix}:b:{{prefix}}``:
all of a storage's breaker rows and their channel share one hash tag, so on a Cluster the
script may publish on the channel of its row's slot (sharded pub/sub).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
from dataclasses import dataclass
from importlib import resources

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from ..._logfields import log_extra
from ..._ratelimit.algorithms import NS, BucketState
from ..._ratelimit.quota import Quota
from ..base import Hit, storage_key
from .wire import resp

__all__ = [
    "BREAKER",
    "DECIDE",
    "Names",
    "Script",
    "Stored",
    "decide_args",
    "field",
    "load",
    "refund_args",
    "tier_text",
]

logger = logging.getLogger("fineflow.storage")

_TIER_MAX = 64
_SEP = "\x00"  # storage keys never hold NUL (see storage_key)


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script shipped as package data, and its SHA1 for EVALSHA."""

    name: str
    text: bytes
    sha: str

    @classmethod
    def load(cls, name: str) -> Script:
        text = resources.files(__package__).joinpath("lua", name).read_bytes()
        return cls(name, text, hashlib.sha1(text).hexdigest())


DECIDE = Script.load("decide.lua")
BREAKER = Script.load("breaker.lua")


async def load(client: aioredis.Redis | RedisCluster, script: Script) -> None:
    """Load ``script`` into the server (after NOSCRIPT: a restart or SCRIPT FLUSH); on a
    Cluster into every master, each on its own: one that is down must not keep the others
    from the script (it gets it when it is back and answers NOSCRIPT)."""
    logger.info(
        "loading the script %s into Redis (NOSCRIPT)",
        script.name,
        extra=log_extra("storage_script_loaded", storage="RedisStorage", reason="NOSCRIPT"),
    )
    if isinstance(client, RedisCluster):
        await asyncio.gather(
            *(
                client.execute_command("SCRIPT LOAD", script.text, target_nodes=node)
                for node in client.get_primaries()
            ),
            return_exceptions=True,
        )
    else:
        await client.script_load(script.text)


def tier_text(tier: str) -> str:
    return storage_key(tier)[:_TIER_MAX]


def _tag(key: str) -> str:
    # A hash tag ends at the first "}": escape it (and the escape character) so the whole
    # key is the tag and distinct keys stay distinct names. The leading ":" keeps the tag
    # non-empty (an empty tag "{}" would hash the whole name).
    return ":" + key.replace("\\", "\\\\").replace("}", "\\]")


class Names:
    """Key names under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._key = f"{prefix}:k:{{"

    def key(self, key: str) -> str:
        """The name of ``key``'s hash (``key`` already a storage key)."""
        return f"{self._key}{_tag(key)}}}"

    @property
    def breakers_channel(self) -> str:
        """The channel of the breaker rows' changes (in their Cluster slot)."""
        return f"{self.prefix}:b:{{{self.prefix}}}"

    def breaker(self, name: str) -> str:
        """The name of the hash of breaker ``name``'s shared row (``name`` a storage key)."""
        return f"{self.breakers_channel}:{name}"


def field(endpoint: str, policy: str) -> str:
    """The field of one (endpoint, policy) in a key's hash (``endpoint`` a storage key)."""
    return f"{endpoint}{_SEP}{policy}"


@dataclass(frozen=True, slots=True)
class Stored:
    """One state as a key's hash holds it."""

    endpoint: str
    tier: str
    algorithm: str
    quota: Quota
    state: BucketState
    allowed: int
    denied: int

    @classmethod
    def decode(cls, name: bytes, value: bytes) -> Stored:
        endpoint, _, policy = name.decode("utf-8", "replace").partition(_SEP)
        alg, t, used, prev, allowed, denied, meta = value.split(b" ", 6)
        limit, period, burst, tier = meta.decode("utf-8", "replace").split(_SEP, 3)
        quota = Quota(int(limit), float(period), int(burst) if burst else None, name=policy)
        state = BucketState(int(t), int(used), int(prev))
        return cls(endpoint, tier, alg.decode(), quota, state, int(allowed), int(denied))


def _meta(quota: Quota, tier: str) -> str:
    burst = "" if quota.burst is None else str(quota.burst)
    return _SEP.join((str(quota.limit), repr(quota.period), burst, tier))


@functools.lru_cache(maxsize=4096)
def decide_args(
    algorithm: str, endpoint: str, tier: str, quota: Quota, cost: int
) -> tuple[tuple[bytes, bytes, bytes], bytes]:
    """The script's arguments for one quota after its hash's index (see ``decide.lua``),
    and the same encoded for the wire. (Cached: a service has few endpoints, tiers, quotas
    and costs, and the same few are asked for on every request.)"""
    if algorithm == "gcra":
        cap = quota.capacity
        cost = min(cost, cap + 1)  # (a cost that can never fit stays small)
        span, tau = cost * quota.emission_interval_ns, quota.tolerance_ns
    else:
        cap = quota.limit
        cost = min(cost, cap + 1)
        # (tau: the period in whole seconds if it is some, which spares the script bignums)
        span, tau = quota.period_ns, quota.period_ns // NS if quota.period_ns % NS == 0 else 0
    args = (
        field(storage_key(endpoint), quota.policy).encode(),
        b"%d %d %d %d" % (cost, cap, span, tau),
        _meta(quota, tier_text(tier)).encode(),
    )
    return args, resp(*args)


def refund_args(algorithm: str, hit: Hit, charged: BucketState) -> tuple[str, int, int, int | str]:
    """The refund's arguments for one quota charged into the state ``charged``, after its
    hash's index."""
    quota = hit.quota
    cost = min(hit.cost, (quota.capacity if algorithm == "gcra" else quota.limit) + 1)
    name = field(storage_key(hit.endpoint), quota.policy)
    if algorithm == "gcra":
        return name, cost, cost * quota.emission_interval_ns, ""
    return name, cost, charged.t, charged.t + quota.period_ns
