"""fineflow: pure ASGI middleware for distributed rate limiting and circuit breaking.

Rate limiting keeps its state in PostgreSQL by default, so every instance of a service
shares one limit; circuit breakers guard routes of your app and outbound calls.
"""

import importlib as _importlib
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
from ._health import health_app
from ._ratelimit.algorithms import Algorithm, BucketState, Decision
from ._ratelimit.appdefault import install
from ._ratelimit.decorator import limit
from ._ratelimit.deniedlog import DeniedLog
from ._ratelimit.headers import HeaderStyle
from ._ratelimit.limiter import Decisions, LimiterMetrics, RateLimiter
from ._ratelimit.middleware import MiddlewareMetrics, RateLimitMiddleware
from ._ratelimit.quota import Quota
from ._ratelimit.rules import Rule
from ._storage.base import (
    Hit,
    KeyStatus,
    LocalStorage,
    StatsPoint,
    StatsRow,
    Storage,
    StorageHealth,
    SupportsHealth,
)
from ._storage.memory import MemoryStorage
from ._storage.url import storage_from_url

if _typing.TYPE_CHECKING:
    from ._storage.postgres.migrations import MigrationResult
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
    "DeniedLog",
    "FineflowError",
    "HeaderStyle",
    "Hit",
    "KeyStatus",
    "LimiterMetrics",
    "LocalStorage",
    "MemoryStorage",
    "MiddlewareMetrics",
    "MigrationResult",
    "Permit",
    "PostgresStorage",
    "Quota",
    "RateLimitMiddleware",
    "RateLimiter",
    "RedisStorage",
    "Rule",
    "SchemaVersionError",
    "StatsPoint",
    "StatsRow",
    "Storage",
    "StorageClosedError",
    "StorageError",
    "StorageHealth",
    "SupportsHealth",
    "__version__",
    "default_registry",
    "get_circuit_breaker",
    "health_app",
    "http_throttle",
    "install",
    "keys",
    "limit",
    "storage_from_url",
]


# Names whose modules bring in a driver (psycopg is about half of ``import fineflow``'s time,
# redis-py is an extra): imported when first asked for, so apps on memory storage and the
# breakers never pay for them.
_LAZY = {
    "MigrationResult": "._storage.postgres.migrations",
    "PostgresStorage": "._storage.postgres.storage",
    "RedisStorage": "._storage.redis.storage",
}

if not _typing.TYPE_CHECKING:  # (type checkers see the imports above, and flag typos)

    def __getattr__(name: str) -> object:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(_importlib.import_module(module, __name__), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted({*__all__, *(n for n in globals() if n.startswith("__"))})
