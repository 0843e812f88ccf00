"""Rate-limit response headers, rendered from decisions.

Styles:

``"ietf"`` (default)
    draft-ietf-httpapi-ratelimit-headers-10: ``RateLimit-Policy: "name";q=100;w=60`` and
    ``RateLimit: "name";r=42;t=17``, Structured Field lists with one item per applied quota.
``"legacy"``
    ``RateLimit-Limit``, ``RateLimit-Remaining``, ``RateLimit-Reset`` (earlier drafts) of the
    most restrictive applied quota.
``"x"``
    ``X-RateLimit-Limit``, ``X-RateLimit-Remaining``, ``X-RateLimit-Reset`` likewise; the
    reset is in seconds from now (not an epoch timestamp).
``None``
    no rate-limit headers.

``Retry-After`` (integer seconds, rounded up) goes on denials only, whatever the style.
Everything that does not depend on the decision is encoded once, at configuration time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Literal

from .._asgi.problem import retry_after_header
from .._errors import ConfigurationError
from .algorithms import Decision
from .quota import Quota

__all__ = [
    "HEADER_STYLES",
    "MAX_CACHED_RATES",
    "RATELIMIT",
    "AppliedPolicy",
    "HeaderStyle",
    "render_headers",
    "retry_after_header",
    "sf_string",
    "validate_style",
]

HeaderStyle = Literal["ietf", "legacy", "x"]
HEADER_STYLES: tuple[HeaderStyle | None, ...] = ("ietf", "legacy", "x", None)

RATELIMIT = b"ratelimit"
RATELIMIT_POLICY = b"ratelimit-policy"
_LEGACY = (b"ratelimit-limit", b"ratelimit-remaining", b"ratelimit-reset")
_X = (b"x-ratelimit-limit", b"x-ratelimit-remaining", b"x-ratelimit-reset")


def validate_style(style: object) -> HeaderStyle | None:
    """Return ``style`` if it is a known header style, else raise ``ConfigurationError``."""
    if style not in HEADER_STYLES:
        raise ConfigurationError(f"headers must be 'ietf', 'legacy', 'x' or None, got {style!r}")
    return style


def sf_string(text: str) -> bytes:
    """``text`` as a Structured Field sf-string (RFC 9651 §3.3.3), quoted and escaped.

    Characters an sf-string cannot hold (controls, non-ASCII) become ``?``.
    """
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            out.append("?")
    return ('"' + "".join(out) + '"').encode("ascii")


def _ceil(seconds: float) -> int:
    return max(math.ceil(seconds), 0)


# Rendered RateLimit headers kept per policy (see AppliedPolicy.ietf_headers); cleared when
# full, so a wide spread of remaining counts (many keys, large quotas) cannot grow it unbounded.
MAX_CACHED_RATES = 1024

_Pair = tuple[bytes, bytes]


class AppliedPolicy:
    """The pre-encoded header pieces of one quota of one rule.

    Args:
        name: the policy name shown to clients (the rule's name, sanitized).
        quota: the quota.

    Attributes:
        rendered: the IETF header pairs this policy rendered alone, by remaining count:
            ``remaining -> (reset seconds, pairs)`` (at most ``MAX_CACHED_RATES``).
    """

    __slots__ = (
        "json_name",
        "name",
        "policy_header",
        "policy_item",
        "quota",
        "rate_template",
        "rendered",
    )

    def __init__(self, name: str, quota: Quota) -> None:
        encoded = sf_string(name)
        self.name = name
        self.quota = quota
        self.policy_item = b"%s;q=%d;w=%d" % (encoded, quota.limit, _ceil(quota.period))
        self.policy_header = (RATELIMIT_POLICY, self.policy_item)  # when it applies alone
        self.rate_template = encoded.replace(b"%", b"%%") + b";r=%d;t=%d"
        self.json_name = json.dumps(name).encode("utf-8")
        self.rendered: dict[int, tuple[int, tuple[_Pair, _Pair]]] = {}

    def rate_item(self, decision: Decision) -> bytes:
        """This policy's item of the ``RateLimit`` header for ``decision``."""
        return self.rate_template % (decision.remaining, _ceil(decision.reset_after))

    def ietf_headers(self, decision: Decision) -> tuple[_Pair, _Pair]:
        """``RateLimit-Policy`` and ``RateLimit`` when this policy applies alone.

        Rendering costs more than a lookup, and the remaining count repeats a lot: the
        pairs are kept by remaining count (and checked against the reset).
        """
        # (Decisions never carry a negative reset_after: ceil alone is _ceil here.)
        remaining, reset = decision.remaining, math.ceil(decision.reset_after)
        cached = self.rendered.get(remaining)
        if cached is not None:
            cached_reset, pairs = cached
            if cached_reset == reset:
                return pairs
        pairs = (self.policy_header, (RATELIMIT, self.rate_item(decision)))
        if len(self.rendered) >= MAX_CACHED_RATES:
            self.rendered.clear()
        self.rendered[remaining] = (reset, pairs)
        return pairs

    def __repr__(self) -> str:
        return f"AppliedPolicy({self.name!r}, {self.quota})"


def render_headers(
    style: HeaderStyle,
    applied: Sequence[AppliedPolicy],
    decisions: Sequence[Decision],
) -> Sequence[_Pair]:
    """The rate-limit headers for one request's decisions (one per applied policy).

    Args:
        style: ``"ietf"``, ``"legacy"`` or ``"x"``.
        applied: the policies applied to the request, in the order of ``decisions``.
        decisions: the decisions, one per applied policy.

    Returns:
        ``(name, value)`` header pairs, names lower-case bytes.
    """
    if style == "ietf":
        if len(applied) == 1:
            return applied[0].ietf_headers(decisions[0])
        policies = b", ".join(a.policy_item for a in applied)
        rates = b", ".join(a.rate_item(d) for a, d in zip(applied, decisions, strict=True))
        return [(RATELIMIT_POLICY, policies), (RATELIMIT, rates)]
    # One set of numbers only: report the quota closest to refusing the next request.
    worst = min(decisions, key=lambda d: (d.remaining, -d.reset_after))
    names = _LEGACY if style == "legacy" else _X
    return [
        (names[0], b"%d" % worst.limit),
        (names[1], b"%d" % worst.remaining),
        (names[2], b"%d" % _ceil(worst.reset_after)),
    ]
