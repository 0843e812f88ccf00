-- cleanup(): delete up to p_batch expired rows (an expired row is equivalent to no row),
-- skipping rows in use; returns how many. Called until it returns less than p_batch.
CREATE OR REPLACE FUNCTION {schema}.cleanup(p_batch int, p_now bigint DEFAULT NULL)
RETURNS int
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
    WITH clock AS (
        SELECT coalesce(p_now, (extract(epoch from clock_timestamp()) * 1000000000)::bigint)
               AS now
    ), doomed AS (
        SELECT b.ctid FROM {schema}.buckets AS b, clock
        WHERE b.expires <= clock.now
        LIMIT p_batch
        FOR UPDATE OF b SKIP LOCKED
    ), gone AS (
        DELETE FROM {schema}.buckets AS b USING doomed, clock
        WHERE b.ctid = doomed.ctid AND b.expires <= clock.now
        RETURNING 1
    )
    SELECT count(*)::int FROM gone
$fn$;
