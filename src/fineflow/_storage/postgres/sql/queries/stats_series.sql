-- stats_series(): the per-minute rows from `since` seconds before `now` (ns; NULL: the
-- database clock; a NULL since: every minute), minutes as minutes since the epoch.
WITH clock AS (
    SELECT coalesce(to_timestamp(%(now)s::bigint / 1e9), clock_timestamp()) AS now
)
SELECT (extract(epoch FROM r.minute) / 60)::bigint, r.endpoint, r.tier, r.allowed, r.denied
FROM {schema}.rollups AS r, clock
WHERE %(since)s::float8 IS NULL
   OR r.minute >= date_trunc('minute', clock.now - make_interval(secs => %(since)s::float8))
ORDER BY r.minute, r.endpoint, r.tier
