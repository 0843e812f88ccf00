-- hit_many(): a batch of single-quota GCRA requests, grouped per row by the caller: p_n[i]
-- requests of equal cost p_cost[i] on row i. In arrival order request k is admitted iff
-- tat0 + k*c*T - tau <= now, so the number admitted has a closed form:
-- m = min(n, (now + tau - tat0) // (c*T)). One set-based upsert locks the rows in key order
-- and charges m*c on each. EXCLUDED carries the batch's figures: count = c,
-- allowed + denied = n*c, seen = the clock. For GCRA rows ``count`` and ``prev`` are
-- otherwise unused: ``prev`` records m, which RETURNING hands back with the row's TAT.
--
-- Terms of the update (written out where used: ON CONFLICT DO UPDATE has no variables):
--   now = greatest(EXCLUDED.seen, CASE WHEN p_now IS NULL THEN b.seen END)
--         (never earlier than the row's last decision; see hit.sql)
--   T   = EXCLUDED.period / EXCLUDED.lim
--   n   = (EXCLUDED.allowed + EXCLUDED.denied) / EXCLUDED.count
--   tat = greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END, now)
--   m   = least(n, greatest(0, (now + EXCLUDED.cap * T - tat) / (EXCLUDED.count * T)))
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
    t = CASE
        WHEN least((EXCLUDED.allowed + EXCLUDED.denied) / EXCLUDED.count,
                   greatest(0, (greatest(EXCLUDED.seen, CASE WHEN p_now IS NULL THEN b.seen END)
                                + EXCLUDED.cap * (EXCLUDED.period / EXCLUDED.lim)
                                - greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END,
                                           EXCLUDED.seen, CASE WHEN p_now IS NULL THEN b.seen END))
                               / (EXCLUDED.count * (EXCLUDED.period / EXCLUDED.lim)))) > 0
        THEN greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END,
                      EXCLUDED.seen, CASE WHEN p_now IS NULL THEN b.seen END)
             + least((EXCLUDED.allowed + EXCLUDED.denied) / EXCLUDED.count,
                     greatest(0, (greatest(EXCLUDED.seen, CASE WHEN p_now IS NULL THEN b.seen END)
                                  + EXCLUDED.cap * (EXCLUDED.period / EXCLUDED.lim)
                                  - greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END,
                                             EXCLUDED.seen, CASE WHEN p_now IS NULL THEN b.seen END))
                                 / (EXCLUDED.count * (EXCLUDED.period / EXCLUDED.lim))))
               * EXCLUDED.count * (EXCLUDED.period / EXCLUDED.lim)
        ELSE b.t END,
    expires = CASE
        WHEN least((EXCLUDED.allowed + EXCLUDED.denied) / EXCLUDED.count,
                   greatest(0, (greatest(EXCLUDED.seen, CASE WHEN p_now IS NULL THEN b.seen END)
                                + EXCLUDED.cap * (EXCLUDED.period / EXCLUDED.lim)
                                - greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END,
                                           EXCLUDED.seen, CASE WHEN p_now IS NULL THEN b.seen END))
                               / (EXCLUDED.count * (EXCLUDED.period / EXCLUDED.lim)))) > 0
        THEN greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END,
                      EXCLUDED.seen, CASE WHEN p_now IS NULL THEN b.seen END)
             + least((EXCLUDED.allowed + EXCLUDED.denied) / EXCLUDED.count,
                     greatest(0, (greatest(EXCLUDED.seen, CASE WHEN p_now IS NULL THEN b.seen END)
                                  + EXCLUDED.cap * (EXCLUDED.period / EXCLUDED.lim)
                                  - greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END,
                                             EXCLUDED.seen, CASE WHEN p_now IS NULL THEN b.seen END))
                                 / (EXCLUDED.count * (EXCLUDED.period / EXCLUDED.lim))))
               * EXCLUDED.count * (EXCLUDED.period / EXCLUDED.lim)
        ELSE b.expires END,
    algorithm = 'gcra',
    count = EXCLUDED.count,
    prev = least((EXCLUDED.allowed + EXCLUDED.denied) / EXCLUDED.count,
                 greatest(0, (greatest(EXCLUDED.seen, CASE WHEN p_now IS NULL THEN b.seen END)
                              + EXCLUDED.cap * (EXCLUDED.period / EXCLUDED.lim)
                              - greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END,
                                         EXCLUDED.seen, CASE WHEN p_now IS NULL THEN b.seen END))
                             / (EXCLUDED.count * (EXCLUDED.period / EXCLUDED.lim)))),
    allowed = b.allowed
        + least((EXCLUDED.allowed + EXCLUDED.denied) / EXCLUDED.count,
                greatest(0, (greatest(EXCLUDED.seen, CASE WHEN p_now IS NULL THEN b.seen END)
                             + EXCLUDED.cap * (EXCLUDED.period / EXCLUDED.lim)
                             - greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END,
                                        EXCLUDED.seen, CASE WHEN p_now IS NULL THEN b.seen END))
                            / (EXCLUDED.count * (EXCLUDED.period / EXCLUDED.lim))))
          * EXCLUDED.count,
    denied = b.denied
        + ((EXCLUDED.allowed + EXCLUDED.denied) / EXCLUDED.count
           - least((EXCLUDED.allowed + EXCLUDED.denied) / EXCLUDED.count,
                 greatest(0, (greatest(EXCLUDED.seen, CASE WHEN p_now IS NULL THEN b.seen END)
                              + EXCLUDED.cap * (EXCLUDED.period / EXCLUDED.lim)
                              - greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END,
                                         EXCLUDED.seen, CASE WHEN p_now IS NULL THEN b.seen END))
                             / (EXCLUDED.count * (EXCLUDED.period / EXCLUDED.lim)))))
          * EXCLUDED.count,
    last_ok = least((EXCLUDED.allowed + EXCLUDED.denied) / EXCLUDED.count,
                    greatest(0, (greatest(EXCLUDED.seen, CASE WHEN p_now IS NULL THEN b.seen END)
                                 + EXCLUDED.cap * (EXCLUDED.period / EXCLUDED.lim)
                                 - greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END,
                                            EXCLUDED.seen, CASE WHEN p_now IS NULL THEN b.seen END))
                                / (EXCLUDED.count * (EXCLUDED.period / EXCLUDED.lim))))
              = (EXCLUDED.allowed + EXCLUDED.denied) / EXCLUDED.count,
    tier = EXCLUDED.tier, lim = EXCLUDED.lim, period = EXCLUDED.period, cap = EXCLUDED.cap,
    seen = greatest(EXCLUDED.seen, CASE WHEN p_now IS NULL THEN b.seen END)
RETURNING b.key, b.endpoint, b.policy, b.t, b.prev, b.seen;
END
$fn$;
