"""The SQL of the PostgreSQL storage: versioned migrations and the decision statements.

Every object lives in one schema (``{schema}``, composed with ``psycopg.sql.Identifier``).
The arithmetic repeats :mod:`fineflow._algorithms` exactly (integer nanoseconds), so the
storage and the reference model agree bit for bit; the differential tests check it.

Table ``buckets``: one row per (key, endpoint, policy). ``t`` is the GCRA TAT or the window
start, ``count``/``prev`` the window counters, ``expires`` the time from which the row is
equivalent to no row (cleanup deletes such rows). Only the primary key is indexed and the
fill factor leaves room, so decision updates stay HOT.
"""

from __future__ import annotations

from psycopg import sql

__all__ = ["COMPATIBLE_WITH", "GRANT_RUNTIME", "LATEST_VERSION", "MIGRATIONS", "render"]

# The database clock in integer nanoseconds since the epoch.
_NOW = "(extract(epoch from clock_timestamp()) * 1000000000)::bigint"

_CREATE_TABLE = """
CREATE {unlogged} TABLE IF NOT EXISTS {schema}.buckets (
    key       text    NOT NULL,
    endpoint  text    NOT NULL,
    policy    text    NOT NULL,
    algorithm text    NOT NULL,
    tier      text    NOT NULL DEFAULT '',
    t         bigint  NOT NULL DEFAULT 0,
    count     bigint  NOT NULL DEFAULT 0,
    prev      bigint  NOT NULL DEFAULT 0,
    expires   bigint  NOT NULL DEFAULT 0,
    lim       bigint  NOT NULL,
    period    bigint  NOT NULL,
    cap       bigint  NOT NULL,
    allowed   bigint  NOT NULL DEFAULT 0,
    denied    bigint  NOT NULL DEFAULT 0,
    last_ok   boolean NOT NULL DEFAULT true,
    seen      bigint  NOT NULL DEFAULT 0,
    PRIMARY KEY (key, endpoint, policy)
) WITH (fillfactor = 70)
"""

_STATS_VIEW = """
CREATE OR REPLACE VIEW {schema}.stats AS
SELECT endpoint, tier, count(*) AS keys, sum(allowed)::bigint AS allowed,
       sum(denied)::bigint AS denied
FROM {schema}.buckets
GROUP BY endpoint, tier
"""

