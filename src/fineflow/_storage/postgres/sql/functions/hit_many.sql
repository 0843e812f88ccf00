-- hit_many(): a batch of single-quota GCRA requests, grouped per row by the caller: p_n[i]
-- requests of equal cost p_cost[i] on row i. In arrival order request k is admitted iff
-- tat0 + k*c*T - tau <= now, so the number admitted has a closed form:
-- m = min(n, (now + tau - tat0) // (c*T)). One set-based upsert locks the rows in key order
-- and charges m*c on each. EXCLUDED carries the batch's figures: count = c,
-- allowed + denied = n*c, seen = the clock. For GCRA rows ``count`` and ``prev`` are
-- otherwise unused: ``prev`` records m, which RETURNING hands back with the row's TAT.
--
-- The new values come from one sub-select over the old row ``b`` (ON CONFLICT DO UPDATE has
-- no variables; the row is still read only through the alias, atomic with the update):
--   now = the statement's clock (EXCLUDED.seen), no earlier than the row's last decision
--         (see hit.sql); T = the emission interval; n = the requests on the row
--   tat = the row's TAT, or now if it is older or of another algorithm
--   m   = least(n, (now + tau - tat) / (c*T)), at least 0: the requests admitted
CREATE OR REPLACE FUNCTION {schema}.hit_many(
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
INSERT INTO {schema}.buckets AS b
    (key, endpoint, policy, algorithm, tier, t, expires, lim, period, cap,
     count, prev, allowed, denied, last_ok, seen)
SELECT g.k, g.e, g.p, 'gcra', g.tier,
       CASE WHEN g.m > 0 THEN c.now + g.m * g.c * (g.pe / g.l) ELSE 0 END,
       CASE WHEN g.m > 0 THEN c.now + g.m * g.c * (g.pe / g.l) ELSE 0 END,
       g.l, g.pe, g.cp, g.c, g.m, g.m * g.c, (g.n - g.m) * g.c, g.m = g.n, c.now
FROM (SELECT coalesce(p_now, (extract(epoch from clock_timestamp()) * 1000000000)::bigint)
             AS now) c,
     (SELECT u.*, least(u.n, u.cp / u.c) AS m
      FROM unnest(p_key, p_endpoint, p_policy, p_tier, p_lim, p_period, p_cap, p_cost, p_n)
           AS u(k, e, p, tier, l, pe, cp, c, n)) g
ORDER BY g.k, g.e, g.p
ON CONFLICT (key, endpoint, policy) DO UPDATE SET
    (t, expires, prev, allowed, denied, last_ok, seen) = (
        SELECT CASE WHEN d.m > 0 THEN d.tat + d.m * EXCLUDED.count * d.iv ELSE b.t END,
               CASE WHEN d.m > 0 THEN d.tat + d.m * EXCLUDED.count * d.iv ELSE b.expires END,
               d.m,
               b.allowed + d.m * EXCLUDED.count,
               b.denied + (d.n - d.m) * EXCLUDED.count,
               d.m = d.n,
               d.now
        FROM (SELECT least(r.n, greatest(0, (r.now + EXCLUDED.cap * r.iv - r.tat)
                                            / (EXCLUDED.count * r.iv))) AS m,
                     r.n, r.iv, r.tat, r.now
              FROM (SELECT c.now, c.iv, c.n,
                           greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END, c.now) AS tat
                    FROM (SELECT greatest(EXCLUDED.seen, CASE WHEN p_now IS NULL THEN b.seen END)
                                 AS now,
                                 EXCLUDED.period / EXCLUDED.lim AS iv,
                                 (EXCLUDED.allowed + EXCLUDED.denied) / EXCLUDED.count AS n
                         ) c) r) d
    ),
    algorithm = 'gcra',
    count = EXCLUDED.count,
    tier = EXCLUDED.tier, lim = EXCLUDED.lim, period = EXCLUDED.period, cap = EXCLUDED.cap
RETURNING b.key, b.endpoint, b.policy, b.t, b.prev, b.seen;
END
$fn$;
