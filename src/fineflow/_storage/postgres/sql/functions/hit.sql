-- hit(): a lone request with one GCRA quota, in one INSERT ... ON CONFLICT DO UPDATE that
-- reads the old row only through the table alias ``b`` (atomic with the update). Returns
-- whether it was admitted, the row's TAT afterwards and the time it was decided at; the
-- client derives remaining/reset/retry from those (the reference: gcra_step()).
--
-- Terms of the update (ON CONFLICT DO UPDATE has no per-row variables, so each is written
-- out where it is used):
--   now = greatest(EXCLUDED.seen, CASE WHEN p_now IS NULL THEN b.seen END)
--         the database clock read before the row was locked (EXCLUDED.seen), but no earlier
--         than the row's last decision: a statement that waited for the row decides it at
--         an instant while it holds it. An explicit p_now is taken as given.
--   tat = greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END, now)
--         (a row of another algorithm counts as no row)
--   ok  = p_cost <= p_cap AND tat + (p_cost - p_cap) * p_iv <= now
CREATE OR REPLACE FUNCTION {schema}.hit(
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
INSERT INTO {schema}.buckets AS b
    (key, endpoint, policy, algorithm, tier, t, expires, lim, period, cap,
     allowed, denied, last_ok, seen)
SELECT p_key, p_endpoint, p_policy, 'gcra', p_tier, v.t, v.t, p_lim, p_period, p_cap,
       v.a, p_cost - v.a, v.a > 0 OR p_cost = 0, v.now
FROM (SELECT CASE WHEN p_cost <= p_cap THEN n.now + p_cost * p_iv ELSE 0 END AS t,
             CASE WHEN p_cost <= p_cap THEN p_cost ELSE 0 END AS a,
             n.now
      FROM (SELECT coalesce(p_now, (extract(epoch from clock_timestamp()) * 1000000000)::bigint)
                   AS now) n) v
ON CONFLICT (key, endpoint, policy) DO UPDATE SET
    last_ok =
        p_cost <= p_cap
        AND greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END,
                     EXCLUDED.seen, CASE WHEN p_now IS NULL THEN b.seen END)
            + (p_cost - p_cap) * p_iv
            <= greatest(EXCLUDED.seen, CASE WHEN p_now IS NULL THEN b.seen END),
    t = CASE
        WHEN p_cost <= p_cap
             AND greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END,
                          EXCLUDED.seen, CASE WHEN p_now IS NULL THEN b.seen END)
                 + (p_cost - p_cap) * p_iv
                 <= greatest(EXCLUDED.seen, CASE WHEN p_now IS NULL THEN b.seen END)
        THEN greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END,
                      EXCLUDED.seen, CASE WHEN p_now IS NULL THEN b.seen END)
             + p_cost * p_iv
        ELSE b.t END,
    expires = CASE
        WHEN p_cost <= p_cap
             AND greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END,
                          EXCLUDED.seen, CASE WHEN p_now IS NULL THEN b.seen END)
                 + (p_cost - p_cap) * p_iv
                 <= greatest(EXCLUDED.seen, CASE WHEN p_now IS NULL THEN b.seen END)
        THEN greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END,
                      EXCLUDED.seen, CASE WHEN p_now IS NULL THEN b.seen END)
             + p_cost * p_iv
        ELSE b.expires END,
    algorithm = 'gcra',
    tier = EXCLUDED.tier, lim = EXCLUDED.lim, period = EXCLUDED.period, cap = EXCLUDED.cap,
    allowed = b.allowed + CASE
        WHEN p_cost <= p_cap
             AND greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END,
                          EXCLUDED.seen, CASE WHEN p_now IS NULL THEN b.seen END)
                 + (p_cost - p_cap) * p_iv
                 <= greatest(EXCLUDED.seen, CASE WHEN p_now IS NULL THEN b.seen END)
        THEN p_cost ELSE 0 END,
    denied = b.denied + CASE
        WHEN p_cost <= p_cap
             AND greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END,
                          EXCLUDED.seen, CASE WHEN p_now IS NULL THEN b.seen END)
                 + (p_cost - p_cap) * p_iv
                 <= greatest(EXCLUDED.seen, CASE WHEN p_now IS NULL THEN b.seen END)
        THEN 0 ELSE p_cost END,
    seen = greatest(EXCLUDED.seen, CASE WHEN p_now IS NULL THEN b.seen END)
RETURNING b.last_ok, b.t, b.seen;
END
$fn$;
