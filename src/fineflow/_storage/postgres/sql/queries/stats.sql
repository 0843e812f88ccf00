-- stats(): requests allowed and denied by (endpoint, tier) in the minutes from `since`
-- seconds before `now` (ns; NULL: the database clock; a NULL since: every minute), with
-- the keys that have state stored in each group.
WITH clock AS (
    SELECT coalesce(to_timestamp(%(now)s::bigint / 1e9), clock_timestamp()) AS now
), counted AS (
    SELECT r.endpoint, r.tier, sum(r.allowed)::bigint AS allowed, sum(r.denied)::bigint AS denied
    FROM {schema}.rollups AS r, clock
    WHERE %(since)s::float8 IS NULL
       OR r.minute >= date_trunc('minute', clock.now - make_interval(secs => %(since)s::float8))
    GROUP BY r.endpoint, r.tier
), stored AS (
    SELECT b.endpoint, b.tier, count(DISTINCT b.key) AS keys
    FROM {schema}.buckets AS b
    GROUP BY b.endpoint, b.tier
)
SELECT c.endpoint, c.tier, coalesce(s.keys, 0)::bigint, c.allowed, c.denied
FROM counted AS c
LEFT JOIN stored AS s USING (endpoint, tier)
ORDER BY 1, 2