# Decide a batch of requests. Hits arrive as parallel arrays, hits of one request
# contiguous (same p_req). Rows are locked (created if missing) in key order by one
# upsert, decided in memory in request order, and written back by one UPDATE.
_DECIDE_FUNCTION = """
CREATE OR REPLACE FUNCTION {schema}.decide(
    p_alg text, p_now bigint[], p_req int[], p_key text[], p_endpoint text[],
    p_policy text[], p_tier text[], p_lim bigint[], p_period bigint[], p_cap bigint[],
    p_cost bigint[]
) RETURNS TABLE (ok boolean, remaining bigint, reset_ns bigint, retry_ns bigint,
                 now_ns bigint)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    n int := coalesce(array_length(p_key, 1), 0);
    clock bigint := {now};
    slot int[];
    s_key text[]; s_ep text[]; s_pol text[]; s_alg text[];
    s_t bigint[]; s_count bigint[]; s_prev bigint[]; s_da bigint[]; s_dd bigint[];
    s_tier text[]; s_lim bigint[]; s_period bigint[]; s_cap bigint[]; s_ok boolean[];
    s_seen bigint[];
    o_ok boolean[]; o_rem bigint[]; o_reset bigint[]; o_retry bigint[]; o_now bigint[];
    n_t bigint[]; n_count bigint[]; n_prev bigint[];
    i int; j int; first int; last int; k int; all_ok boolean; req_ok boolean;
    now bigint; cost bigint; lim bigint; per bigint; cap bigint;
    st bigint; sc bigint; sp bigint;
    iv bigint; tau bigint; tat bigint; ntat bigint; start bigint; used bigint;
    wprev numeric; room bigint; need bigint;
    r_ok boolean; r_rem bigint; r_reset bigint; r_retry bigint;
    r_t bigint; r_count bigint; r_prev bigint;
    pass int;
BEGIN
    IF n = 0 THEN
        RETURN;
    END IF;
    SELECT array_agg(d.slot ORDER BY d.ord) INTO slot
    FROM (SELECT u.ord, dense_rank() OVER (ORDER BY u.k, u.e, u.p)::int AS slot
          FROM unnest(p_key, p_endpoint, p_policy) WITH ORDINALITY AS u(k, e, p, ord)) d;

    WITH src AS (
        SELECT DISTINCT ON (u.k, u.e, u.p) u.k, u.e, u.p, u.l, u.pe, u.c
        FROM unnest(p_key, p_endpoint, p_policy, p_lim, p_period, p_cap)
             AS u(k, e, p, l, pe, c)
        ORDER BY u.k, u.e, u.p
    ), up AS (
        INSERT INTO {schema}.buckets AS b (key, endpoint, policy, algorithm, lim, period, cap)
        SELECT src.k, src.e, src.p, p_alg, src.l, src.pe, src.c FROM src
        ORDER BY src.k, src.e, src.p
        ON CONFLICT (key, endpoint, policy) DO UPDATE SET seen = b.seen
        RETURNING b.key, b.endpoint, b.policy, b.algorithm, b.t, b.count, b.prev
    )
    SELECT array_agg(up.key ORDER BY up.key, up.endpoint, up.policy),
           array_agg(up.endpoint ORDER BY up.key, up.endpoint, up.policy),
           array_agg(up.policy ORDER BY up.key, up.endpoint, up.policy),
           array_agg(up.algorithm ORDER BY up.key, up.endpoint, up.policy),
           array_agg(up.t ORDER BY up.key, up.endpoint, up.policy),
           array_agg(up.count ORDER BY up.key, up.endpoint, up.policy),
           array_agg(up.prev ORDER BY up.key, up.endpoint, up.policy)
    INTO s_key, s_ep, s_pol, s_alg, s_t, s_count, s_prev
    FROM up;

    k := array_length(s_key, 1);
    s_da := array_fill(0::bigint, ARRAY[k]);
    s_dd := array_fill(0::bigint, ARRAY[k]);
    s_tier := array_fill(NULL::text, ARRAY[k]);
    s_lim := array_fill(NULL::bigint, ARRAY[k]);
    s_period := array_fill(NULL::bigint, ARRAY[k]);
    s_cap := array_fill(NULL::bigint, ARRAY[k]);
    s_ok := array_fill(true, ARRAY[k]);
    s_seen := array_fill(0::bigint, ARRAY[k]);
    FOR i IN 1..k LOOP
        IF s_alg[i] <> p_alg THEN
            s_t[i] := 0; s_count[i] := 0; s_prev[i] := 0;
        END IF;
    END LOOP;
    o_ok := array_fill(NULL::boolean, ARRAY[n]);
    o_rem := array_fill(NULL::bigint, ARRAY[n]);
    o_reset := array_fill(NULL::bigint, ARRAY[n]);
    o_retry := array_fill(NULL::bigint, ARRAY[n]);
    o_now := array_fill(NULL::bigint, ARRAY[n]);
    n_t := array_fill(NULL::bigint, ARRAY[n]);
    n_count := array_fill(NULL::bigint, ARRAY[n]);
    n_prev := array_fill(NULL::bigint, ARRAY[n]);

    first := 1;
    WHILE first <= n LOOP
        last := first;
        WHILE last < n AND p_req[last + 1] = p_req[first] LOOP
            last := last + 1;
        END LOOP;
        -- pass 1 decides each hit with its cost; pass 2 (denied request) re-reports
        -- admitting hits as peeks, since nothing is charged.
        FOR pass IN 1..2 LOOP
            all_ok := true;
            FOR i IN first..last LOOP
                IF pass = 2 AND NOT o_ok[i] THEN
                    CONTINUE;
                END IF;
                j := slot[i];
                now := coalesce(p_now[i], clock);
                cost := CASE WHEN pass = 1 THEN p_cost[i] ELSE 0 END;
                lim := p_lim[i]; per := p_period[i]; cap := p_cap[i];
                st := s_t[j]; sc := s_count[j]; sp := s_prev[j];
                r_t := st; r_count := sc; r_prev := sp;
                IF p_alg = 'gcra' THEN
                    iv := per / lim;
                    tau := cap * iv;
                    tat := CASE WHEN st < now THEN now ELSE st END;
                    IF cost > cap THEN
                        r_ok := false; r_rem := (now + tau - tat) / iv;
                        r_reset := tat - now; r_retry := NULL;
                    ELSE
                        ntat := tat + cost * iv;
                        IF ntat - tau <= now THEN
                            r_ok := true; r_rem := (now + tau - ntat) / iv;
                            r_reset := ntat - now; r_retry := 0;
                            IF cost > 0 THEN r_t := ntat; END IF;
                        ELSE
                            r_ok := false; r_rem := (now + tau - tat) / iv;
                            r_reset := tat - now; r_retry := ntat - tau - now;
                        END IF;
                    END IF;
                ELSIF p_alg = 'fixed_window' THEN
                    start := now - now % per;
                    IF st <> start THEN sc := 0; END IF;
                    r_reset := start + per - now;
                    IF cost > lim THEN
                        r_ok := false; r_rem := lim - sc; r_retry := NULL;
                    ELSIF sc + cost <= lim THEN
                        used := sc + cost;
                        r_ok := true; r_rem := lim - used; r_retry := 0;
                        IF used = 0 THEN r_reset := 0; END IF;
                        IF cost > 0 THEN r_t := start; r_count := used; END IF;
                    ELSE
                        r_ok := false; r_rem := lim - sc; r_retry := r_reset;
                    END IF;
                ELSE
                    start := now - now % per;
                    IF st = start THEN
                        NULL;
                    ELSIF st = start - per THEN
                        sp := sc; sc := 0;
                    ELSE
                        sp := 0; sc := 0;
                    END IF;
                    wprev := sp::numeric * (per - (now - start));
                    IF cost <= lim AND wprev + (sc + cost)::numeric * per <= lim::numeric * per
                    THEN
                        used := sc + cost;
                        r_ok := true; r_retry := 0;
                        r_rem := floor((lim::numeric * per - wprev - used::numeric * per) / per);
                        r_reset := CASE WHEN used > 0 THEN start + 2 * per - now
                                        WHEN sp > 0 THEN start + per - now ELSE 0 END;
                        IF cost > 0 THEN r_t := start; r_count := used; r_prev := sp; END IF;
                    ELSE
                        r_ok := false;
                        r_rem := floor((lim::numeric * per - wprev - sc::numeric * per) / per);
                        r_reset := start + (CASE WHEN sc > 0 THEN 2 ELSE 1 END) * per - now;
                        IF cost > lim THEN
                            r_retry := NULL;
                        ELSE
                            room := lim - sc - cost;
                            need := per;
                            IF room >= 0 AND sp > 0 THEN
                                need := per - floor(room::numeric * per / sp)::bigint;
                            END IF;
                            IF need < per THEN
                                r_retry := start + need - now;
                            ELSIF sc = 0 THEN
                                r_retry := start + per - now;
                            ELSE
                                r_retry := start + per - now + greatest(
                                    per - floor((lim - cost)::numeric * per / sc)::bigint, 0);
                            END IF;
                        END IF;
                    END IF;
                END IF;
                o_ok[i] := r_ok; o_rem[i] := greatest(r_rem, 0);
                o_reset[i] := greatest(r_reset, 0);
                o_retry[i] := CASE WHEN r_retry IS NULL THEN NULL ELSE greatest(r_retry, 0) END;
                o_now[i] := now;
                n_t[i] := r_t; n_count[i] := r_count; n_prev[i] := r_prev;
                all_ok := all_ok AND r_ok;
            END LOOP;
            IF pass = 1 THEN
                req_ok := all_ok;
            END IF;
            EXIT WHEN pass = 1 AND req_ok;
            IF pass = 1 THEN
                -- denied: count it, charge nothing
                FOR i IN first..last LOOP
                    j := slot[i];
                    s_dd[j] := s_dd[j] + p_cost[i];
                    IF p_cost[i] > 0 THEN s_ok[j] := false; END IF;
                    s_seen[j] := o_now[i];
                END LOOP;
            END IF;
            EXIT WHEN pass = 2;
        END LOOP;
        IF req_ok THEN
            FOR i IN first..last LOOP
                j := slot[i];
                IF p_cost[i] > 0 THEN
                    s_t[j] := n_t[i]; s_count[j] := n_count[i]; s_prev[j] := n_prev[i];
                    s_da[j] := s_da[j] + p_cost[i];
                    s_ok[j] := true;
                    s_alg[j] := p_alg;
                END IF;
                s_seen[j] := o_now[i];
            END LOOP;
        END IF;
        FOR i IN first..last LOOP
            j := slot[i];
            s_tier[j] := p_tier[i]; s_lim[j] := p_lim[i];
            s_period[j] := p_period[i]; s_cap[j] := p_cap[i];
        END LOOP;
        first := last + 1;
    END LOOP;

    UPDATE {schema}.buckets AS b SET
        algorithm = CASE WHEN u.da > 0 THEN p_alg ELSE b.algorithm END,
        t = u.t, count = u.c, prev = u.pv,
        expires = CASE p_alg WHEN 'gcra' THEN u.t
                             WHEN 'fixed_window' THEN u.t + u.pe
                             ELSE u.t + 2 * u.pe END,
        tier = u.tier, lim = u.l, period = u.pe, cap = u.cp,
        allowed = b.allowed + u.da, denied = b.denied + u.dd,
        last_ok = u.ok, seen = greatest(b.seen, u.seen)
    FROM unnest(s_key, s_ep, s_pol, s_t, s_count, s_prev, s_tier, s_lim, s_period, s_cap,
                s_da, s_dd, s_ok, s_seen)
         AS u(k, e, p, t, c, pv, tier, l, pe, cp, da, dd, ok, seen)
    WHERE b.key = u.k AND b.endpoint = u.e AND b.policy = u.p
      AND (u.da > 0 OR u.dd > 0 OR b.lim <> u.l OR b.tier <> u.tier);

    RETURN QUERY SELECT * FROM unnest(o_ok, o_rem, o_reset, o_retry, o_now);
END
$fn$
"""

