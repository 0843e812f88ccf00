"""The Lua script, the names of what it stores, and the arguments it takes.

The state of one limited key lives in one hash, ``{prefix}:k:{<key>}``, one field per
(endpoint, policy): ``<endpoint>\0<policy>`` (see ``lua/decide.lua`` for the values). So every
quota of one key is in one Cluster slot (the key is the hash tag) and decided in one script,
and ``status``/``reset`` of a key read one hash.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from importlib import resources

from ..._ratelimit.algorithms import NS, BucketState
from ..._ratelimit.quota import Quota
from ..base import Hit, storage_key
from .wire import resp

__all__ = [
    "DECIDE",
    "Names",
    "Script",
    "Stored",
    "decide_args",
    "field",
    "refund_args",
    "tier_text",
]

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
