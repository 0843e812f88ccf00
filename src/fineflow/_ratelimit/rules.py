"""Rate-limit rules: which requests a quota applies to, compiled once at configuration time.

A rule matches a request by method and by path. Paths are route templates matched against
the same decoded ``scope["path"]`` the router sees, so percent-encoding cannot dodge a rule:

* ``{name}`` or ``{name:str}`` matches one path segment (no ``/``); ``{name:int}``,
  ``{name:float}`` and ``{name:uuid}`` match those shapes; ``{name:path}`` matches anything,
  including ``/`` and nothing at all;
* ``*`` matches anything, including ``/`` (``/api/chat/*`` covers everything under it);
* everything else matches literally.

The state of a rule is keyed by its name (not the raw path), so ``/users/1`` and
``/users/2`` share the limit of ``Rule("/users/{id}")``, and two rules never share state.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from .._asgi.types import Scope
from .._errors import ConfigurationError
from .quota import Quota

__all__ = [
    "CostFunc",
    "PathPattern",
    "QuotaFunc",
    "QuotaSpec",
    "Rule",
    "capacity_for",
    "parse_quotas",
]

QuotaSpec = Quota | str | Sequence[Quota | str]
"""One quota (a :class:`Quota` or a string such as ``"100/minute"``) or several."""

QuotaFunc = Callable[[Scope], "QuotaSpec | Awaitable[QuotaSpec | None] | None"]
"""A function of the ASGI scope returning the request's quota(s), or ``None`` to exempt it
(sync or async)."""

CostFunc = Callable[[Scope], int | Awaitable[int]]
"""A function of the ASGI scope returning the cost of a request (sync or async)."""

_CONVERTERS = {
    "str": "[^/]+",
    "int": "[0-9]+",
    "float": "[0-9]+(?:\\.[0-9]+)?",
    "uuid": "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
    "path": ".*",
}
_PARAM_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::([A-Za-z_]+))?\}")
# A literal prefix followed by one match-anything tail: "/api/*", "/{path:path}".
_PREFIX_RE = re.compile(r"([^{}*]*)(?:\*|\{[A-Za-z_][A-Za-z0-9_]*:path\})")


class PathPattern:
    """A compiled path template (see the module docstring for the syntax).

    Args:
        template: the template, starting with ``/``.

    Raises:
        ConfigurationError: for a template that does not start with ``/``, unbalanced
            braces, a bad parameter name or an unknown converter.
    """

    __slots__ = ("literal", "prefix", "regex", "template")

    def __init__(self, template: str) -> None:
        if not isinstance(template, str) or not template.startswith("/"):
            raise ConfigurationError(
                f"path {template!r} must be a string starting with '/', e.g. '/users/{{id}}'"
            )
        parts: list[str] = []
        pos = 0
        dynamic = False
        for match in _PARAM_RE.finditer(template):
            parts.append(_literal(template[pos : match.start()], template))
            converter = match[2] or "str"
            if converter not in _CONVERTERS:
                known = ", ".join(_CONVERTERS)
                raise ConfigurationError(
                    f"unknown converter {converter!r} in path {template!r}; use one of {known}"
                )
            parts.append(f"(?:{_CONVERTERS[converter]})")
            pos = match.end()
            dynamic = True
        parts.append(_literal(template[pos:], template))
        dynamic = dynamic or "*" in template
        self.template = template
        self.literal: str | None = None if dynamic else template
        self.regex: re.Pattern[str] | None = (
            re.compile("".join(parts), re.DOTALL) if dynamic else None
        )
        # Templates that are a literal prefix and a match-anything tail need no regex:
        # ``path.startswith(prefix)`` is the same test.
        prefix = _PREFIX_RE.fullmatch(template)
        self.prefix: str | None = None if prefix is None else prefix[1]

    def matches(self, path: str) -> bool:
        """Whether ``path`` matches the whole template."""
        if self.regex is None:
            return path == self.literal
        if self.prefix is not None:
            return path.startswith(self.prefix)
        return self.regex.fullmatch(path) is not None

    def __repr__(self) -> str:
        return f"PathPattern({self.template!r})"


def _literal(text: str, template: str) -> str:
    if "{" in text or "}" in text:
        raise ConfigurationError(
            f"unbalanced or invalid braces in path {template!r}; parameters look like "
            "'{name}' or '{name:int}'"
        )
    return ".*".join(re.escape(piece) for piece in text.split("*"))


def parse_quotas(spec: object, where: str) -> tuple[Quota, ...]:
    """``spec`` (a :data:`QuotaSpec`) as a tuple of quotas with distinct policy names.

    Raises:
        ConfigurationError: naming ``where``, for anything else.
    """
    items: Iterable[object]
    items = (spec,) if isinstance(spec, Quota | str) else spec  # type: ignore[assignment]
    if not isinstance(items, Sequence) or not items:
        raise ConfigurationError(
            f"{where} must be a Quota, a string like '100/minute', or a non-empty list of them"
        )
    quotas = tuple(Quota.parse(q) for q in items)
    policies = [q.policy for q in quotas]
    if len(set(policies)) != len(policies):
        raise ConfigurationError(
            f"{where} has two quotas with the same policy name {policies}; give them "
            "distinct names with Quota(..., name=...)"
        )
    return quotas


def capacity_for(quota: Quota, algorithm: str) -> int:
    """The largest cost one request can ever spend under ``quota`` with ``algorithm``."""
    return quota.capacity if algorithm == "gcra" else quota.limit


class Rule:
    """Which requests a quota applies to, and how much they cost.

    Args:
        path: a route template such as ``"/users/{id}"`` or ``"/api/chat/*"`` (see the
            module docstring); every path it matches shares one limit per key.
        methods: the HTTP methods the rule applies to (e.g. ``["POST"]``); ``None`` for all.
            A websocket handshake counts as ``GET``.
        quota: the quota(s) of every caller, e.g. ``"100/minute"`` or
            ``["10/second", "1000/day"]`` (all must admit the request); or a function of
            the scope (sync or async) returning them per request (e.g. the caller's plan,
            read from a token), or ``None`` to exempt the request from this rule. Each
            quota returned keeps its own state (keyed by its policy name) and headers. A
            function returning anything else raises a ``TypeError`` (a ``ConfigurationError``
            for an unparsable quota string) naming the rule: the request fails (a 500),
            it is not let through.
        tiers: instead of ``quota``, quotas per tier, e.g.
            ``{"free": "10/minute", "pro": "100/minute"}``; the middleware's ``tier``
            function picks one per request.
        key: who is limited, a function of the scope (sync or async, see
            :mod:`fineflow.keys`); ``None`` uses the middleware's ``key``. A key of ``None``
            exempts the request from this rule.
        cost: how much a request costs: an int (default 1; 0 only reports) or a function
            of the scope returning one (sync or async).
        name: the stable name that keys the rule's state and names its policies in
            headers; by default derived from ``methods`` and ``path``. Renaming a rule
            starts its counts afresh.

    Raises:
        ConfigurationError: for a bad path, both or neither of ``quota`` and ``tiers``, an
            invalid quota, a negative cost, or a fixed cost that can never fit a quota.
    """

    __slots__ = (
        "cost",
        "key",
        "methods",
        "name",
        "path",
        "pattern",
        "quota_fn",
        "quotas",
        "tiers",
    )

    path: str
    methods: frozenset[str] | None
    quotas: tuple[Quota, ...]
    quota_fn: QuotaFunc | None
    tiers: Mapping[str, tuple[Quota, ...]]
    key: Callable[[Scope], Any] | None
    cost: int | CostFunc
    name: str
    pattern: PathPattern

    def __init__(
        self,
        path: str,
        methods: Iterable[str] | str | None = None,
        *,
        quota: QuotaSpec | QuotaFunc | None = None,
        tiers: Mapping[str, QuotaSpec] | None = None,
        key: Callable[[Scope], Any] | None = None,
        cost: int | CostFunc = 1,
        name: str | None = None,
    ) -> None:
        pattern = PathPattern(path)
        methods_set: frozenset[str] | None = None
        if methods is not None:
            if isinstance(methods, str):
                methods = [methods]
            methods_set = frozenset(str(m).upper() for m in methods)
            if not methods_set:
                raise ConfigurationError("methods must be None (all) or a non-empty list")
        if (quota is None) == (tiers is None):
            raise ConfigurationError(
                f"Rule {path!r}: give exactly one of quota='100/minute' or "
                "tiers={'free': '10/minute', 'pro': '100/minute'}"
            )
        quotas: tuple[Quota, ...] = ()
        tier_map: dict[str, tuple[Quota, ...]] = {}
        quota_fn: QuotaFunc | None = None
        if callable(quota) and not isinstance(quota, Quota):
            quota_fn = quota
        elif quota is not None:
            quotas = parse_quotas(quota, f"Rule {path!r} quota")
        else:
            if not isinstance(tiers, Mapping) or not tiers:
                raise ConfigurationError(f"Rule {path!r}: tiers must be a non-empty mapping")
            for tier, spec in tiers.items():
                if not isinstance(tier, str) or not tier:
                    raise ConfigurationError(f"Rule {path!r}: tier names must be strings")
                tier_map[tier] = parse_quotas(spec, f"Rule {path!r} tier {tier!r}")
        if key is not None and not callable(key):
            raise ConfigurationError(f"Rule {path!r}: key must be a callable of the scope")
        if isinstance(cost, bool) or not (isinstance(cost, int) or callable(cost)):
            raise ConfigurationError(f"Rule {path!r}: cost must be an int or a callable")
        if isinstance(cost, int):
            if cost < 0:
                raise ConfigurationError(f"Rule {path!r}: cost must be >= 0, got {cost}")
            for q in quotas + tuple(q for qs in tier_map.values() for q in qs):
                if cost > max(q.capacity, q.limit):
                    raise ConfigurationError(
                        f"Rule {path!r}: cost {cost} can never fit quota {q} "
                        f"(at most {max(q.capacity, q.limit)} at once); lower the cost or "
                        "raise the quota's limit or burst"
                    )
        if name is None:
            name = path if methods_set is None else f"{','.join(sorted(methods_set))} {path}"
        elif not isinstance(name, str) or not name:
            raise ConfigurationError(f"Rule {path!r}: name must be a non-empty string")
        setattr_ = object.__setattr__
        setattr_(self, "path", path)
        setattr_(self, "methods", methods_set)
        setattr_(self, "quotas", quotas)
        setattr_(self, "quota_fn", quota_fn)
        setattr_(self, "tiers", MappingProxyType(tier_map))
        setattr_(self, "key", key)
        setattr_(self, "cost", cost)
        setattr_(self, "name", name)
        setattr_(self, "pattern", pattern)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Rule is immutable; create a new one")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Rule is immutable; create a new one")

    def __repr__(self) -> str:
        spec = (
            f"quota={self.quota_fn!r}"
            if self.quota_fn is not None
            else f"quota={[str(q) for q in self.quotas]}"
            if self.quotas
            else f"tiers={ {t: [str(q) for q in qs] for t, qs in self.tiers.items()} }"
        )
        return f"Rule({self.path!r}, name={self.name!r}, {spec})"

    def matches(self, method: str, path: str) -> bool:
        """Whether a request with ``method`` and (decoded) ``path`` falls under this rule."""
        if self.methods is not None and method not in self.methods:
            return False
        return self.pattern.matches(path)

    def check(self, algorithm: str, default_tier: str | None) -> None:
        """Validate this rule against a middleware's algorithm and default tier.

        Raises:
            ConfigurationError: if the fixed cost exceeds what ``algorithm`` can ever admit
                for some quota, or ``default_tier`` is not one of the rule's tiers.
        """
        if isinstance(self.cost, int):
            for q in self.all_quotas():
                if self.cost > capacity_for(q, algorithm):
                    raise ConfigurationError(
                        f"Rule {self.name!r}: cost {self.cost} can never fit quota {q} with "
                        f"algorithm {algorithm!r} (at most {capacity_for(q, algorithm)})"
                    )
        if self.tiers and default_tier is not None and default_tier not in self.tiers:
            raise ConfigurationError(
                f"Rule {self.name!r} has no quota for default_tier {default_tier!r}; add it "
                f"to tiers={list(self.tiers)} or pick one of those as default_tier"
            )

    def all_quotas(self) -> tuple[Quota, ...]:
        """Every quota of the rule, across tiers (none for a quota function)."""
        return self.quotas + tuple(q for qs in self.tiers.values() for q in qs)