_CLEANUP_FUNCTION = """
CREATE OR REPLACE FUNCTION {schema}.cleanup(p_batch int, p_now bigint DEFAULT NULL)
RETURNS int
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
    WITH doomed AS (
        SELECT ctid FROM {schema}.buckets
        WHERE expires <= coalesce(p_now, {now})
        LIMIT p_batch
        FOR UPDATE SKIP LOCKED
    ), gone AS (
        DELETE FROM {schema}.buckets AS b USING doomed
        WHERE b.ctid = doomed.ctid AND b.expires <= coalesce(p_now, {now})
        RETURNING 1
    )
    SELECT count(*)::int FROM gone
$fn$
"""

# The lone-request fast path: one GCRA quota, one INSERT ... ON CONFLICT DO UPDATE that reads
# the old row only through the table alias ``b`` (atomic with the update). ``EXCLUDED.seen``
# carries "now", computed once. Python derives remaining/reset/retry from the returned row.
_TAT = "(CASE WHEN b.algorithm = 'gcra' AND b.t >= EXCLUDED.seen THEN b.t ELSE EXCLUDED.seen END)"
_OK = f"(p_cost <= p_cap AND {_TAT} + p_cost * p_iv - p_cap * p_iv <= EXCLUDED.seen)"
_HIT_FUNCTION = f"""
CREATE OR REPLACE FUNCTION {{schema}}.hit(
    p_key text, p_endpoint text, p_policy text, p_tier text, p_lim bigint, p_period bigint,
    p_cap bigint, p_cost bigint, p_iv bigint, p_now bigint
) RETURNS TABLE (ok boolean, t bigint, now_ns bigint)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict use_column
BEGIN
-- plpgsql, not sql: PL/pgSQL caches the statement's plan per session.
RETURN QUERY
INSERT INTO {{schema}}.buckets AS b
    (key, endpoint, policy, algorithm, tier, t, expires, lim, period, cap,
     allowed, denied, last_ok, seen)
SELECT p_key, p_endpoint, p_policy, 'gcra', p_tier, v.t, v.t, p_lim, p_period, p_cap,
       v.a, p_cost - v.a, v.a > 0 OR p_cost = 0, v.now
FROM (SELECT CASE WHEN p_cost <= p_cap THEN n.now + p_cost * p_iv ELSE 0 END AS t,
             CASE WHEN p_cost <= p_cap THEN p_cost ELSE 0 END AS a, n.now
      FROM (SELECT coalesce(p_now, {{now}}) AS now) n) v
ON CONFLICT (key, endpoint, policy) DO UPDATE SET
    last_ok = {_OK},
    t = CASE WHEN {_OK} THEN {_TAT} + p_cost * p_iv ELSE b.t END,
    expires = CASE WHEN {_OK} THEN {_TAT} + p_cost * p_iv ELSE b.expires END,
    algorithm = 'gcra',
    tier = EXCLUDED.tier, lim = EXCLUDED.lim, period = EXCLUDED.period, cap = EXCLUDED.cap,
    allowed = b.allowed + CASE WHEN {_OK} THEN p_cost ELSE 0 END,
    denied = b.denied + CASE WHEN {_OK} THEN 0 ELSE p_cost END,
    seen = EXCLUDED.seen
RETURNING b.last_ok, b.t, b.seen;
END
$fn$
"""

