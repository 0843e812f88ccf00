"""Early responses as tiny ASGI apps: RFC 9457 ``application/problem+json`` denials.

Both sides use them: rate limiting for 429 and its fail-closed 503, circuit breaking for the
open-circuit 503. For websocket scopes the response goes out through the websocket
denial-response extension when the server offers it, else the handshake is refused with a
close code (1008, policy violation, unless the caller picks another).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .types import Receive, Scope, Send

__all__ = ["WS_POLICY_VIOLATION", "ProblemResponse", "retry_after_header"]

WS_POLICY_VIOLATION = 1008

_CONTENT_TYPE = (b"content-type", b"application/problem+json")
_CACHE = (b"cache-control", b"no-store")


class ProblemResponse:
    """An ASGI app sending one fixed response (HTTP, or a websocket denial).

    Args:
        status: the HTTP status code.
        body: the encoded problem+json body.
        headers: extra headers (content type and length are added).
        reason: the close reason when a websocket handshake must be refused.
        close_code: the close code then (default 1008, policy violation).
    """

    __slots__ = ("body", "close_code", "headers", "reason", "status")

    def __init__(
        self,
        status: int,
        body: bytes,
        headers: Sequence[tuple[bytes, bytes]] = (),
        reason: str = "",
        close_code: int = WS_POLICY_VIOLATION,
    ) -> None:
        self.status = status
        self.body = body
        self.headers = [
            _CONTENT_TYPE,
            (b"content-length", b"%d" % len(body)),
            _CACHE,
            *headers,
        ]
        self.reason = reason
        self.close_code = close_code

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the response for ``scope`` (``http`` or ``websocket``)."""
        if scope["type"] == "websocket":
            if "websocket.http.response" not in (scope.get("extensions") or {}):
                await send(
                    {"type": "websocket.close", "code": self.close_code, "reason": self.reason}
                )
                return
            prefix = "websocket."
        else:
            prefix = ""
        await send(
            {"type": prefix + "http.response.start", "status": self.status, "headers": self.headers}
        )
        await send({"type": prefix + "http.response.body", "body": self.body})


def retry_after_header(seconds: float) -> tuple[bytes, bytes]:
    """``Retry-After`` for a wait of ``seconds``: whole seconds, rounded up, at least 1."""
    return (b"retry-after", b"%d" % max(math.ceil(seconds), 1))
