"""Floors: the least code that gives fineflow's answers, to show how far there is to go.

Neither is a product. :func:`bare_gcra` is GCRA's admitted-path arithmetic over a dict, with
none of what :class:`fineflow.RateLimiter` also does per decision (argument checks,
per-endpoint and per-policy isolation, status and metrics counters, bounded memory).
:class:`MinimalRateLimit` is a middleware with the contract of fineflow's single-rule path
(the peer address as key, one decision, ``scope["state"]["fineflow"]``, the two IETF
headers on the response) and nothing else: no rules, exemptions, 429 response or storage
failures.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from fineflow import Decision, Quota

from ._apps import ASGIApp, Message, Receive, Scope, Send

__all__ = ["MinimalRateLimit", "bare_gcra", "bare_gcra_hit"]

_new = tuple.__new__


def bare_gcra(quota: Quota) -> Callable[[str], Decision]:
    """A GCRA decision for ``quota`` over a dict of TATs (admitted path only, cost 1)."""
    tats: dict[str, int] = {}
    clock = time.time_ns
    interval = quota.emission_interval_ns
    tau = quota.tolerance_ns
    limit, policy, period = quota.limit, quota.policy, quota.period

    def decide(key: str) -> Decision:
        now = clock()
        ahead = tats.get(key, now) - now
        if ahead < 0:
            ahead = 0
        after = ahead + interval
        if after > tau:
            return _new(
                Decision,
                (False, limit, 0, ahead / 1e9, (after - tau) / 1e9, policy, period, None),
            )
        tats[key] = now + after
        return _new(
            Decision,
            (True, limit, (tau - after) // interval, after / 1e9, 0.0, policy, period, None),
        )

    return decide


async def bare_gcra_hit(decide: Callable[[str], Decision], key: str) -> Decision:
    """:func:`bare_gcra` behind one ``await``, as ``RateLimiter.hit`` is."""
    return decide(key)


class MinimalRateLimit:
    """The floor for a rate-limit middleware with fineflow's single-rule contract."""

    def __init__(self, app: ASGIApp, quota: str = "1000000/second") -> None:
        self.app = app
        q = Quota.parse(quota)
        self.decide = bare_gcra(q)
        self.policy = (b"ratelimit-policy", b'"default";q=%d;w=%d' % (q.limit, q.period))
        self.template = b'"default";r=%d;t=%d'

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        decision = self.decide(scope["client"][0])
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state["fineflow"] = decision
        policy = self.policy
        rate = (b"ratelimit", self.template % (decision[2], -(-decision[3] // 1)))

        def send_with_headers(message: Message) -> Awaitable[Any]:
            if message["type"] == "http.response.start":
                message = {**message}
                message["headers"] = [*message.get("headers", ()), policy, rate]
            return send(message)

        await self.app(scope, receive, send_with_headers)
