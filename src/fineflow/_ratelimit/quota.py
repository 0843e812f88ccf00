"""Quotas: how much a caller may do in how long, parsed from strings like ``"100/minute"``."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .._errors import ConfigurationError

__all__ = ["Quota"]

_UNITS: dict[str, float] = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "minutes": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "hours": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
    "days": 86400.0,
}

_FORMS = (
    'accepted forms: "100/minute", "10/second", "1000/day", "5/30s", "2/1.5h", '
    '"100/minute;burst=20" (units: s, m, h, d or second, minute, hour, day)'
)
_QUOTA_RE = re.compile(
    r"^\s*(?P<limit>\d+)\s*(?:/|\s+per\s+)\s*(?P<count>\d+(?:\.\d+)?)?\s*(?P<unit>[a-z]+)\s*"
    r"(?:;\s*burst\s*=\s*(?P<burst>\d+)\s*)?$",
    re.IGNORECASE,
)
# Large enough for any real quota, small enough that limit * cost stays exact in a float.
_MAX_LIMIT = 10**12
_MAX_PERIOD = 10.0 * 366 * 86400


@dataclass(frozen=True, slots=True)
class Quota:
    """``limit`` units of cost per ``period`` seconds, with up to ``burst`` at once.

    Args:
        limit: how much cost the quota admits per period (a positive integer).
        period: the period in seconds (positive, at most ten years).
        burst: how much cost a fresh key may spend back to back; ``None`` means ``limit``.
            Only the ``gcra`` algorithm uses it; the window algorithms admit ``limit``.
        name: a stable policy name for headers and storage keys; by default derived from
            the numbers, e.g. ``"100-per-60s"``.

    Derived attributes (computed once): ``capacity`` (``burst`` or ``limit``),
    ``period_ns``, ``emission_interval_ns`` (GCRA's T, whole nanoseconds), ``tolerance_ns``
    (``capacity * emission_interval_ns``, GCRA's tau) and ``policy``
    (``name`` or the derived name).

    Raises:
        ConfigurationError: for a non-positive or absurd limit, period or burst.
    """

    limit: int
    period: float
    burst: int | None = None
    name: str | None = None
    # Derived once here, read on every decision.
    capacity: int = field(init=False, repr=False, compare=False)
    period_ns: int = field(init=False, repr=False, compare=False)
    emission_interval_ns: int = field(init=False, repr=False, compare=False)
    tolerance_ns: int = field(init=False, repr=False, compare=False)
    policy: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.limit, bool) or not isinstance(self.limit, int):
            raise ConfigurationError(f"Quota limit must be an int, got {self.limit!r}; {_FORMS}")
        if not 1 <= self.limit <= _MAX_LIMIT:
            raise ConfigurationError(f"Quota limit must be 1..{_MAX_LIMIT}, got {self.limit}")
        if isinstance(self.period, bool) or not isinstance(self.period, int | float):
            raise ConfigurationError(f"Quota period must be seconds, got {self.period!r}")
        if not (math.isfinite(self.period) and 0 < self.period <= _MAX_PERIOD):
            raise ConfigurationError(
                f"Quota period must be > 0 and <= {_MAX_PERIOD:.0f} seconds, got {self.period}"
            )
        object.__setattr__(self, "period", float(self.period))
        if self.burst is not None and (
            isinstance(self.burst, bool)
            or not isinstance(self.burst, int)
            or not 1 <= self.burst <= _MAX_LIMIT
        ):
            raise ConfigurationError(f"Quota burst must be an int 1..{_MAX_LIMIT} or None")
        capacity = self.limit if self.burst is None else self.burst
        period_ns = round(self.period * 1e9)
        object.__setattr__(self, "capacity", capacity)
        object.__setattr__(self, "period_ns", period_ns)
        object.__setattr__(self, "emission_interval_ns", period_ns // self.limit)
        object.__setattr__(self, "tolerance_ns", capacity * (period_ns // self.limit))
        if self.capacity * self.period / self.limit > _MAX_PERIOD:
            raise ConfigurationError(
                f"Quota burst {self.burst} makes a tolerance over ten years; lower it"
            )
        if self.period_ns // self.limit < 1:
            raise ConfigurationError(
                f"Quota {self.limit}/{self.period:g}s is faster than one per nanosecond"
            )
        if self.name is not None and (not isinstance(self.name, str) or not self.name):
            raise ConfigurationError("Quota name must be a non-empty string or None")
        if self.name is not None:
            policy = self.name
        else:
            suffix = "" if self.burst is None else f"-b{self.burst}"
            policy = f"{self.limit}-per-{self.period:g}s{suffix}"
        object.__setattr__(self, "policy", policy)

    @classmethod
    def parse(cls, text: str | Quota, *, name: str | None = None) -> Quota:
        """Parse ``"<limit>/<period>[;burst=<n>]"``, e.g. ``"100/minute"`` or ``"5/30s"``.

        Raises:
            ConfigurationError: if the text is not one of the accepted forms.
        """
        if isinstance(text, Quota):
            return text
        if not isinstance(text, str):
            raise ConfigurationError(f"cannot parse quota {text!r}; {_FORMS}")
        match = _QUOTA_RE.match(text) if len(text) <= 200 else None
        if match is None:
            raise ConfigurationError(f"invalid quota {text[:80]!r}; {_FORMS}")
        unit = match["unit"].lower()
        if unit not in _UNITS:
            raise ConfigurationError(f"unknown time unit {unit!r} in quota {text!r}; {_FORMS}")
        count = float(match["count"]) if match["count"] else 1.0
        burst = int(match["burst"]) if match["burst"] else None
        return cls(int(match["limit"]), count * _UNITS[unit], burst, name)

    @property
    def emission_interval(self) -> float:
        """GCRA's T: seconds per unit of cost at the sustained rate."""
        return self.period / self.limit

    def __str__(self) -> str:
        burst = "" if self.burst is None else f";burst={self.burst}"
        return f"{self.limit}/{self.period:g}s{burst}"
