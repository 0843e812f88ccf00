-- hit_keys(): a batch of single-quota GCRA requests that share endpoint, quota, tier and
-- cost (the usual case: one rule, many callers), grouped per key by the caller: p_n[i]
-- requests on key i, or p_n NULL when each key comes once. The closed form of hit_many(),
-- but the shared figures are scalars bound once per statement instead of arrays unnested
-- and re-derived from EXCLUDED on every row (about a third less work per row); with every
-- n = 1 the closed form is a single comparison, a further tenth less per row, hence two
-- branches. EXCLUDED.count carries n (``count`` is otherwise unused by GCRA rows),
-- ``prev`` records m, which RETURNING hands back with the row's TAT.
--
-- The new values come from one sub-select over the old row ``b`` (ON CONFLICT DO UPDATE has
-- no variables; the row is still read only through the alias, atomic with the update):
--   now = the statement's clock, but no earlier than the row's last decision: two
--         statements in flight each read the clock when they start, and the one that
--         started first may reach a row second (it was planning, or waiting for another
--         row). The row's time is any instant while the statement holds the row, so the
--         later of the two is exact. An explicit p_now is taken as given.
--   tat = the row's TAT, or now if it is older or of another algorithm
--   one request (p_n NULL): admitted iff tat <= now + tol - step
--   n requests:             m = least(n, greatest(0, (now + tol - tat) / step)) admitted
CREATE OR REPLACE FUNCTION {schema}.hit_keys(
    p_now bigint, p_key text[], p_n bigint[], p_endpoint text, p_policy text, p_tier text,
    p_lim bigint, p_period bigint, p_cap bigint, p_cost bigint
) RETURNS TABLE (key text, t bigint, admitted bigint, now_ns bigint)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict use_column
DECLARE
    clock bigint := coalesce(p_now,
                             (extract(epoch from clock_timestamp()) * 1000000000)::bigint);
    step bigint := p_cost * (p_period / p_lim);
    tol bigint := p_cap * (p_period / p_lim);  -- tat + k*step <= now + tol: k admitted
    fresh bigint := p_cap / p_cost;  -- what a missing row admits
BEGIN
IF p_n IS NULL THEN
    RETURN QUERY
    INSERT INTO {schema}.buckets AS b
        (key, endpoint, policy, algorithm, tier, t, expires, lim, period, cap,
         count, prev, allowed, denied, last_ok, seen)
    SELECT g.k, p_endpoint, p_policy, 'gcra', p_tier,
           CASE WHEN g.m > 0 THEN clock + g.m * step ELSE 0 END,
           CASE WHEN g.m > 0 THEN clock + g.m * step ELSE 0 END,
           p_lim, p_period, p_cap, g.n, g.m, g.m * p_cost, (g.n - g.m) * p_cost, g.m = g.n,
           clock
    FROM (SELECT u.k, u.n, least(u.n, fresh) AS m
          FROM (SELECT v.k, coalesce(p_n[v.i], 1) AS n
                FROM unnest(p_key) WITH ORDINALITY AS v(k, i)) u) g
    ORDER BY g.k
    ON CONFLICT (key, endpoint, policy) DO UPDATE SET
        (t, expires, prev, allowed, denied, last_ok, seen) = (
            SELECT CASE WHEN d.ok THEN d.tat + step ELSE b.t END,
                   CASE WHEN d.ok THEN d.tat + step ELSE b.expires END,
                   CASE WHEN d.ok THEN 1 ELSE 0 END,
                   b.allowed + CASE WHEN d.ok THEN p_cost ELSE 0 END,
                   b.denied + CASE WHEN d.ok THEN 0 ELSE p_cost END,
                   d.ok,
                   d.now
            FROM (SELECT r.tat <= r.now + tol - step AS ok, r.tat, r.now
                  FROM (SELECT c.now,
                               greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END, c.now) AS tat
                        FROM (SELECT greatest(clock, CASE WHEN p_now IS NULL THEN b.seen END)
                                     AS now) c) r) d
        ),
        algorithm = 'gcra', tier = p_tier, lim = p_lim, period = p_period, cap = p_cap
    RETURNING b.key, b.t, b.prev, b.seen;
ELSE
    RETURN QUERY
    INSERT INTO {schema}.buckets AS b
        (key, endpoint, policy, algorithm, tier, t, expires, lim, period, cap,
         count, prev, allowed, denied, last_ok, seen)
    SELECT g.k, p_endpoint, p_policy, 'gcra', p_tier,
           CASE WHEN g.m > 0 THEN clock + g.m * step ELSE 0 END,
           CASE WHEN g.m > 0 THEN clock + g.m * step ELSE 0 END,
           p_lim, p_period, p_cap, g.n, g.m, g.m * p_cost, (g.n - g.m) * p_cost, g.m = g.n,
           clock
    FROM (SELECT u.k, u.n, least(u.n, fresh) AS m
          FROM (SELECT v.k, coalesce(p_n[v.i], 1) AS n
                FROM unnest(p_key) WITH ORDINALITY AS v(k, i)) u) g
    ORDER BY g.k
    ON CONFLICT (key, endpoint, policy) DO UPDATE SET
        (t, expires, prev, allowed, denied, last_ok, seen) = (
            SELECT CASE WHEN d.m > 0 THEN d.tat + d.m * step ELSE b.t END,
                   CASE WHEN d.m > 0 THEN d.tat + d.m * step ELSE b.expires END,
                   d.m,
                   b.allowed + d.m * p_cost,
                   b.denied + (EXCLUDED.count - d.m) * p_cost,
                   d.m = EXCLUDED.count,
                   d.now
            FROM (SELECT least(EXCLUDED.count, greatest(0, (r.now + tol - r.tat) / step)) AS m,
                         r.tat, r.now
                  FROM (SELECT c.now,
                               greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END, c.now) AS tat
                        FROM (SELECT greatest(clock, CASE WHEN p_now IS NULL THEN b.seen END)
                                     AS now) c) r) d
        ),
        algorithm = 'gcra', tier = p_tier, lim = p_lim, period = p_period, cap = p_cap
    RETURNING b.key, b.t, b.prev, b.seen;
END IF;
END
$fn$;
