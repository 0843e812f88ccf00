-- hit_keys(): a batch of single-quota GCRA requests that share endpoint, quota, tier and
-- cost (the usual case: one rule, many callers), grouped per key by the caller: p_n[i]
-- requests on key i, or p_n NULL when each key comes once. The closed form of hit_many(),
-- but the shared figures are scalars bound once per statement instead of arrays unnested
-- and re-derived from EXCLUDED on every row (about a third less work per row); with every
-- n = 1 the closed form is a single comparison, a further tenth less per row, hence two
-- branches. EXCLUDED.count carries n (``count`` is otherwise unused by GCRA rows),
-- ``prev`` records m, which RETURNING hands back with the row's TAT.
--
-- Terms of the update (written out where used: ON CONFLICT DO UPDATE has no variables):
--   now = greatest(clock, CASE WHEN p_now IS NULL THEN b.seen END)
--         the statement's clock, but no earlier than the row's last decision: two
--         statements in flight each read the clock when they start, and the one that
--         started first may reach a row second (it was planning, or waiting for another
--         row). The row's time is any instant while the statement holds the row, so the
--         later of the two is exact. An explicit p_now is taken as given.
--   tat = greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END, now)
--   one request (p_n NULL):  admitted iff tat <= now + tol - step
--   n requests:              m = least(n, greatest(0, (now + tol - tat) / step))
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
        t = CASE
            WHEN greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END,
                          clock, CASE WHEN p_now IS NULL THEN b.seen END)
                 <= greatest(clock, CASE WHEN p_now IS NULL THEN b.seen END) + tol - step
            THEN greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END,
                          clock, CASE WHEN p_now IS NULL THEN b.seen END) + step
            ELSE b.t END,
        expires = CASE
            WHEN greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END,
                          clock, CASE WHEN p_now IS NULL THEN b.seen END)
                 <= greatest(clock, CASE WHEN p_now IS NULL THEN b.seen END) + tol - step
            THEN greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END,
                          clock, CASE WHEN p_now IS NULL THEN b.seen END) + step
            ELSE b.expires END,
        prev = CASE
            WHEN greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END,
                          clock, CASE WHEN p_now IS NULL THEN b.seen END)
                 <= greatest(clock, CASE WHEN p_now IS NULL THEN b.seen END) + tol - step
            THEN 1 ELSE 0 END,
        allowed = b.allowed + CASE
            WHEN greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END,
                          clock, CASE WHEN p_now IS NULL THEN b.seen END)
                 <= greatest(clock, CASE WHEN p_now IS NULL THEN b.seen END) + tol - step
            THEN p_cost ELSE 0 END,
        denied = b.denied + CASE
            WHEN greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END,
                          clock, CASE WHEN p_now IS NULL THEN b.seen END)
                 <= greatest(clock, CASE WHEN p_now IS NULL THEN b.seen END) + tol - step
            THEN 0 ELSE p_cost END,
        last_ok = greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END,
                           clock, CASE WHEN p_now IS NULL THEN b.seen END)
                  <= greatest(clock, CASE WHEN p_now IS NULL THEN b.seen END) + tol - step,
        algorithm = 'gcra', tier = p_tier, lim = p_lim, period = p_period, cap = p_cap,
        seen = greatest(clock, CASE WHEN p_now IS NULL THEN b.seen END)
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
        t = CASE
            WHEN least(EXCLUDED.count,
                       greatest(0, (greatest(clock, CASE WHEN p_now IS NULL THEN b.seen END) + tol
                                    - greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END,
                                               clock, CASE WHEN p_now IS NULL THEN b.seen END))
                                   / step)) > 0
            THEN greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END,
                          clock, CASE WHEN p_now IS NULL THEN b.seen END)
                 + least(EXCLUDED.count,
                         greatest(0, (greatest(clock, CASE WHEN p_now IS NULL THEN b.seen END) + tol
                                      - greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END,
                                                 clock, CASE WHEN p_now IS NULL THEN b.seen END))
                                     / step)) * step
            ELSE b.t END,
        expires = CASE
            WHEN least(EXCLUDED.count,
                       greatest(0, (greatest(clock, CASE WHEN p_now IS NULL THEN b.seen END) + tol
                                    - greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END,
                                               clock, CASE WHEN p_now IS NULL THEN b.seen END))
                                   / step)) > 0
            THEN greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END,
                          clock, CASE WHEN p_now IS NULL THEN b.seen END)
                 + least(EXCLUDED.count,
                         greatest(0, (greatest(clock, CASE WHEN p_now IS NULL THEN b.seen END) + tol
                                      - greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END,
                                                 clock, CASE WHEN p_now IS NULL THEN b.seen END))
                                     / step)) * step
            ELSE b.expires END,
        prev = least(EXCLUDED.count,
                     greatest(0, (greatest(clock, CASE WHEN p_now IS NULL THEN b.seen END) + tol
                                  - greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END,
                                             clock, CASE WHEN p_now IS NULL THEN b.seen END))
                                 / step)),
        allowed = b.allowed + least(EXCLUDED.count,
                                    greatest(0, (greatest(clock, CASE WHEN p_now IS NULL THEN b.seen END) + tol
                                                 - greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END,
                                                            clock, CASE WHEN p_now IS NULL THEN b.seen END))
                                                / step)) * p_cost,
        denied = b.denied
            + (EXCLUDED.count - least(EXCLUDED.count,
                                      greatest(0, (greatest(clock, CASE WHEN p_now IS NULL THEN b.seen END) + tol
                                                   - greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END,
                                                              clock, CASE WHEN p_now IS NULL THEN b.seen END))
                                                  / step))) * p_cost,
        last_ok = least(EXCLUDED.count,
                        greatest(0, (greatest(clock, CASE WHEN p_now IS NULL THEN b.seen END) + tol
                                     - greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END,
                                                clock, CASE WHEN p_now IS NULL THEN b.seen END))
                                    / step)) = EXCLUDED.count,
        algorithm = 'gcra', tier = p_tier, lim = p_lim, period = p_period, cap = p_cap,
        seen = greatest(clock, CASE WHEN p_now IS NULL THEN b.seen END)
    RETURNING b.key, b.t, b.prev, b.seen;
END IF;
END
$fn$;
