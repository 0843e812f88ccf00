"""fineflow: pure ASGI middleware for distributed rate limiting and circuit breaking.

Rate limiting keeps its state in PostgreSQL by default, so every instance of a service
shares one limit; circuit breakers guard routes of your app and outbound calls.
"""

import typing as _typing

from . import keys
from ._algorithms import Algorithm, BucketState, Decision
from ._breaker import CircuitBreaker
from ._breaker_config import BreakerConfig, BreakerMetrics, CircuitState
from ._breaker_events import BreakerEvent
from ._breaker_http import http_throttle
from ._breaker_middleware import CircuitBreakerMiddleware
from ._breaker_permit import BreakerResult, Permit
from ._errors import (
    CircuitOpenError,
    ConfigurationError,
    FineflowError,
    SchemaVersionError,
    StorageClosedError,
    StorageError,
)
from ._headers import HeaderStyle
from ._limiter import Decisions, LimiterMetrics, RateLimiter
from ._memory import MemoryStorage
from ._middleware import MiddlewareMetrics, RateLimitMiddleware
from ._quota import Quota
from ._registry import BreakerRegistry
from ._rules import Rule
from ._storage import Hit, KeyStatus, StatsRow, Storage

if _typing.TYPE_CHECKING:
    from ._postgres import PostgresStorage

__version__ = "0.1.0"

__all__ = [
    "Algorithm",
    "BreakerConfig",
    "BreakerEvent",
    "BreakerMetrics",
    "BreakerRegistry",
    "BreakerResult",
    "BucketState",
    "CircuitBreaker",
    "CircuitBreakerMiddleware",
    "CircuitOpenError",
    "CircuitState",
    "ConfigurationError",
    "Decision",
    "Decisions",
    "FineflowError",
    "HeaderStyle",
    "Hit",
    "KeyStatus",
    "LimiterMetrics",
    "MemoryStorage",
    "MiddlewareMetrics",
    "Permit",
    "PostgresStorage",
    "Quota",
    "RateLimitMiddleware",
    "RateLimiter",
    "Rule",
    "SchemaVersionError",
    "StatsRow",
    "Storage",
    "StorageClosedError",
    "StorageError",
    "__version__",
    "http_throttle",
    "keys",
]


if not _typing.TYPE_CHECKING:  # (type checkers see the import above, and flag typos)

    def __getattr__(name: str) -> object:
        # PostgresStorage brings in psycopg, about half of ``import fineflow``'s time: it is
        # imported when first asked for, so memory storage and breakers never pay for it.
        if name == "PostgresStorage":
            from ._postgres import PostgresStorage

            globals()[name] = PostgresStorage
            return PostgresStorage
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*__all__, *(n for n in globals() if n.startswith("__"))})