# A batch of single-quota GCRA requests, grouped per row by the caller: n requests of equal
# cost c on one key. In arrival order request k is admitted iff tat0 + k*c*T - tau <= now,
# so the number admitted has a closed form: m = min(n, (now + tau - tat0) // (c*T)). One
# set-based upsert locks the rows in key order and charges m*c on each. EXCLUDED carries the
# batch's figures: count = c, allowed + denied = n*c, seen = now. For GCRA rows ``count``
# and ``prev`` are otherwise unused: ``prev`` records m, which RETURNING hands back.
_G_TAT = "(CASE WHEN b.algorithm = 'gcra' AND b.t >= EXCLUDED.seen THEN b.t ELSE EXCLUDED.seen END)"
_G_IV = "(EXCLUDED.period / EXCLUDED.lim)"
_G_N = "((EXCLUDED.allowed + EXCLUDED.denied) / EXCLUDED.count)"
_G_M = (
    f"least({_G_N}, greatest(0, (EXCLUDED.seen + EXCLUDED.cap * {_G_IV} - {_G_TAT})"
    f" / (EXCLUDED.count * {_G_IV})))"
)
_HIT_MANY_FUNCTION = f"""
CREATE OR REPLACE FUNCTION {{schema}}.hit_many(
    p_now bigint, p_key text[], p_endpoint text[], p_policy text[], p_tier text[],
    p_lim bigint[], p_period bigint[], p_cap bigint[], p_cost bigint[], p_n bigint[]
) RETURNS TABLE (key text, endpoint text, policy text, t bigint, admitted bigint,
                 now_ns bigint)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict use_column
BEGIN
RETURN QUERY
INSERT INTO {{schema}}.buckets AS b
    (key, endpoint, policy, algorithm, tier, t, expires, lim, period, cap,
     count, prev, allowed, denied, last_ok, seen)
SELECT g.k, g.e, g.p, 'gcra', g.tier,
       CASE WHEN g.m > 0 THEN c.now + g.m * g.c * (g.pe / g.l) ELSE 0 END,
       CASE WHEN g.m > 0 THEN c.now + g.m * g.c * (g.pe / g.l) ELSE 0 END,
       g.l, g.pe, g.cp, g.c, g.m, g.m * g.c, (g.n - g.m) * g.c, g.m = g.n, c.now
FROM (SELECT coalesce(p_now, {{now}}) AS now) c,
     (SELECT u.*, least(u.n, u.cp / u.c) AS m
      FROM unnest(p_key, p_endpoint, p_policy, p_tier, p_lim, p_period, p_cap, p_cost, p_n)
           AS u(k, e, p, tier, l, pe, cp, c, n)) g
ORDER BY g.k, g.e, g.p
ON CONFLICT (key, endpoint, policy) DO UPDATE SET
    t = CASE WHEN {_G_M} > 0 THEN {_G_TAT} + {_G_M} * EXCLUDED.count * {_G_IV} ELSE b.t END,
    expires = CASE WHEN {_G_M} > 0 THEN {_G_TAT} + {_G_M} * EXCLUDED.count * {_G_IV}
                   ELSE b.expires END,
    algorithm = 'gcra',
    count = EXCLUDED.count,
    prev = {_G_M},
    allowed = b.allowed + {_G_M} * EXCLUDED.count,
    denied = b.denied + ({_G_N} - {_G_M}) * EXCLUDED.count,
    last_ok = {_G_M} = {_G_N},
    tier = EXCLUDED.tier, lim = EXCLUDED.lim, period = EXCLUDED.period, cap = EXCLUDED.cap,
    seen = EXCLUDED.seen
RETURNING b.key, b.endpoint, b.policy, b.t, b.prev, b.seen;
END
$fn$
"""

