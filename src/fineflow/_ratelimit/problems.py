"""The rate limiter's early responses: 429 quota exceeded and the fail-closed 503.

``429`` uses the quota-exceeded problem type registered by
draft-ietf-httpapi-ratelimit-headers, with its ``violated-policies`` member; ``503`` (the
rate-limit store is down and the policy is to deny) uses ``about:blank``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .._asgi.problem import ProblemResponse, retry_after_header
from .headers import AppliedPolicy

__all__ = ["QUOTA_EXCEEDED", "quota_exceeded", "storage_unavailable"]

QUOTA_EXCEEDED = "https://iana.org/assignments/http-problem-types#quota-exceeded"

_429_HEAD = b'{"type":"' + QUOTA_EXCEEDED.encode() + b'","title":"Too Many Requests","status":429,'
_503_BODY = (
    b'{"type":"about:blank","title":"Service Unavailable","status":503,'
    b'"detail":"The rate-limit store is unavailable; try again later."}'
)


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
    names = b"[" + b",".join([a.json_name for a in violated]) + b"]"
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
