-- add_rollups(): add one flush of an instance's per-minute request counts (minutes since
-- the epoch) in one statement; returns how many rows it inserted or updated. Duplicate
-- cells are summed first, and rows are taken in key order, so two instances flushing the
-- same cells at once wait for each other instead of deadlocking.
CREATE OR REPLACE FUNCTION {schema}.add_rollups(
    p_minute bigint[], p_endpoint text[], p_tier text[], p_allowed bigint[], p_denied bigint[]
)
RETURNS int
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
    WITH added AS (
        INSERT INTO {schema}.rollups AS r (minute, endpoint, tier, allowed, denied)
        SELECT to_timestamp(u.m * 60), u.e, u.t, sum(u.a), sum(u.d)
        FROM unnest(p_minute, p_endpoint, p_tier, p_allowed, p_denied) AS u(m, e, t, a, d)
        GROUP BY u.m, u.e, u.t
        ORDER BY u.m, u.e, u.t
        ON CONFLICT (minute, endpoint, tier) DO UPDATE
        SET allowed = r.allowed + excluded.allowed, denied = r.denied + excluded.denied
        RETURNING 1
    )
    SELECT count(*)::int FROM added
$fn$;