# v2: a batch of single-quota GCRA requests that share endpoint, quota, tier and cost (the
# usual case: one rule, many callers), grouped per key by the caller (``p_n`` NULL: each key
# once). The closed form of hit_many(), but the shared figures are scalars bound once per
# statement instead of arrays unnested and re-derived from EXCLUDED on every row: about a
# third less work per row. EXCLUDED.count carries n (``count`` is unused by GCRA rows).
# With every n = 1 the closed form is a single comparison, a further tenth less per row.
_K_TAT = "(CASE WHEN b.algorithm = 'gcra' AND b.t >= clock THEN b.t ELSE clock END)"
_K_M = f"least(EXCLUDED.count, greatest(0, (room - {_K_TAT}) / step))"
_K_OK = f"({_K_TAT} <= last)"


def _k_set_many(tat: str, m: str) -> str:
    """The row update of a key asked ``EXCLUDED.count`` times, ``m`` of them admitted."""
    return f"""    t = CASE WHEN {m} > 0 THEN {tat} + {m} * step ELSE b.t END,
    expires = CASE WHEN {m} > 0 THEN {tat} + {m} * step ELSE b.expires END,
    prev = {m},
    allowed = b.allowed + {m} * p_cost,
    denied = b.denied + (EXCLUDED.count - {m}) * p_cost,
    last_ok = {m} = EXCLUDED.count,"""


