"""fineflow: pure ASGI middleware for distributed rate limiting and circuit breaking.

Rate limiting keeps its state in PostgreSQL by default, so every instance of a service
shares one limit; circuit breakers guard routes of your app and outbound calls.
"""

import typing as _typing

from . import keys
from ._breaker.breaker import CircuitBreaker, Permit
from ._breaker.config import BreakerConfig, BreakerMetrics, CircuitState
from ._breaker.events import BreakerEvent
from ._breaker.http import http_throttle
from ._breaker.middleware import CircuitBreakerMiddleware
from ._breaker.registry import BreakerRegistry, default_registry, get_circuit_breaker
from ._breaker.result import BreakerResult
from ._errors import (
    CircuitOpenError,
    ConfigurationError,
    FineflowError,
    SchemaVersionError,
    StorageClosedError,
    StorageError,
)
from ._ratelimit.algorithms import Algorithm, BucketState, Decision
from ._ratelimit.headers import HeaderStyle
from ._ratelimit.limiter import Decisions, LimiterMetrics, RateLimiter
from ._ratelimit.middleware import MiddlewareMetrics, RateLimitMiddleware
from ._ratelimit.quota import Quota
from ._ratelimit.rules import Rule
from ._storage.base import Hit, KeyStatus, LocalStorage, StatsRow, Storage
from ._storage.memory import MemoryStorage
from ._storage.url import storage_from_url

if _typing.TYPE_CHECKING:
    from ._storage.postgres.storage import PostgresStorage
    from ._storage.redis.storage import RedisStorage

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
    "LocalStorage",
    "MemoryStorage",
    "MiddlewareMetrics",
    "Permit",
    "PostgresStorage",
    "Quota",
    "RateLimitMiddleware",
    "RateLimiter",
    "RedisStorage",
    "Rule",
    "SchemaVersionError",
    "StatsRow",
    "Storage",
    "StorageClosedError",
    "StorageError",
    "__version__",
    "default_registry",
    "get_circuit_breaker",
    "http_throttle",
    "keys",
    "storage_from_url",
]


if not _typing.TYPE_CHECKING:  # (type checkers see the import above, and flag typos)

    def __getattr__(name: str) -> object:
        # PostgresStorage brings in psycopg, about half of ``import fineflow``'s time: it is
        # imported when first asked for, so memory storage and breakers never pay for it.
        if name == "PostgresStorage":
            from ._storage.postgres.storage import PostgresStorage

            globals()[name] = PostgresStorage
            return PostgresStorage
        if name == "RedisStorage":  # (fineflow[redis]: the same, for redis-py)
            from ._storage.redis.storage import RedisStorage

            globals()[name] = RedisStorage
            return RedisStorage
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*__all__, *(n for n in globals() if n.startswith("__"))})
