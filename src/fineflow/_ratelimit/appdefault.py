"""Each app's default rate-limit storage, and ``install(app)``, which closes it with the app.

A route limit (the FastAPI dependency, the ``limit`` decorator) with neither ``limiter=`` nor
a ``RateLimitMiddleware`` around it decides over the default storage
(``FINEFLOW_STORAGE_URL`` / ``FINEFLOW_DSN``). There is one per app, so every limited route
of an app shares one storage (one pool), opened on first use. ``install(app)`` closes it when
the app's lifespan ends; without it, the first use warns once per app that nothing will.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from .._asgi.types import ASGIApp, Receive, Scope, Send
from .._errors import ConfigurationError
from .._logfields import log_extra
from .route import DefaultGate

__all__ = ["OWNER_SCOPE_KEY", "app_default", "app_of", "install"]

#: Where ``install`` marks each request with its app (see ``app_of``).
OWNER_SCOPE_KEY = "fineflow.app"

logger = logging.getLogger("fineflow.middleware")

_DEFAULTS: weakref.WeakKeyDictionary[Any, DefaultGate] = weakref.WeakKeyDictionary()
_INSTALLED: weakref.WeakSet[Any] = weakref.WeakSet()
_WARNED: weakref.WeakSet[Any] = weakref.WeakSet()


def install(app: Any) -> None:
    """Close ``app``'s default rate-limit storage when the app stops (one line, at setup; a
    second call does nothing).

    The storage serves the ``@ff.limit`` endpoints (and ``fineflow.fastapi.RateLimit``
    dependencies) that have neither ``limiter=`` nor a ``RateLimitMiddleware`` around them:
    one per app, from ``FINEFLOW_STORAGE_URL`` / ``FINEFLOW_DSN``, opened on first use.
    ``install`` closes it when the app's lifespan ends (Starlette, FastAPI: after the app's
    own shutdown) or after it stops serving (Quart's ``after_serving``). On Starlette and
    FastAPI, the limits of apps mounted in ``app`` use ``app``'s default storage too (their
    own lifespans never run); call it before the app starts (it adds a middleware).

    Raises:
        ConfigurationError: ``app`` is neither a Starlette (or FastAPI) nor a Quart app, or
            a Starlette app has started already.
    """
    if app in _INSTALLED:
        return
    router = getattr(app, "router", None)
    if router is not None and hasattr(router, "lifespan_context"):  # Starlette, FastAPI
        if getattr(app, "middleware_stack", None) is not None:
            raise ConfigurationError(
                "install(app) must be called before the app starts (at setup, next to "
                "creating it): it adds a middleware, which Starlette refuses afterwards"
            )
        defaults = _DEFAULTS.setdefault(app, DefaultGate())
        app.add_middleware(_MarkOwner, owner=app)
        inner = router.lifespan_context

        @asynccontextmanager
        async def lifespan(served: Any) -> AsyncIterator[Any]:
            try:
                async with inner(served) as state:
                    yield state
            finally:
                await defaults.aclose()

        router.lifespan_context = lifespan
    elif callable(getattr(app, "after_serving", None)):  # Quart
        app.after_serving(_DEFAULTS.setdefault(app, DefaultGate()).aclose)
    else:
        raise ConfigurationError(
            f"install(app) closes the default storage with a Starlette, FastAPI or Quart app; "
            f"got {type(app).__name__}. For another app, give the limits a limiter "
            "(limiter=RateLimiter(storage)) over a storage you open and close yourself"
        )
    _INSTALLED.add(app)


def app_default(app: Any, *, install_hint: str = "fineflow.install(app)") -> DefaultGate:
    """``app``'s default gate; for an app ``install`` did not set up, made on its first
    use, with a warning (once per app) that nothing closes its storage with the app."""
    defaults = _DEFAULTS.get(app)
    if defaults is None:
        defaults = _DEFAULTS[app] = DefaultGate()
    if app not in _INSTALLED and app not in _WARNED:
        _WARNED.add(app)
        logger.warning(
            "%s was not called: the default rate-limit storage (FINEFLOW_STORAGE_URL / "
            "FINEFLOW_DSN) is opened for this app and not closed with it; call %s at setup "
            "to close it",
            install_hint,
            install_hint,
            extra=log_extra("ratelimit_default_storage_unmanaged"),
        )
    return defaults


def app_of(scope: Scope) -> Any:
    """The app whose default storage decides a request: the outermost app ``install`` set
    up (so the limits of a mounted sub-app use its parent's), else Starlette's
    ``scope["app"]`` (``None`` when there is none)."""
    return scope.get(OWNER_SCOPE_KEY) or scope.get("app")


class _MarkOwner:
    """Marks each request with the installed app (outermost wins): a mounted sub-app's
    ``scope["app"]`` is the sub-app, whose lifespan never runs."""

    def __init__(self, app: ASGIApp, owner: Any) -> None:
        self.app = app
        self.owner = owner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope.setdefault(OWNER_SCOPE_KEY, self.owner)
        await self.app(scope, receive, send)
