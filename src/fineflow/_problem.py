"""Early responses as tiny ASGI apps: RFC 9457 ``application/problem+json`` denials.

``429`` uses the quota-exceeded problem type registered by
draft-ietf-httpapi-ratelimit-headers, with its ``violated-policies`` member; ``503`` (the
rate-limit store is down and the policy is to deny) uses ``about:blank``. For websocket
scopes the same response goes out through the websocket denial-response extension when the
server offers it, else the handshake is refused with close code 1008 (policy violation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ._asgitypes import Receive, Scope, Send
from ._headers import AppliedPolicy, retry_after_header

__all__ = [
    "QUOTA_EXCEEDED",
    "WS_POLICY_VIOLATION",
    "ProblemResponse",
    "quota_exceeded",
    "storage_unavailable",
]

QUOTA_EXCEEDED = "https://iana.org/assignments/http-problem-types#quota-exceeded"
WS_POLICY_VIOLATION = 1008

_CONTENT_TYPE = (b"content-type", b"application/problem+json")
_CACHE = (b"cache-control", b"no-store")
_429_HEAD = b'{"type":"' + QUOTA_EXCEEDED.encode() + b'","title":"Too Many Requests","status":429,'
_503_BODY = (
    b'{"type":"about:blank","title":"Service Unavailable","status":503,'
    b'"detail":"The rate-limit store is unavailable; try again later."}'
)


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


def quota_exceeded(
    violated: Sequence[AppliedPolicy],
    retry_after: float | None,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> ProblemResponse:
    """The ``429 Too Many Requests`` response for the ``violated`` policies.

    Args:
        violated: the policies that denied the request.
        retry_after: seconds until the request would fit, ``None`` if it never can.
        headers: rate-limit headers to send along (``Retry-After`` is added here).

    Returns:
        An ASGI app sending the response.
    """
    names = b"[" + b",".join(a.json_name for a in violated) + b"]"
    if retry_after is None:
        detail = b"This request costs more than the quota can ever admit."
        extra = list(headers)
    else:
        seconds = max(math.ceil(retry_after), 1)
        detail = b"Quota exceeded; retry in %d second%s." % (seconds, b"" if seconds == 1 else b"s")
        extra = [*headers, retry_after_header(retry_after)]
    body = _429_HEAD + b'"detail":"' + detail + b'","violated-policies":' + names + b"}"
    return ProblemResponse(429, body, extra, "rate limit exceeded")


def storage_unavailable(retry_after: float | None) -> ProblemResponse:
    """The ``503 Service Unavailable`` response for a fail-closed storage outage."""
    headers = [retry_after_header(retry_after if retry_after is not None else 1.0)]
    return ProblemResponse(503, _503_BODY, headers, "rate limiting unavailable")
