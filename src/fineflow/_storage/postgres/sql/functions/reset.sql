-- reset(): delete one key's rows (of one endpoint, or all); returns how many.
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
$fn$;
