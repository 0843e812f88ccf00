"""The rate-limit rules as the request path needs them: compiled once, collected per request.

A :class:`CompiledRule` flattens a :class:`Rule` (pattern pieces, key, cost, per-tier plans of
pre-encoded header pieces); a :class:`RuleSet` turns a request into the hits of every rule
matching it (the general path of :class:`RateLimitMiddleware`: several rules, tiers, cost
functions).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from inspect import isawaitable
from typing import Any

from .._asgi.types import Scope
from .._storage.base import Hit
from .headers import AppliedPolicy
from .quota import Quota
from .rules import CostFunc, Rule

__all__ = ["CompiledRule", "RuleSet", "finish_key"]

logger = logging.getLogger("fineflow.middleware")

_new_hit = tuple.__new__  # builds a Hit without NamedTuple's Python-level __new__
_MAX_WARNED_TIERS = 256
_MAX_TIER_LEN = 64
# Rendered RateLimit headers kept per policy (AppliedPolicy.rates); cleared when full, so
# a wide spread of remaining counts (many keys, large quotas) cannot grow it unbounded.
MAX_CACHED_RATES = 1024
_Plan = tuple[tuple[Quota, AppliedPolicy], ...]


class CompiledRule:
    """A rule as the request path needs it: flat attributes, per-tier header plans."""

    __slots__ = (
        "cost",
        "default_plan",
        "default_tier",
        "key",
        "literal",
        "methods",
        "name",
        "plan",
        "prefix",
        "regex",
        "single",
        "tiers",
    )

    def __init__(self, rule: Rule, default_tier: str | None) -> None:
        def plan(quotas: tuple[Quota, ...]) -> _Plan:
            one = len(quotas) == 1
            return tuple(
                (q, AppliedPolicy(rule.name if one else f"{rule.name}:{q.policy}", q))
                for q in quotas
            )

        self.name = rule.name
        self.methods = rule.methods
        self.literal = rule.pattern.literal
        self.prefix = rule.pattern.prefix
        self.regex = None if self.prefix is not None else rule.pattern.regex
        self.key = rule.key
        self.cost = rule.cost
        self.plan = plan(rule.quotas)
        self.tiers = {tier: plan(qs) for tier, qs in rule.tiers.items()}
        self.default_tier = default_tier if default_tier is not None else next(iter(self.tiers), "")
        self.default_plan = self.tiers.get(self.default_tier, ())
        # The common shape: one fixed quota, a fixed cost. Such a rule yields exactly one
        # hit per request, built without the general loop.
        self.single: tuple[Quota, tuple[AppliedPolicy]] | None = (
            (self.plan[0][0], (self.plan[0][1],))
            if not self.tiers and len(self.plan) == 1 and isinstance(self.cost, int)
            else None
        )


async def finish_key(value: object) -> str | None:
    """A key function's result as a key: awaited if awaitable, ``None`` kept, else ``str``."""
    if isawaitable(value):
        value = await value
    if value is None or isinstance(value, str):
        return value
    return str(value)


async def _finish_tier(value: object) -> str | None:
    """A tier function's result that is not a ``str``: awaited, ``None`` kept, else text."""
    if isawaitable(value):
        value = await value
    if value is None:
        return None
    value = value if isinstance(value, str) else str(value)
    return value[:_MAX_TIER_LEN]


async def _cost_of(fn: CostFunc, rule: str, scope: Scope) -> int:
    value = fn(scope)
    if isawaitable(value):
        value = await value
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(
            f"the cost function of rule {rule!r} returned {value!r}; return an int >= 0"
        )
    return value


class RuleSet:
    """Compiled rules with the default key and the tier function: a request's hits.

    Args:
        rules: the middleware's rules, in order.
        key: the key function of rules without their own.
        tier: the tier function, or ``None``.
        default_tier: the tier of callers whose tier is ``None`` or unknown to a rule.
    """

    def __init__(
        self,
        rules: Sequence[Rule],
        key: Callable[[Scope], Any],
        tier: Callable[[Scope], Any] | None,
        default_tier: str | None,
    ) -> None:
        self.compiled = tuple(CompiledRule(r, default_tier) for r in rules)
        self.key = key
        self.tier = tier
        self._warned: set[str] = set()

    async def collect(
        self, scope: Scope, method: str, path: str
    ) -> tuple[list[Hit], list[AppliedPolicy], bool]:
        """The hits of every rule matching the request, their policies, and whether any
        rule matched (the general case: several rules, tiers, cost functions)."""
        hits: list[Hit] = []
        applied: list[AppliedPolicy] = []
        matched = key_done = tier_done = False
        default_key: str | None = None
        tier: str | None = None
        for c in self.compiled:
            if c.methods is not None and method not in c.methods:
                continue
            if c.regex is not None:
                if c.regex.fullmatch(path) is None:
                    continue
            elif c.prefix is not None:
                if not path.startswith(c.prefix):
                    continue
            elif path != c.literal:
                continue
            matched = True
            if c.key is None:
                if not key_done:
                    value = self.key(scope)
                    default_key = (
                        value
                        if value is None or value.__class__ is str
                        else (await finish_key(value))
                    )
                    key_done = True
                subject = default_key
            else:
                value = c.key(scope)
                subject = (
                    value if value is None or value.__class__ is str else (await finish_key(value))
                )
            if subject is None:
                continue
            if not tier_done:
                if self.tier is not None:
                    value = self.tier(scope)
                    tier = (
                        value[:_MAX_TIER_LEN]
                        if value.__class__ is str
                        else (await _finish_tier(value))
                    )
                tier_done = True
            if c.tiers:
                plan = c.tiers.get(tier) if tier is not None else None
                tier_name = tier
                if plan is None:
                    if tier is not None:
                        self._warn_tier(tier, c)
                    plan, tier_name = c.default_plan, c.default_tier
            else:
                plan, tier_name = c.plan, tier
            cost = c.cost if isinstance(c.cost, int) else await _cost_of(c.cost, c.name, scope)
            for quota, policy in plan:
                hits.append(_new_hit(Hit, (subject, quota, cost, c.name, tier_name or "")))
                applied.append(policy)
        return hits, applied, matched

    def _warn_tier(self, tier: str, c: CompiledRule) -> None:
        warned = self._warned
        if tier in warned or len(warned) >= _MAX_WARNED_TIERS:
            return
        warned.add(tier)
        logger.warning(
            "unknown tier %r for rule %r: using default tier %r (logged once per tier%s)",
            tier,
            c.name,
            c.default_tier,
            "; no more unknown tiers will be logged" if len(warned) == _MAX_WARNED_TIERS else "",
        )