def _k_set_one(tat: str, ok: str) -> str:
    """The row update of a key asked once, admitted if ``ok``."""
    return f"""    t = CASE WHEN {ok} THEN {tat} + step ELSE b.t END,
    expires = CASE WHEN {ok} THEN {tat} + step ELSE b.expires END,
    prev = CASE WHEN {ok} THEN 1 ELSE 0 END,
    allowed = b.allowed + CASE WHEN {ok} THEN p_cost ELSE 0 END,
    denied = b.denied + CASE WHEN {ok} THEN 0 ELSE p_cost END,
    last_ok = {ok},"""


_K_SET_MANY = _k_set_many(_K_TAT, _K_M)
_K_SET_ONE = _k_set_one(_K_TAT, _K_OK)
_K_UPSERT = """
INSERT INTO {{schema}}.buckets AS b
    (key, endpoint, policy, algorithm, tier, t, expires, lim, period, cap,
     count, prev, allowed, denied, last_ok, seen)
SELECT g.k, p_endpoint, p_policy, 'gcra', p_tier,
       CASE WHEN g.m > 0 THEN clock + g.m * step ELSE 0 END,
       CASE WHEN g.m > 0 THEN clock + g.m * step ELSE 0 END,
       p_lim, p_period, p_cap, g.n, g.m, g.m * p_cost, (g.n - g.m) * p_cost, g.m = g.n, clock
FROM (SELECT u.k, u.n, least(u.n, fresh) AS m
      FROM (SELECT v.k, coalesce(p_n[v.i], 1) AS n
            FROM unnest(p_key) WITH ORDINALITY AS v(k, i)) u) g
ORDER BY g.k
ON CONFLICT (key, endpoint, policy) DO UPDATE SET
{set}
    algorithm = 'gcra', tier = p_tier, lim = p_lim, period = p_period, cap = p_cap,
    seen = clock
RETURNING b.key, b.t, b.prev, b.seen"""


def _hit_keys_function(variables: str, upsert: str, set_one: str, set_many: str) -> str:
    """``hit_keys()``: the shared signature and the branch on ``p_n`` (one request per key,
    or counts), around one version's variables and upsert."""
    return f"""
CREATE OR REPLACE FUNCTION {{schema}}.hit_keys(
    p_now bigint, p_key text[], p_n bigint[], p_endpoint text, p_policy text, p_tier text,
    p_lim bigint, p_period bigint, p_cap bigint, p_cost bigint
) RETURNS TABLE (key text, t bigint, admitted bigint, now_ns bigint)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict use_column
DECLARE
    clock bigint := coalesce(p_now, {{now}});
    step bigint := p_cost * (p_period / p_lim);
{variables}
BEGIN
IF p_n IS NULL THEN
    RETURN QUERY {upsert.format(set=set_one)};
ELSE
    RETURN QUERY {upsert.format(set=set_many)};
END IF;
END
$fn$
"""


_HIT_KEYS_FUNCTION = _hit_keys_function(
    """    room bigint := clock + p_cap * (p_period / p_lim);  -- tat + k*step <= room: k admitted
    fresh bigint := p_cap / p_cost;  -- what a missing row admits
    last bigint := room - step;  -- the latest tat that admits one more""",
    _K_UPSERT,
    _K_SET_ONE,
    _K_SET_MANY,
)

# v3: hit_keys() decides a row no earlier than the row's last decision (``seen``) when the
# database clock decides. Two statements in flight at once each read the clock when they
# start; the one that started first may reach a row second (it was planning, or waiting for
# another row), and deciding there at its earlier time denied a request that fitted, with a
# retry-after of a few milliseconds (measured: 250 concurrent hits on 50 keys at 3/hour,
# a key admitted 2 in 3-12 runs out of 40). The row's time is any instant while the statement
# holds the row (the last decision committed before this statement could lock the row), so
# taking the later of the two is exact. greatest() skips the NULL: an explicit time (p_now)
# is taken as given.
_V3_NOW = "greatest(clock, CASE WHEN p_now IS NULL THEN b.seen END)"
_V3_TAT = f"(CASE WHEN b.algorithm = 'gcra' AND b.t >= {_V3_NOW} THEN b.t ELSE {_V3_NOW} END)"
_V3_M = f"least(EXCLUDED.count, greatest(0, ({_V3_NOW} + tol - {_V3_TAT}) / step))"
_V3_OK = f"({_V3_TAT} <= {_V3_NOW} + tol - step)"
_V3_SET_MANY = _k_set_many(_V3_TAT, _V3_M)
_V3_SET_ONE = _k_set_one(_V3_TAT, _V3_OK)
_V3_UPSERT = _K_UPSERT.replace("    seen = clock\n", f"    seen = {_V3_NOW}\n")
_HIT_KEYS_FUNCTION_V3 = _hit_keys_function(
    """    tol bigint := p_cap * (p_period / p_lim);  -- tat + k*step <= now + tol: k admitted
    fresh bigint := p_cap / p_cost;  -- what a missing row admits""",
    _V3_UPSERT,
    _V3_SET_ONE,
    _V3_SET_MANY,
)

