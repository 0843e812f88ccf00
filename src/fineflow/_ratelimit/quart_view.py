"""The ``limit`` decorator on a Quart view.

Quart calls a view with its path parameters only (``view(**view_args)``) and keeps the
request (or websocket) in a context, so the ASGI scope comes from there. A denial is a Quart
``Response`` carrying the problem+json body and headers (for a websocket view, Quart sends it
as the handshake's denial response); an admitted view's return value goes through
``make_response`` and gets the rate-limit headers, its body untouched (streams stay streams).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, cast

from quart import Response, has_websocket_context, make_response, request, websocket
from quart.globals import request_ctx, websocket_ctx
from quart.typing import ResponseTypes

from .._asgi.problem import ProblemResponse
from .._asgi.types import Scope
from .appdefault import app_default
from .route import DefaultGate, RouteLimit

__all__ = ["limited_view"]


async def limited_view(
    route: RouteLimit, name: str, view: Callable[..., Awaitable[Any]], view_args: dict[str, Any]
) -> Any:
    """Decide the current Quart request under ``route``, then run ``view(**view_args)``
    or answer the denial. The decisions are in ``request.scope["state"]["fineflow_route"]``."""
    scope = cast(Scope, (websocket if has_websocket_context() else request).scope)
    outcome = await route.decide(scope, name, default=_app_default)
    if outcome is None:
        return await view(**view_args)
    scope.setdefault("state", {})["fineflow_route"] = outcome.decisions
    if outcome.denial is not None:
        return _quart_response(outcome.denial)
    result = await view(**view_args)
    if not outcome.headers:
        return result
    response = await make_response(result)
    _add_headers(response, outcome.headers)
    return response


def _app_default() -> DefaultGate:
    # The app serving this request (the context's, not the ``current_app`` proxy: the
    # default storage is kept per app object).
    context = websocket_ctx if has_websocket_context() else request_ctx
    return app_default(context.app)


def _quart_response(problem: ProblemResponse) -> Response:
    response = Response(problem.body, problem.status, content_type="application/problem+json")
    # (Quart sets the content type and length itself.)
    skip = (b"content-type", b"content-length")
    _add_headers(response, [(n, v) for n, v in problem.headers if n not in skip])
    return response


def _add_headers(response: ResponseTypes, headers: Iterable[tuple[bytes, bytes]]) -> None:
    for name, value in headers:
        response.headers.add(name.decode("latin-1"), value.decode("latin-1"))
