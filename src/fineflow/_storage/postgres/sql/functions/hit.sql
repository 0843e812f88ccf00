-- hit(): a lone request with one GCRA quota, in one INSERT ... ON CONFLICT DO UPDATE that
-- reads the old row only through the table alias ``b`` (atomic with the update). Returns
-- whether it was admitted, the row's TAT afterwards and the time it was decided at; the
-- client derives remaining/reset/retry from those (the reference: gcra_step()).
--
-- ON CONFLICT DO UPDATE has no variables, so the new values come from one sub-select over
-- the old row ``b`` (still read only through the alias, atomic with the update):
--   now = the database clock read before the row was locked (EXCLUDED.seen), but no
--         earlier than the row's last decision: a statement that waited for the row
--         decides it at an instant while it holds it. An explicit p_now is taken as given.
--   tat = the row's TAT, or now if it is older or of another algorithm
--   ok  = whether the request fits: tat + cost*T - tau <= now
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
    (last_ok, t, expires, allowed, denied, seen) = (
        SELECT d.ok,
               CASE WHEN d.ok THEN d.tat + p_cost * p_iv ELSE b.t END,
               CASE WHEN d.ok THEN d.tat + p_cost * p_iv ELSE b.expires END,
               b.allowed + CASE WHEN d.ok THEN p_cost ELSE 0 END,
               b.denied + CASE WHEN d.ok THEN 0 ELSE p_cost END,
               d.now
        FROM (SELECT p_cost <= p_cap AND r.tat + (p_cost - p_cap) * p_iv <= r.now AS ok,
                     r.tat, r.now
              FROM (SELECT c.now,
                           greatest(CASE WHEN b.algorithm = 'gcra' THEN b.t END, c.now) AS tat
                    FROM (SELECT greatest(EXCLUDED.seen, CASE WHEN p_now IS NULL THEN b.seen END)
                                 AS now) c) r) d
    ),
    algorithm = 'gcra',
    tier = EXCLUDED.tier, lim = EXCLUDED.lim, period = EXCLUDED.period, cap = EXCLUDED.cap
RETURNING b.last_ok, b.t, b.seen;
END
$fn$;