# v4: the v3 rule for the other decision functions. hit() and hit_many() read the clock in
# the statement's source row, before ON CONFLICT waits for the row; decide() reads it before
# its upsert locks the rows. Each decides a row no earlier than the row's last decision
# (``seen``) when the database clock decides, and never moves ``seen`` back.
_V4_SEEN = "greatest(EXCLUDED.seen, CASE WHEN p_now IS NULL THEN b.seen END)"


def _no_earlier(function: str) -> str:
    head, _, tail = function.partition("ON CONFLICT")
    return head + "ON CONFLICT" + tail.replace("EXCLUDED.seen", _V4_SEEN)


_HIT_FUNCTION_V4 = _no_earlier(_HIT_FUNCTION)
_HIT_MANY_FUNCTION_V4 = _no_earlier(_HIT_MANY_FUNCTION)
_DECIDE_FUNCTION_V4 = (
    _DECIDE_FUNCTION.replace("    s_seen bigint[];\n", "    s_seen bigint[]; s_seen0 bigint[];\n")
    .replace(
        "RETURNING b.key, b.endpoint, b.policy, b.algorithm, b.t, b.count, b.prev\n",
        "RETURNING b.key, b.endpoint, b.policy, b.algorithm, b.t, b.count, b.prev, b.seen\n",
    )
    .replace(
        "           array_agg(up.prev ORDER BY up.key, up.endpoint, up.policy)\n"
        "    INTO s_key, s_ep, s_pol, s_alg, s_t, s_count, s_prev\n",
        "           array_agg(up.prev ORDER BY up.key, up.endpoint, up.policy),\n"
        "           array_agg(up.seen ORDER BY up.key, up.endpoint, up.policy)\n"
        "    INTO s_key, s_ep, s_pol, s_alg, s_t, s_count, s_prev, s_seen0\n",
    )
    .replace(
        "now := coalesce(p_now[i], clock);",
        "now := coalesce(p_now[i], greatest(clock, s_seen0[j]));",
    )
)
assert _HIT_FUNCTION_V4.count(_V4_SEEN) > 3 and _HIT_MANY_FUNCTION_V4.count(_V4_SEEN) > 3
assert "s_seen0[j]" in _DECIDE_FUNCTION_V4 and "up.seen ORDER BY" in _DECIDE_FUNCTION_V4

# Read-only: the rows of some (key, endpoint, policy) triples and the database clock.
_PEEK_FUNCTION = """
CREATE OR REPLACE FUNCTION {schema}.peek(p_key text[], p_endpoint text[], p_policy text[])
RETURNS TABLE (ord bigint, algorithm text, t bigint, used bigint, prev bigint, now_ns bigint)
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
SELECT u.ord, b.algorithm, b.t, b.count, b.prev, {now}
FROM unnest(p_key, p_endpoint, p_policy) WITH ORDINALITY AS u(k, e, p, ord)
LEFT JOIN {schema}.buckets AS b ON b.key = u.k AND b.endpoint = u.e AND b.policy = u.p
ORDER BY u.ord
$fn$
"""

_STATUS_FUNCTION = """
CREATE OR REPLACE FUNCTION {schema}.status(p_key text, p_now bigint DEFAULT NULL)
RETURNS TABLE (key text, endpoint text, policy text, tier text, algorithm text, t bigint,
               used bigint, prev bigint, lim bigint, period bigint, cap bigint,
               allowed bigint, denied bigint, now_ns bigint)
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
SELECT b.key, b.endpoint, b.policy, b.tier, b.algorithm, b.t, b.count, b.prev, b.lim,
       b.period, b.cap, b.allowed, b.denied, coalesce(p_now, {now})
FROM {schema}.buckets AS b
WHERE b.key = p_key AND b.expires > coalesce(p_now, {now})
ORDER BY b.endpoint, b.policy
$fn$
"""

