-- The initial schema (version 1): the state table and the stats view.
--
-- buckets: one row per (key, endpoint, policy). ``t`` is the GCRA TAT or the window start,
-- ``count``/``prev`` the window counters, ``expires`` the time from which the row is
-- equivalent to no row (cleanup deletes such rows), ``seen`` the time of the row's last
-- decision. Only the primary key is indexed and the fill factor leaves room, so decision
-- updates stay HOT. Times are integer nanoseconds since the epoch.
CREATE {unlogged} TABLE IF NOT EXISTS {schema}.buckets (
    key       text    NOT NULL,
    endpoint  text    NOT NULL,
    policy    text    NOT NULL,
    algorithm text    NOT NULL,
    tier      text    NOT NULL DEFAULT '',
    t         bigint  NOT NULL DEFAULT 0,
    count     bigint  NOT NULL DEFAULT 0,
    prev      bigint  NOT NULL DEFAULT 0,
    expires   bigint  NOT NULL DEFAULT 0,
    lim       bigint  NOT NULL,
    period    bigint  NOT NULL,
    cap       bigint  NOT NULL,
    allowed   bigint  NOT NULL DEFAULT 0,
    denied    bigint  NOT NULL DEFAULT 0,
    last_ok   boolean NOT NULL DEFAULT true,
    seen      bigint  NOT NULL DEFAULT 0,
    PRIMARY KEY (key, endpoint, policy)
) WITH (fillfactor = 70);

CREATE OR REPLACE VIEW {schema}.stats AS
SELECT endpoint, tier, count(*) AS keys, sum(allowed)::bigint AS allowed,
       sum(denied)::bigint AS denied
FROM {schema}.buckets
GROUP BY endpoint, tier;
