"""One timed health check, shared by the storages' ``health()`` methods."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import anyio

from .base import StorageHealth

__all__ = ["closed", "probe"]


def closed(backend: str) -> StorageHealth:
    """The health of a storage that is not open (never opened, or closed)."""
    return StorageHealth(False, backend, 0.0, "not open")


async def probe(
    backend: str,
    check: Callable[[], Awaitable[object]],
    timeout: float,  # noqa: ASYNC109 - the budget of this one check
    errors: tuple[type[BaseException], ...],
    describe: Callable[[BaseException], str],
) -> StorageHealth:
    """Await ``check()`` within ``timeout`` seconds: healthy if it returns, unhealthy with
    ``describe(exc)`` if it raises one of ``errors``, or with a timeout."""
    start = time.perf_counter()
    try:
        with anyio.fail_after(timeout):
            await check()
    except TimeoutError:
        error = f"no answer within {timeout:g}s"
    except errors as exc:
        error = describe(exc)
    else:
        return StorageHealth(True, backend, time.perf_counter() - start)
    return StorageHealth(False, backend, time.perf_counter() - start, error)