_RESET_FUNCTION = """
CREATE OR REPLACE FUNCTION {schema}.reset(p_key text, p_endpoint text DEFAULT NULL)
RETURNS int
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
WITH gone AS (
    DELETE FROM {schema}.buckets AS b
    WHERE b.key = p_key AND (p_endpoint IS NULL OR b.endpoint = p_endpoint)
    RETURNING 1
)
SELECT count(*)::int FROM gone
$fn$
"""

# Functions execute for PUBLIC by default; only roles granted by `grant_runtime` may.
_REVOKE = """
REVOKE ALL ON ALL TABLES IN SCHEMA {schema} FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA {schema} FROM PUBLIC
"""

_HIT_KEYS_SIGNATURE = (
    "{schema}.hit_keys(bigint, text[], bigint[], text, text, text, bigint, bigint, bigint, bigint)"
)
_HIT_MANY_SIGNATURE = (
    "{schema}.hit_many(bigint, text[], text[], text[], text[], bigint[], bigint[], bigint[], "
    "bigint[], bigint[])"
)

# v2 on a schema already in use: runtime roles granted under v1 may call hit_many(), so they
# get hit_keys() as well, or their batches would be refused after the upgrade.
_REVOKE_AND_GRANT_HIT_KEYS = f"""
REVOKE ALL ON FUNCTION {_HIT_KEYS_SIGNATURE} FROM PUBLIC;
DO $do$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT a.grantee::regrole AS role
        FROM pg_proc AS p, aclexplode(p.proacl) AS a
        WHERE p.oid = '{_HIT_MANY_SIGNATURE}'::regprocedure
          AND a.privilege_type = 'EXECUTE' AND a.grantee <> 0 AND a.grantee <> p.proowner
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION {_HIT_KEYS_SIGNATURE} TO %s', r.role);
    END LOOP;
END
$do$
"""

# The runtime role: may decide, peek and read one key's status; no table access.
GRANT_RUNTIME = f"""
GRANT USAGE ON SCHEMA {{schema}} TO {{role}};
GRANT EXECUTE ON FUNCTION {{schema}}.hit(text, text, text, text, bigint, bigint, bigint, bigint,
                                       bigint, bigint) TO {{role}};
GRANT EXECUTE ON FUNCTION {{schema}}.decide(text, bigint[], int[], text[], text[], text[],
                                          text[], bigint[], bigint[], bigint[], bigint[])
    TO {{role}};
GRANT EXECUTE ON FUNCTION {_HIT_MANY_SIGNATURE} TO {{role}};
GRANT EXECUTE ON FUNCTION {_HIT_KEYS_SIGNATURE} TO {{role}};
GRANT EXECUTE ON FUNCTION {{schema}}.peek(text[], text[], text[]) TO {{role}};
GRANT EXECUTE ON FUNCTION {{schema}}.status(text, bigint) TO {{role}}
"""

MIGRATIONS: list[list[str]] = [
    [
        _CREATE_TABLE,
        _STATS_VIEW,
        _DECIDE_FUNCTION,
        _CLEANUP_FUNCTION,
        _HIT_FUNCTION,
        _HIT_MANY_FUNCTION,
        _PEEK_FUNCTION,
        _STATUS_FUNCTION,
        _RESET_FUNCTION,
        _REVOKE,
    ],
    # v2: hit_keys() for batches that share endpoint, quota, tier and cost.
    [
        _HIT_KEYS_FUNCTION,
        _REVOKE_AND_GRANT_HIT_KEYS,
    ],
    # v3: hit_keys() never decides a row at an earlier time than its last decision.
    [
        _HIT_KEYS_FUNCTION_V3,
    ],
    # v4: hit(), hit_many() and decide() likewise (same signatures: grants are kept).
    [
        _HIT_FUNCTION_V4,
        _HIT_MANY_FUNCTION_V4,
        _DECIDE_FUNCTION_V4,
    ],
]
LATEST_VERSION = len(MIGRATIONS)
# For each migration, the oldest code (by the schema version it knows) that can still use
# the schema once it is applied. ``schema_version`` records this level, which is what every
# fineflow compares with what it knows, so an additive migration (new functions only, like
# v2) leaves older instances running: a rolling deploy or a rollback keeps working. Every
# applied migration is listed in ``schema_migrations``.
COMPATIBLE_WITH: list[int] = [1, 1, 1, 1]


def render(
    template: str, schema: str, *, unlogged: bool = False, role: str | None = None
) -> sql.Composed:
    """Compose a template with identifiers (never string formatting)."""
    return sql.SQL(template).format(
        schema=sql.Identifier(schema),
        now=sql.SQL(_NOW),
        unlogged=sql.SQL("UNLOGGED" if unlogged else ""),
        role=sql.Identifier(role or "-"),
    )
