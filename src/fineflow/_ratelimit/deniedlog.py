"""DeniedLog: a log of denied requests that cannot flood.

A service under attack, or a client in a retry loop, may be denied thousands of times a
second; one log record each would bury everything else. :class:`DeniedLog` writes at most
``max_records`` records per rule per ``interval`` seconds, counts what it leaves out, and
says so in one summary record (``"suppressed M"``) when the next interval starts, that is
with the next denial after it. Records carry the key's digest, never the key.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from .._asgi.types import Scope
from .._errors import ConfigurationError
from .._logfields import MAX_TEXT, log_extra, redact
from .._storage.base import Hit
from .headers import AppliedPolicy
from .limiter import Decisions

__all__ = ["DeniedLog"]

logger = logging.getLogger("fineflow.middleware")

_MAX_RULES = 1000  # windows kept; the oldest goes (with its summary) beyond this


class _Window:
    """One rule's allowance: records written and left out since ``start``."""

    __slots__ = ("logged", "start", "suppressed")

    def __init__(self, start: float) -> None:
        self.start = start
        self.logged = 0
        self.suppressed = 0


class DeniedLog:
    """Log denied requests, at most ``max_records`` per rule every ``interval`` seconds.

    Pass it as ``RateLimitMiddleware(..., log_denied=DeniedLog(...))`` (``log_denied=True``
    takes the defaults). Each record is written on the ``fineflow.middleware`` logger with
    the message ``denied GET /path by rule 'name' ...`` and the ``extra`` fields ``event``
    (``"ratelimit_denied"``, or ``"ratelimit_shadow_denied"`` in shadow mode), ``rule``,
    ``tier``, ``policy``, ``key_digest``, ``method``, ``path`` and, for a denial by
    ``on_storage_error="deny"``, ``reason``. Past the allowance, records are counted, not
    written; the next denial of that rule after the interval first writes one
    ``"ratelimit_denied_suppressed"`` record with the count in ``count``.

    Args:
        max_records: records per rule per interval (default 10).
        interval: seconds (default 60).
        level: the records' level (default ``logging.INFO``).
        clock: monotonic seconds (default ``time.monotonic``); tests inject a fake one.

    Raises:
        ConfigurationError: for a count below 1, an interval not above 0, a bad level.
    """

    def __init__(
        self,
        *,
        max_records: int = 10,
        interval: float = 60.0,
        level: int = logging.INFO,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(max_records, bool) or not isinstance(max_records, int) or max_records < 1:
            raise ConfigurationError(f"max_records must be an int >= 1, got {max_records!r}")
        if isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0:
            raise ConfigurationError(f"interval must be seconds > 0, got {interval!r}")
        if isinstance(level, bool) or not isinstance(level, int):
            raise ConfigurationError(f"level must be a logging level (logging.INFO), got {level!r}")
        self.max_records = max_records
        self.interval = float(interval)
        self.level = level
        self.clock = clock
        self._windows: dict[str, _Window] = {}

    def record(
        self,
        scope: Scope,
        hits: Sequence[Hit],
        applied: Sequence[AppliedPolicy],
        decisions: Decisions,
        *,
        shadow: bool,
    ) -> None:
        """Log one denied request (if its rule's allowance has room) or count it."""
        i = next(i for i, d in enumerate(decisions) if not d.allowed)
        hit, decision = hits[i], decisions[i]
        if not self._admit(hit.endpoint):
            return
        keys = {h.key for h in hits}
        method = "GET" if scope["type"] == "websocket" else str(scope.get("method") or "GET")
        method = method[:MAX_TEXT]
        path = redact(str(scope.get("path") or "/"), keys)
        violated = [applied[j].name for j, d in enumerate(decisions) if not d.allowed]
        extra = log_extra(
            "ratelimit_shadow_denied" if shadow else "ratelimit_denied",
            key=hit.key,
            rule=hit.endpoint,
            tier=hit.tier,
            policy=decision.policy,
            method=method,
            path=path,
            reason=decision.reason,
        )
        logger.log(
            self.level,
            "%s %s %s by rule %r (policies %s, tier %r, key digest %s)",
            "shadow mode: would deny" if shadow else "denied",
            method,
            path,
            hit.endpoint,
            violated,
            hit.tier,
            extra["key_digest"],
            extra=extra,
        )

    def _admit(self, rule: str) -> bool:
        """Whether a record of ``rule`` may be written now (writing the summary of the
        interval that ended first)."""
        now = self.clock()
        window = self._windows.get(rule)
        if window is None or now - window.start >= self.interval:
            if window is not None:
                self._summarise(rule, window)
            elif len(self._windows) >= _MAX_RULES:
                oldest = next(iter(self._windows))
                self._summarise(oldest, self._windows.pop(oldest))
            window = self._windows[rule] = _Window(now)
        if window.logged < self.max_records:
            window.logged += 1
            return True
        window.suppressed += 1
        return False

    def _summarise(self, rule: str, window: _Window) -> None:
        if window.suppressed:
            logger.log(
                self.level,
                "suppressed %d denied-request records of rule %r (more than %d in %gs)",
                window.suppressed,
                rule,
                self.max_records,
                self.interval,
                extra=log_extra("ratelimit_denied_suppressed", rule=rule, count=window.suppressed),
            )


def denied_log_of(option: bool | DeniedLog, *, shadow: bool = False) -> DeniedLog | None:
    """The denied-request log a ``log_denied=`` option asks for: the one given, one with the
    defaults for ``True`` (and in shadow mode, whose would-be denials are always logged),
    else none.

    Raises:
        ConfigurationError: ``option`` is neither a bool nor a :class:`DeniedLog`.
    """
    if isinstance(option, DeniedLog):
        return option
    if not isinstance(option, bool):
        raise ConfigurationError("log_denied must be True, False or a fineflow.DeniedLog")
    return DeniedLog() if option or shadow else None
