"""The rate-limit rules as the request path needs them: compiled once, collected per request.

A :class:`CompiledRule` is a :class:`Rule` with per-tier plans of pre-encoded header pieces;
a :class:`RuleSet` turns a request into the hits of every rule matching it.

A rule with a quota function gets its plan per request: the function's value, checked, is
turned into a plan once and kept in a bounded LRU per rule (keyed by the value), so a
request whose function returns ``"100/minute"`` again neither re-parses the string nor
re-encodes its header pieces.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import lru_cache
from inspect import isawaitable
from typing import Any

from .._asgi.types import Scope
from .._errors import ConfigurationError
from .._logfields import MAX_TEXT, log_extra
from .._storage.base import Hit
from .algorithms import new_record
from .headers import AppliedPolicy
from .quota import Quota
from .rules import CostFunc, QuotaFunc, Rule, parse_quotas

__all__ = ["CompiledRule", "RuleSet", "finish_key"]

logger = logging.getLogger("fineflow.middleware")

_MAX_WARNED_TIERS = 256
_MAX_TIER_LEN = 64
_Plan = tuple[tuple[Quota, AppliedPolicy], ...]
# Distinct values a rule's quota function returns whose plans are kept (per rule).
QUOTA_CACHE_SIZE = 256


def _plan(name: str, quotas: tuple[Quota, ...]) -> _Plan:
    """The quotas to charge with their policies: one quota is named after the rule, several
    ``rule:policy``."""
    one = len(quotas) == 1
    return tuple((q, AppliedPolicy(name if one else f"{name}:{q.policy}", q)) for q in quotas)


class CompiledRule:
    """A rule as the request path needs it: its matcher, key and cost, and per-tier plans
    of the quotas to charge with their pre-encoded header pieces."""

    matches: Callable[[str, str], bool]

    __slots__ = (
        "_cached_plan",
        "cost",
        "default_plan",
        "default_tier",
        "key",
        "matches",
        "name",
        "plan",
        "quota_fn",
        "tiers",
    )

    def __init__(self, rule: Rule, default_tier: str | None) -> None:
        name = self.name = rule.name
        self.matches = rule.matches  # (method, path) -> bool: the rule's own matcher
        self.key = rule.key
        self.cost = rule.cost
        self.plan = _plan(name, rule.quotas)
        self.tiers = {tier: _plan(name, qs) for tier, qs in rule.tiers.items()}
        self.default_tier = default_tier if default_tier is not None else next(iter(self.tiers), "")
        self.default_plan = self.tiers.get(self.default_tier, ())
        self.quota_fn: QuotaFunc | None = rule.quota_fn
        self._cached_plan = lru_cache(maxsize=QUOTA_CACHE_SIZE)(self._parsed_plan)

    def _parsed_plan(self, spec: str | Quota | tuple[str | Quota, ...]) -> _Plan:
        """The plan of a value of the quota function (parsed once: see ``_cached_plan``)."""
        try:
            return _plan(self.name, parse_quotas(spec, "the value"))
        except ConfigurationError as exc:
            raise ConfigurationError(
                f"the quota function of rule {self.name!r} returned {spec!r:.200}: {exc}"
            ) from exc

    def cache_info(self) -> Any:
        """The ``functools`` cache statistics of the quota function's parsed values."""
        return self._cached_plan.cache_info()

    async def plan_of(self, fn: QuotaFunc, scope: Scope) -> _Plan | None:
        """The plan of a request under the rule's quota function ``fn``, or ``None`` when it
        exempts the request.

        Raises:
            TypeError: when ``fn`` returns something other than a quota, a list of them or
                ``None`` (an app bug: the request fails rather than pass unlimited).
            ConfigurationError: when it returns an unparsable quota string.
        """
        value = fn(scope)
        if isawaitable(value):
            value = await value
        if value is None:
            return None
        if isinstance(value, str | Quota):
            return self._cached_plan(value)
        if isinstance(value, list | tuple) and all(isinstance(q, str | Quota) for q in value):
            return self._cached_plan(tuple(value))
        raise TypeError(
            f"the quota function of rule {self.name!r} returned {value!r:.200}; return a "
            "quota string such as '100/minute', a Quota, a non-empty list of them, or None "
            "to exempt the request"
        )


async def finish_key(value: object) -> str | None:
    """A key function's result as a key: awaited if awaitable, ``None`` kept, else ``str``."""
    if isawaitable(value):
        value = await value
    if value is None or isinstance(value, str):
        return value
    return str(value)


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
        rule matched (a rule whose key is ``None`` exempts the request from it)."""
        hits: list[Hit] = []
        applied: list[AppliedPolicy] = []
        matched = False
        default_key: str | None = None
        key_done = tier_done = False
        tier: str | None = None
        for rule in self.compiled:
            if not rule.matches(method, path):
                continue
            matched = True
            if rule.key is not None:
                subject = rule.key(scope)
                if subject is not None and subject.__class__ is not str:
                    subject = await finish_key(subject)
            elif key_done:
                subject = default_key
            else:
                subject = default_key = self.key(scope)
                if subject is not None and subject.__class__ is not str:
                    subject = default_key = await finish_key(subject)
                key_done = True
            if subject is None:
                continue
            if not tier_done:
                # The caller's tier, finished as a key is, as text of bounded length.
                tier = None if self.tier is None else self.tier(scope)
                if tier is not None and tier.__class__ is not str:
                    tier = await finish_key(tier)
                if tier is not None:
                    tier = tier[:_MAX_TIER_LEN]
                tier_done = True
            if rule.quota_fn is not None:
                dynamic = await rule.plan_of(rule.quota_fn, scope)
                if dynamic is None:
                    continue  # exempt from this rule, as by a key of None
                plan, tier_name = dynamic, tier or ""
            elif not rule.tiers:
                plan, tier_name = rule.plan, tier or ""
            else:
                plan, tier_name = self._tiered(rule, tier)
            cost = (
                rule.cost
                if isinstance(rule.cost, int)
                else await _cost_of(rule.cost, rule.name, scope)
            )
            for quota, policy in plan:
                hits.append(new_record(Hit, (subject, quota, cost, rule.name, tier_name)))
                applied.append(policy)
        return hits, applied, matched

    def _tiered(self, rule: CompiledRule, tier: str | None) -> tuple[_Plan, str]:
        """The quotas a rule with tiers charges a caller of ``tier``, and the tier to record
        (unknown and missing tiers take the default)."""
        plan = None if tier is None else rule.tiers.get(tier)
        if plan is not None:
            return plan, tier or ""
        if tier is not None:
            self._warn_tier(tier, rule)
        return rule.default_plan, rule.default_tier

    def _warn_tier(self, tier: str, c: CompiledRule) -> None:
        warned = self._warned
        if tier in warned or len(warned) >= _MAX_WARNED_TIERS:
            return
        warned.add(tier)
        tier = tier[:MAX_TEXT]
        logger.warning(
            "unknown tier %r for rule %r: using default tier %r (logged once per tier%s)",
            tier,
            c.name,
            c.default_tier,
            "; no more unknown tiers will be logged" if len(warned) == _MAX_WARNED_TIERS else "",
            extra=log_extra(
                "ratelimit_unknown_tier", rule=c.name, tier=tier, reason="unknown tier"
            ),
        )
