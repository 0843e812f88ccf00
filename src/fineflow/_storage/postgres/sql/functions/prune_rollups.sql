-- prune_rollups(): delete at most p_limit per-minute counts of minutes that ended p_keep
-- seconds or more before p_now (nanoseconds since the epoch; NULL: the database clock),
-- oldest first; returns how many rows. Called by cleanup with the storage's
-- stats_retention, batch after batch until fewer than p_limit are deleted, so each
-- statement stays short.
CREATE OR REPLACE FUNCTION {schema}.prune_rollups(
    p_keep double precision, p_now bigint DEFAULT NULL, p_limit int DEFAULT 10000
)
RETURNS int
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
    WITH old AS (
        SELECT minute, endpoint, tier FROM {schema}.rollups
        WHERE minute + interval '1 minute' <= coalesce(
            to_timestamp(p_now / 1e9), clock_timestamp()
        ) - make_interval(secs => p_keep)
        ORDER BY minute
        LIMIT p_limit
    ), gone AS (
        DELETE FROM {schema}.rollups r USING old
        WHERE (r.minute, r.endpoint, r.tier) = (old.minute, old.endpoint, old.tier)
        RETURNING 1
    )
    SELECT count(*)::int FROM gone
$fn$;
