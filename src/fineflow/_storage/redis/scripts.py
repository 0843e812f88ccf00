"""The Lua script, the names of what it stores, and the arguments it takes.

State of one (key, endpoint, policy) lives in a hash named
``{prefix}:s:{<key>}:<len(endpoint)>:<endpoint>:<policy>``; the hash tag ``{<key>}`` puts
every quota of one key in one Cluster slot, so they are decided in one script. The index
``{prefix}:i:{<key>}`` (same slot) lists a key's states for ``status`` and ``reset``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

from ..._ratelimit.algorithms import BucketState
from ..._ratelimit.quota import Quota
from ..base import Hit, storage_key

__all__ = ["DECIDE", "Meta", "Names", "Script", "decide_args", "refund_args", "tier_text"]

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
        self._state = f"{prefix}:s:{{"
        self._index = f"{prefix}:i:{{"
        # A SCAN pattern for every state name (glob characters in the prefix escaped).
        escaped = "".join("\\" + c if c in "*?[]\\" else c for c in prefix)
        self.state_pattern = f"{escaped}:s:*"

    def state(self, key: str, endpoint: str, policy: str) -> str:
        """The name of one state hash (``key`` and ``endpoint`` already storage keys)."""
        return f"{self._state}{_tag(key)}}}:{len(endpoint)}:{endpoint}:{policy}"

    def index(self, key: str) -> str:
        """The name of ``key``'s index set (``key`` already a storage key)."""
        return f"{self._index}{_tag(key)}}}"


@dataclass(frozen=True, slots=True)
class Meta:
    """What a state hash records about its quota, for ``status`` and ``stats``."""

    endpoint: str
    tier: str
    quota: Quota

    def encode(self) -> str:
        quota = self.quota
        burst = "" if quota.burst is None else str(quota.burst)
        return _SEP.join(
            (str(quota.limit), repr(quota.period), burst, self.endpoint, self.tier, quota.policy)
        )

    @classmethod
    def decode(cls, raw: bytes) -> Meta:
        limit, period, burst, endpoint, tier, policy = raw.decode("utf-8", "replace").split(_SEP, 5)
        quota = Quota(int(limit), float(period), int(burst) if burst else None, name=policy)
        return cls(endpoint, tier, quota)


def decide_args(algorithm: str, hit: Hit) -> tuple[int, int, int, int, str]:
    """The script's five arguments for one quota (see ``decide.lua``)."""
    quota = hit.quota
    if algorithm == "gcra":
        cap = quota.capacity
        cost = min(hit.cost, cap + 1)  # (a cost that can never fit stays small)
        span, tau = cost * quota.emission_interval_ns, quota.tolerance_ns
    else:
        cap = quota.limit
        cost = min(hit.cost, cap + 1)
        span, tau = quota.period_ns, 0
    meta = Meta(storage_key(hit.endpoint), tier_text(hit.tier), quota).encode()
    return cost, cap, span, tau, meta


def refund_args(algorithm: str, hit: Hit, charged: BucketState) -> tuple[int, int, int | str]:
    """The refund's three arguments for one quota charged into the state ``charged``."""
    quota = hit.quota
    cost = min(hit.cost, (quota.capacity if algorithm == "gcra" else quota.limit) + 1)
    if algorithm == "gcra":
        return cost, cost * quota.emission_interval_ns, ""
    return cost, charged.t, charged.t + quota.period_ns
