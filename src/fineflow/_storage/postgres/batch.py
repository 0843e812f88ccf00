"""How one batch of requests becomes one statement, and its rows become decisions.

``PostgresStorage`` decides which runner a batch takes; each runner sends exactly one
statement with the cursor it is given and sets ``result`` on every request it decides.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import psycopg
from psycopg import sql

from ..._ratelimit.algorithms import COST_TOO_HIGH, NS, Decision
from ..._ratelimit.quota import Quota
from ..base import Hit, storage_key

__all__ = [
    "Request",
    "Statements",
    "by_key",
    "by_row",
    "make_decision",
    "run_batch",
    "run_keys",
    "run_rows",
    "run_single",
    "text_array",
    "tier_text",
]

_TIER_MAX = 64
_new_decision = tuple.__new__  # builds a Decision without NamedTuple's Python-level __new__


@dataclass(slots=True)
class Request:
    """One caller's request waiting for its decisions."""

    hits: Sequence[Hit]
    now: int | None
    algorithm: str
    future: asyncio.Future[None]
    result: list[Decision] = field(default_factory=list)


class Statements(NamedTuple):
    """The decision statements, composed once for one schema."""

    single: sql.Composed
    decide: sql.Composed
    hit_many: sql.Composed
    hit_keys: sql.Composed

    @classmethod
    def compose(cls, schema: str) -> Statements:
        ident = sql.Identifier(schema)
        # %b: arrays go in binary, which skips the text format's quoting and escaping.
        return cls(
            single=sql.SQL(
                "SELECT * FROM {}.hit(%(key)s, %(endpoint)s, %(policy)s, %(tier)s, "
                "%(lim)s::bigint, %(period)s::bigint, %(cap)s::bigint, %(cost)s::bigint, "
                "%(iv)s::bigint, %(now)s::bigint)"
            ).format(ident),
            decide=sql.SQL(
                "SELECT * FROM {}.decide(%s, %b::bigint[], %b::int[], %b::text[], %b::text[], "
                "%b::text[], %b::text[], %b::bigint[], %b::bigint[], %b::bigint[], %b::bigint[])"
            ).format(ident),
            hit_many=sql.SQL(
                "SELECT * FROM {}.hit_many(%s::bigint, %b::text[], %b::text[], %b::text[], "
                "%b::text[], %b::bigint[], %b::bigint[], %b::bigint[], %b::bigint[], "
                "%b::bigint[])"
            ).format(ident),
            # The keys go as one array literal (see text_array()).
            hit_keys=sql.SQL(
                "SELECT * FROM {}.hit_keys(%s::bigint, %s::text[], %b::bigint[], %s, %s, %s, "
                "%s::bigint, %s::bigint, %s::bigint, %s::bigint)"
            ).format(ident),
        )


def tier_text(tier: str) -> str:
    return storage_key(tier)[:_TIER_MAX]


def text_array(items: Sequence[str]) -> str:
    """``items`` as a PostgreSQL array literal, every element double-quoted.

    One string join instead of psycopg's array dumper, which adapts element by element in
    Python (about 20 µs for 32 keys, against 2 µs). Inside double quotes only ``"`` and
    ``\\`` are special; storage keys never hold NUL."""
    if not items:
        return "{}"
    body = '","'.join(items)
    if '"' in body or "\\" in body:
        body = '","'.join(i.replace("\\", "\\\\").replace('"', '\\"') for i in items)
    return '{"' + body + '"}'


def make_decision(
    ok: bool, quota: Quota, remaining: int, reset_ns: int, retry_ns: int | None
) -> Decision:
    return Decision(
        ok,
        quota.limit,
        max(int(remaining), 0),
        max(int(reset_ns), 0) / NS,
        None if retry_ns is None else max(int(retry_ns), 0) / NS,
        quota.policy,
        quota.period,
        COST_TOO_HIGH if (retry_ns is None and not ok) else None,
    )


