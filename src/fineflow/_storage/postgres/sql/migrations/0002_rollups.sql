-- Durable stats: per-minute counts of allowed and denied requests by endpoint and tier.
--
-- rollups: one row per (minute, endpoint, tier). Instances count requests in process and
-- add their counts every few seconds through add_rollups(); cleanup deletes state rows
-- from buckets but never these, which prune_rollups() deletes once older than the
-- retention. The stats view now counts requests (from the rollups), with the keys that
-- have state stored.
CREATE {unlogged} TABLE IF NOT EXISTS {schema}.rollups (
    minute   timestamptz NOT NULL,
    endpoint text        NOT NULL,
    tier     text        NOT NULL,
    allowed  bigint      NOT NULL DEFAULT 0,
    denied   bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (minute, endpoint, tier)
) WITH (fillfactor = 70);

CREATE OR REPLACE VIEW {schema}.stats AS
SELECT r.endpoint, r.tier, coalesce(s.keys, 0)::bigint AS keys, r.allowed, r.denied
FROM (
    SELECT endpoint, tier, sum(allowed)::bigint AS allowed, sum(denied)::bigint AS denied
    FROM {schema}.rollups
    GROUP BY endpoint, tier
) AS r
LEFT JOIN (
    SELECT endpoint, tier, count(DISTINCT key) AS keys
    FROM {schema}.buckets
    GROUP BY endpoint, tier
) AS s USING (endpoint, tier);
