-- peek(): read-only, the rows of some (key, endpoint, policy) triples and the database clock.
CREATE OR REPLACE FUNCTION {schema}.peek(p_key text[], p_endpoint text[], p_policy text[])
RETURNS TABLE (ord bigint, algorithm text, t bigint, used bigint, prev bigint, now_ns bigint)
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
SELECT u.ord, b.algorithm, b.t, b.count, b.prev,
       (extract(epoch from clock_timestamp()) * 1000000000)::bigint
FROM unnest(p_key, p_endpoint, p_policy) WITH ORDINALITY AS u(k, e, p, ord)
LEFT JOIN {schema}.buckets AS b ON b.key = u.k AND b.endpoint = u.e AND b.policy = u.p
ORDER BY u.ord
$fn$;
