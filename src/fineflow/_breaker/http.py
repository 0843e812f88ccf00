"""HTTP helpers shared by the breaker's adapters: ``Retry-After`` parsing and 429 detection."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping
from typing import Any

__all__ = ["DEFAULT_HOLD", "http_throttle", "parse_retry_after"]

#: Seconds to hold when a 429 carries no usable ``Retry-After``.
DEFAULT_HOLD = 1.0


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Parse a ``Retry-After`` header: delay-seconds or an HTTP-date.

    Args:
        value: the header value, or ``None``.
        now: the current Unix time for HTTP-dates (default ``time.time()``).

    Returns:
        Seconds to wait (never negative), or ``None`` when absent or unparsable.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)


def http_throttle(obj: object) -> float | None:
    """Tell whether a result or exception is an HTTP 429, and for how long to back off.

    Works by duck typing on the shapes of aiohttp, httpx and Starlette objects: a ``status``
    or ``status_code`` of 429 (on the object or on its ``response``), with ``Retry-After``
    taken from its ``headers``. An object with a numeric ``retry_after`` attribute and a 429
    status uses that instead. Pass it as ``CircuitBreaker(throttle=http_throttle)``.

    Returns:
        ``None`` when not throttled, else the seconds to wait (``DEFAULT_HOLD`` if unknown).
    """
    target: Any = obj
    status = getattr(target, "status", None) or getattr(target, "status_code", None)
    if status != 429:
        target = getattr(obj, "response", None)
        if target is None:
            return None
        status = getattr(target, "status", None) or getattr(target, "status_code", None)
        if status != 429:
            return None
    explicit = getattr(target, "retry_after", None)
    if isinstance(explicit, int | float) and not isinstance(explicit, bool):
        return max(float(explicit), 0.0)
    headers = getattr(target, "headers", None)
    if isinstance(headers, Mapping):
        seconds = parse_retry_after(headers.get("retry-after") or headers.get("Retry-After"))
        if seconds is not None:
            return seconds
    return DEFAULT_HOLD
