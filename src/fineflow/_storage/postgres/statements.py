"""How one batch of requests becomes one statement, and its rows become decisions.

Four functions decide (``sql/functions/``): ``hit()`` a lone single-quota GCRA request,
``hit_keys()`` a batch of single-quota GCRA requests that share endpoint, quota, tier and
cost, ``hit_many()`` any batch of single-quota GCRA requests, ``decide()`` everything
(several quotas per request, every algorithm). The three GCRA ones return, per row, the
TAT after the batch, how many of its requests were admitted and the time they were decided
at; :func:`gcra_decisions` turns that into each request's decision. :class:`Decider` picks
the most specific function that applies.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, NamedTuple

import psycopg
from psycopg import sql

from ..._errors import ConfigurationError
from ..._ratelimit.algorithms import COST_TOO_HIGH, NS, Decision
from ..._ratelimit.quota import Quota
from ..base import Hit, storage_key
from ..coalescing import Request

__all__ = [
    "FAST_PATHS",
    "Decider",
    "Statements",
    "gcra_decisions",
    "make_decision",
    "text_array",
    "tier_text",
]

# The specialised statements, each a faster form of decide() for its case.
FAST_PATHS = frozenset({"hit", "hit_keys", "hit_many"})
_TIER_MAX = 64


class Statements(NamedTuple):
    """The decision statements, composed once for one schema."""

    hit: sql.Composed
    hit_keys: sql.Composed
    hit_many: sql.Composed
    decide: sql.Composed
    peek: sql.Composed

    @classmethod
    def compose(cls, schema: str) -> Statements:
        ident = sql.Identifier(schema)
        # %b: arrays go in binary, which skips the text format's quoting and escaping.
        return cls(
            hit=sql.SQL(
                "SELECT * FROM {}.hit(%(key)s, %(endpoint)s, %(policy)s, %(tier)s, "
                "%(lim)s::bigint, %(period)s::bigint, %(cap)s::bigint, %(cost)s::bigint, "
                "%(iv)s::bigint, %(now)s::bigint)"
            ).format(ident),
            # The keys go as one array literal (see text_array()).
            hit_keys=sql.SQL(
                "SELECT * FROM {}.hit_keys(%s::bigint, %s::text[], %b::bigint[], %s, %s, %s, "
                "%s::bigint, %s::bigint, %s::bigint, %s::bigint)"
            ).format(ident),
            hit_many=sql.SQL(
                "SELECT * FROM {}.hit_many(%s::bigint, %b::text[], %b::text[], %b::text[], "
                "%b::text[], %b::bigint[], %b::bigint[], %b::bigint[], %b::bigint[], "
                "%b::bigint[])"
            ).format(ident),
            decide=sql.SQL(
                "SELECT * FROM {}.decide(%s, %b::bigint[], %b::int[], %b::text[], %b::text[], "
                "%b::text[], %b::text[], %b::bigint[], %b::bigint[], %b::bigint[], %b::bigint[])"
            ).format(ident),
            peek=sql.SQL(
                "SELECT * FROM {}.peek(%(key)s::text[], %(endpoint)s::text[], %(policy)s::text[])"
            ).format(ident),
        )


def check_fast_paths(fast_paths: Collection[str]) -> frozenset[str]:
    """``fast_paths`` as a set, if every name in it is one of :data:`FAST_PATHS`."""
    if isinstance(fast_paths, str) or not set(fast_paths) <= FAST_PATHS:
        known = ", ".join(repr(name) for name in sorted(FAST_PATHS))
        raise ConfigurationError(f"fast_paths must be a collection of {known}, got {fast_paths!r}")
    return frozenset(fast_paths)


class Decider:
    """Decides one batch with one statement, the most specific one that applies.

    Attributes:
        fast_paths: the specialised statements it may use (see :data:`FAST_PATHS`);
            ``decide()`` takes every batch they do not.
    """

    def __init__(self, schema: str, fast_paths: Collection[str] = FAST_PATHS) -> None:
        self.statements = Statements.compose(schema)
        self.fast_paths = check_fast_paths(fast_paths)

    async def run(self, cur: psycopg.AsyncCursor[Any], algorithm: str, batch: list[Request]) -> str:
        """Decide ``batch`` with ``cur``, set each request's ``result``; return the name of
        the function that decided it."""
        fast = self.fast_paths
        if algorithm == "gcra" and fast and all(len(r.hits) == 1 for r in batch):
            if "hit" in fast and len(batch) == 1:
                await _run_hit(cur, self.statements, batch[0])
                return "hit"
            keyed = by_key(batch) if "hit_keys" in fast else None
            if keyed is not None:
                await _run_keys(cur, self.statements, batch, keyed)
                return "hit_keys"
            rows = by_row(batch) if "hit_many" in fast else None
            if rows is not None:
                await _run_rows(cur, self.statements, batch[0].now, rows)
                return "hit_many"
        await _run_decide(cur, self.statements, algorithm, batch)
        return "decide"


def tier_text(tier: str) -> str:
    return storage_key(tier)[:_TIER_MAX]


def text_array(items: Sequence[str]) -> str:
    """``items`` as a PostgreSQL array literal, every element double-quoted.

    One string join instead of psycopg's array dumper, which adapts element by element in
    Python (about 20 µs for 32 keys, against 2 µs). Inside double quotes only ``"`` and
    ``\\`` are special; storage keys never hold NUL."""
    if not items:
        return "{}"
    plain = "".join(items)  # (the joined body holds the separators' quotes)
    if '"' in plain or "\\" in plain:
        items = [i.replace("\\", "\\\\").replace('"', '\\"') for i in items]
    return '{"' + '","'.join(items) + '"}'


def make_decision(
    ok: bool, quota: Quota, remaining: int, reset_ns: int, retry_ns: int | None
) -> Decision:
    """A decision from figures in nanoseconds (clamped at 0, as the reference does)."""
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


def gcra_decisions(
    quota: Quota, cost: int, requests: int, tat: int, admitted: int, now: int
) -> list[Decision]:
    """The decisions of ``requests`` requests of ``cost`` on one GCRA row, in arrival order.

    The first ``admitted`` were admitted, ``tat`` is the row's TAT after them and ``now`` the
    time they were decided at (what hit(), hit_keys() and hit_many() return). Request k
    applied :func:`~fineflow._ratelimit.algorithms.gcra_step` to the TAT the ones before it
    left; ``cost`` is at most ``capacity + 1`` (more never fits either)."""
    interval = quota.emission_interval_ns
    tau = quota.tolerance_ns
    if admitted == requests == 1:  # the usual case: one request on the row, admitted
        return [_admitted(quota, tau, interval, tat, now)]
    step = cost * interval
    start = tat - admitted * step if admitted else max(tat, now)
    out = [_admitted(quota, tau, interval, start + k * step, now) for k in range(1, admitted + 1)]
    if admitted < requests:
        end = start + admitted * step
        retry = None if cost > quota.capacity else end + step - tau - now
        denied = make_decision(False, quota, (now + tau - end) // interval, end - now, retry)
        out.extend([denied] * (requests - admitted))
    return out


def _admitted(quota: Quota, tau: int, interval: int, new_tat: int, now: int) -> Decision:
    # remaining and reset are >= 0 by construction, as in gcra_step(); _make skips the
    # NamedTuple's Python-level __new__ (this runs once per admitted request)
    remaining = (now + tau - new_tat) // interval
    reset = (new_tat - now) / NS
    return Decision._make(
        (True, quota.limit, remaining, reset, 0.0, quota.policy, quota.period, None)
    )


def _hand_out(requests: list[Request], decisions: list[Decision]) -> None:
    """Each request of one row gets its decision, in arrival order."""
    if len(requests) == 1:
        requests[0].result = decisions  # (the list of its one decision)
        return
    for request, decision in zip(requests, decisions, strict=True):
        request.result = [decision]


def _clamped_cost(hit: Hit) -> int:
    return min(hit.cost, hit.quota.capacity + 1)


async def _run_hit(cur: psycopg.AsyncCursor[Any], statements: Statements, request: Request) -> None:
    """A lone single-quota GCRA request: ``hit()``."""
    hit = request.hits[0]
    quota = hit.quota
    cost = _clamped_cost(hit)
    params = {
        "key": storage_key(hit.key),
        "endpoint": storage_key(hit.endpoint),
        "policy": quota.policy,
        "tier": tier_text(hit.tier),
        "lim": quota.limit,
        "period": quota.period_ns,
        "cap": quota.capacity,
        "cost": cost,
        "iv": quota.emission_interval_ns,
        "now": request.now,
    }
    await cur.execute(statements.hit, params, prepare=True)
    row = await cur.fetchone()
    if row is None:  # pragma: no cover - an upsert always returns its row
        raise psycopg.DataError("hit() returned no row")
    ok, tat, now = row
    request.result = gcra_decisions(quota, cost, 1, tat, 1 if ok else 0, now)


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


async def _run_keys(
    cur: psycopg.AsyncCursor[Any],
    statements: Statements,
    batch: list[Request],
    groups: dict[str, list[Request]],
) -> None:
    """Requests grouped by :func:`by_key`: ``hit_keys()``, the shared figures as scalars."""
    first = batch[0]
    hit = first.hits[0]
    quota = hit.quota
    cost = _clamped_cost(hit)
    counts = None if len(groups) == len(batch) else [len(g) for g in groups.values()]
    params = (
        first.now,
        text_array(list(groups)),
        counts,
        storage_key(hit.endpoint),
        quota.policy,
        tier_text(hit.tier),
        quota.limit,
        quota.period_ns,
        quota.capacity,
        cost,
    )
    # Binary results: int8 columns load without parsing digits.
    await cur.execute(statements.hit_keys, params, prepare=True, binary=True)
    for key, tat, admitted, now in await cur.fetchall():
        requests = groups[key]
        _hand_out(requests, gcra_decisions(quota, cost, len(requests), tat, admitted, now))


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


async def _run_rows(
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
        costs.append(_clamped_cost(hit))
        counts.append(len(requests))
    await cur.execute(statements.hit_many, [now, *cols], prepare=True)
    for key, endpoint, policy, tat, admitted, db_now in await cur.fetchall():
        requests = groups[(key, endpoint, policy)]
        hit = requests[0].hits[0]
        cost = _clamped_cost(hit)
        _hand_out(requests, gcra_decisions(hit.quota, cost, len(requests), tat, admitted, db_now))


async def _run_decide(
    cur: psycopg.AsyncCursor[Any],
    statements: Statements,
    algorithm: str,
    batch: list[Request],
) -> None:
    """Any batch (several quotas per request, any algorithm): ``decide()``, which returns
    every figure of every decision."""
    cols: list[list[Any]] = [[] for _ in range(10)]
    now_col, req_col, key_col, ep_col, pol_col, tier_col, lim_col, per_col, cap_col, cost_col = cols
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
    rows = iter(await cur.fetchall())
    for request in batch:
        request.result = [
            make_decision(ok, hit.quota, remaining, reset_ns, retry_ns)
            # (not strict: ``rows`` runs on into the next request's hits)
            for hit, (ok, remaining, reset_ns, retry_ns, _now) in zip(
                request.hits, rows, strict=False
            )
        ]
