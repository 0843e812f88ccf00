"""The values a breaker hands out: ``BreakerResult`` and the hand-settled ``Permit``.

Both live with what makes them (``Permit`` in ``breaker``, ``BreakerResult`` in ``result``);
this module is where ``fineflow`` imports them from.
"""

from __future__ import annotations

from .breaker import Permit
from .result import BreakerResult

__all__ = ["BreakerResult", "Permit"]
