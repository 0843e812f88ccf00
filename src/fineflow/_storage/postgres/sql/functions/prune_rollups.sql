-- prune_rollups(): delete the per-minute counts of minutes that ended p_keep seconds or
-- more before p_now (nanoseconds since the epoch; NULL: the database clock); returns how
-- many rows. Called by cleanup with the storage's stats_retention.
CREATE OR REPLACE FUNCTION {schema}.prune_rollups(p_keep double precision, p_now bigint DEFAULT NULL)
RETURNS int
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
    WITH gone AS (
        DELETE FROM {schema}.rollups
        WHERE minute + interval '1 minute' <= coalesce(
            to_timestamp(p_now / 1e9), clock_timestamp()
        ) - make_interval(secs => p_keep)
        RETURNING 1
    )
    SELECT count(*)::int FROM gone
$fn$;