async def run_single(
    cur: psycopg.AsyncCursor[Any], statements: Statements, request: Request
) -> None:
    """A lone single-quota GCRA request: ``hit()``."""
    hit = request.hits[0]
    quota = hit.quota
    interval = quota.emission_interval_ns
    cap = quota.capacity
    cost = min(hit.cost, cap + 1)
    params = {
        "key": storage_key(hit.key),
        "endpoint": storage_key(hit.endpoint),
        "policy": quota.policy,
        "tier": tier_text(hit.tier),
        "lim": quota.limit,
        "period": quota.period_ns,
        "cap": cap,
        "cost": cost,
        "iv": interval,
        "now": request.now,
    }
    await cur.execute(statements.single, params, prepare=True)
    row = await cur.fetchone()
    assert row is not None
    ok, tat, now = row
    tau = quota.tolerance_ns
    if ok:
        request.result = [make_decision(True, quota, (now + tau - tat) // interval, tat - now, 0)]
        return
    tat = max(tat, now)
    retry = None if cost > cap else tat + cost * interval - tau - now
    request.result = [make_decision(False, quota, (now + tau - tat) // interval, tat - now, retry)]


def by_key(batch: list[Request]) -> dict[str, list[Request]] | None:
    """Group single-quota GCRA requests per key if they all share time, endpoint, quota,
    tier and cost (``hit_keys()`` applies), else ``None``."""
    first = batch[0]
    now = first.now
    _, quota, cost, endpoint, tier = first.hits[0]
    groups: dict[str, list[Request]] = {}
    for request in batch:
        hit = request.hits[0]
        if (
            request.now != now
            or hit.cost != cost
            or hit.endpoint != endpoint
            or hit.tier != tier
            or (hit.quota is not quota and hit.quota != quota)
        ):
            return None
        key = storage_key(hit.key)
        group = groups.get(key)
        if group is None:
            groups[key] = [request]
        else:
            group.append(request)
    return groups


async def run_keys(
    cur: psycopg.AsyncCursor[Any],
    statements: Statements,
    batch: list[Request],
    groups: dict[str, list[Request]],
) -> None:
    """Requests grouped by :func:`by_key`: ``hit_keys()``, the shared figures as scalars."""
    first = batch[0]
    _, quota, cost, endpoint, tier = first.hits[0]
    cap = quota.capacity
    cost = min(cost, cap + 1)
    counts = None if len(groups) == len(batch) else [len(g) for g in groups.values()]
    params = (
        first.now,
        text_array(list(groups)),
        counts,
        storage_key(endpoint),
        quota.policy,
        tier_text(tier),
        quota.limit,
        quota.period_ns,
        cap,
        cost,
    )
    # Binary results: int8 columns load without parsing digits.
    await cur.execute(statements.hit_keys, params, prepare=True, binary=True)
    rows = await cur.fetchall()
    interval = quota.emission_interval_ns
    step = cost * interval
    tau = quota.tolerance_ns
    limit, policy, period = quota.limit, quota.policy, quota.period
    too_high = cost > cap
    reason = COST_TOO_HIGH if too_high else None

    def admit(now: int, new_tat: int) -> list[Decision]:
        return [
            _new_decision(
                Decision,
                (
                    True,
                    limit,
                    (now + tau - new_tat) // interval,
                    (new_tat - now) / NS,
                    0.0,
                    policy,
                    period,
                    None,
                ),
            )
        ]

    for key, tat, admitted, now in rows:
        requests = groups[key]
        if admitted == 1 and len(requests) == 1:
            # The usual case (one request on the key, admitted): tat is its new TAT.
            requests[0].result = admit(now, tat)
            continue
        # tat is the row's TAT after this batch; tat0 the one it started from.
        tat0 = tat - admitted * step if admitted else max(tat, now)
        for k, request in enumerate(requests, start=1):
            if k <= admitted:
                request.result = admit(now, tat0 + k * step)
                continue
            end = tat0 + admitted * step
            request.result = [
                Decision(
                    False,
                    limit,
                    max((now + tau - end) // interval, 0),
                    max(end - now, 0) / NS,
                    None if too_high else max(end + step - tau - now, 0) / NS,
                    policy,
                    period,
                    reason,
                )
            ]


def by_row(batch: list[Request]) -> dict[tuple[str, str, str], list[Request]] | None:
    """Group single-quota GCRA requests per row, or ``None`` if the closed form does not
    apply (different explicit times, or different costs on one row)."""
    now = batch[0].now
    groups: dict[tuple[str, str, str], list[Request]] = {}
    for request in batch:
        hit = request.hits[0]
        if request.now != now:
            return None
        slot = (storage_key(hit.key), storage_key(hit.endpoint), hit.quota.policy)
        group = groups.get(slot)
        if group is None:
            groups[slot] = [request]
        elif group[0].hits[0].cost != hit.cost or group[0].hits[0].quota != hit.quota:
            return None
        else:
            group.append(request)
    return groups


async def run_rows(
    cur: psycopg.AsyncCursor[Any],
    statements: Statements,
    now: int | None,
    groups: dict[tuple[str, str, str], list[Request]],
) -> None:
    """Requests grouped by :func:`by_row`: ``hit_many()``, every figure per row."""
    cols: list[list[Any]] = [[] for _ in range(9)]
    keys, eps, pols, tiers, lims, pers, caps, costs, counts = cols
    for (key, endpoint, policy), requests in groups.items():
        hit = requests[0].hits[0]
        quota = hit.quota
        keys.append(key)
        eps.append(endpoint)
        pols.append(policy)
        tiers.append(tier_text(hit.tier))
        lims.append(quota.limit)
        pers.append(quota.period_ns)
        caps.append(quota.capacity)
        costs.append(min(hit.cost, quota.capacity + 1))
        counts.append(len(requests))
    await cur.execute(statements.hit_many, [now, *cols], prepare=True)
    rows = await cur.fetchall()
    for key, endpoint, policy, tat, admitted, db_now in rows:
        requests = groups[(key, endpoint, policy)]
        hit = requests[0].hits[0]
        quota = hit.quota
        interval = quota.emission_interval_ns
        cost = min(hit.cost, quota.capacity + 1)
        step = cost * interval
        tau = quota.tolerance_ns
        tat0 = tat - admitted * step if admitted else max(tat, db_now)
        for k, request in enumerate(requests, start=1):
            if k <= admitted:
                new_tat = tat0 + k * step
                request.result = [
                    make_decision(
                        True, quota, (db_now + tau - new_tat) // interval, new_tat - db_now, 0
                    )
                ]
                continue
            end = tat0 + admitted * step
            retry = None if cost > quota.capacity else end + step - tau - db_now
            request.result = [
                make_decision(False, quota, (db_now + tau - end) // interval, end - db_now, retry)
            ]


async def run_batch(
    cur: psycopg.AsyncCursor[Any],
    statements: Statements,
    algorithm: str,
    batch: list[Request],
) -> None:
    """Any batch (several quotas per request, any algorithm): ``decide()``."""
    cols: list[list[Any]] = [[] for _ in range(10)]
    (
        now_col,
        req_col,
        key_col,
        ep_col,
        pol_col,
        tier_col,
        lim_col,
        per_col,
        cap_col,
        cost_col,
    ) = cols
    for index, request in enumerate(batch):
        for hit in request.hits:
            quota = hit.quota
            cap = quota.capacity if algorithm == "gcra" else quota.limit
            now_col.append(request.now)
            req_col.append(index)
            key_col.append(storage_key(hit.key))
            ep_col.append(storage_key(hit.endpoint))
            pol_col.append(quota.policy)
            tier_col.append(tier_text(hit.tier))
            lim_col.append(quota.limit)
            per_col.append(quota.period_ns)
            cap_col.append(quota.capacity)
            cost_col.append(min(hit.cost, cap + 1))
    await cur.execute(statements.decide, [algorithm, *cols], prepare=True)
    rows = await cur.fetchall()
    position = 0
    for request in batch:
        out = []
        for hit in request.hits:
            ok, remaining, reset_ns, retry_ns, _now = rows[position]
            position += 1
            out.append(make_decision(ok, hit.quota, remaining, reset_ns, retry_ns))
        request.result = out
