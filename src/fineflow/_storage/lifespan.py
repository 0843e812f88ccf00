"""Opening and closing a storage a middleware owns, around the ASGI lifespan protocol.

The storage opens (and migrates) when the server sends ``lifespan.startup``, before the
app's own startup runs, and closes after the app reports its shutdown. When the server runs
no lifespan, the first request opens it, exactly once. A storage that fails to open does not
stop the app: requests are decided by the limiter's ``on_storage_error`` policy while the
opening is retried at most once a second. A schema newer than the code does stop startup.
"""

from __future__ import annotations

import logging
import time

import anyio

from .._asgi.types import ASGIApp, Message, Receive, Scope, Send
from .._errors import SchemaVersionError, StorageError
from .._logfields import error_text, log_extra
from .base import Storage

__all__ = ["OwnedStorage"]

logger = logging.getLogger("fineflow.middleware")

OPEN_RETRY = 1.0  # seconds between attempts to open a storage that failed to open
_OPEN_ERRORS = (StorageError, OSError, TimeoutError)


class OwnedStorage:
    """The open/close life of one storage owned by a middleware.

    Args:
        storage: the storage.
        migrate: run ``storage.migrate()`` right after opening it.
    """

    __slots__ = ("_lock", "_retry_at", "migrate", "opened", "storage")

    def __init__(self, storage: Storage, *, migrate: bool = True) -> None:
        self.storage = storage
        self.migrate = migrate
        self.opened = False
        self._retry_at = 0.0
        self._lock: anyio.Lock | None = None

    async def _open(self) -> None:
        await self.storage.open()
        if self.migrate:
            await self.storage.migrate()
        self.opened = True

    async def ensure_open(self) -> None:
        """Open the storage if no lifespan did (once; after a failure, once a second)."""
        if self._lock is None:
            self._lock = anyio.Lock()  # loop-bound, so created on first use
        async with self._lock:
            if self.opened or time.monotonic() < self._retry_at:
                return
            try:
                await self._open()
            except SchemaVersionError:
                raise
            except _OPEN_ERRORS as exc:
                self._retry_at = time.monotonic() + OPEN_RETRY
                _log_open_failure(self.storage, exc, at_startup=False)

    async def lifespan(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        """Run ``app``'s lifespan, opening the storage on startup and closing it on shutdown."""

        async def receive_opening() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup" and not self.opened:
                try:
                    await self._open()
                except SchemaVersionError:
                    raise
                except _OPEN_ERRORS as exc:
                    _log_open_failure(self.storage, exc, at_startup=True)
            return message

        async def send_closing(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                try:
                    await self.storage.close()
                except (StorageError, OSError) as exc:
                    error = error_text(exc)
                    logger.warning(
                        "error closing the rate-limit storage: %s",
                        error,
                        extra=log_extra(
                            "storage_close_failed",
                            storage=type(self.storage).__name__,
                            error=error,
                        ),
                    )
            await send(message)

        await app(scope, receive_opening, send_closing)


def _log_open_failure(storage: Storage, exc: BaseException, *, at_startup: bool) -> None:
    error = error_text(exc)
    logger.log(
        logging.ERROR if at_startup else logging.WARNING,
        "could not open the rate-limit storage%s (%s); retrying on requests, which "
        "meanwhile follow on_storage_error",
        " at startup" if at_startup else "",
        error,
        extra=log_extra("storage_open_failed", storage=type(storage).__name__, error=error),
    )
