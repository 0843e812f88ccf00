-- status(): every live row of one key, with the database clock (or p_now).
CREATE OR REPLACE FUNCTION {schema}.status(p_key text, p_now bigint DEFAULT NULL)
RETURNS TABLE (key text, endpoint text, policy text, tier text, algorithm text, t bigint,
               used bigint, prev bigint, lim bigint, period bigint, cap bigint,
               allowed bigint, denied bigint, now_ns bigint)
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
SELECT b.key, b.endpoint, b.policy, b.tier, b.algorithm, b.t, b.count, b.prev, b.lim,
       b.period, b.cap, b.allowed, b.denied, c.now
FROM (SELECT coalesce(p_now, (extract(epoch from clock_timestamp()) * 1000000000)::bigint)
             AS now) c,
     {schema}.buckets AS b
WHERE b.key = p_key AND b.expires > c.now
ORDER BY b.endpoint, b.policy
$fn$;
