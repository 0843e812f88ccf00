-- Shared failure counting: every instance counts a closed breaker's outcomes in process and
-- adds them to the breaker's row through breaker_count() (the rules: count_row() in
-- fineflow/_breaker/shared.py). The counters belong to the closed generation `counted`;
-- breaker_count() starts them afresh when that is not the row's generation, so any
-- transition (breaker_step(), unchanged) forgets them without touching them. Additive: the
-- code of versions 1 to 3 keeps running on the table.
ALTER TABLE {schema}.breakers
    -- the generation the counters below belong to (-1: never counted)
    ADD COLUMN IF NOT EXISTS counted           bigint           NOT NULL DEFAULT -1,
    -- failures since the last success, as the tallies arrived
    ADD COLUMN IF NOT EXISTS streak            int              NOT NULL DEFAULT 0,
    -- the start of the current time window: epoch seconds on the database clock
    ADD COLUMN IF NOT EXISTS window_start      double precision NOT NULL DEFAULT 0,
    -- the outcomes of the current window (of time or of calls)
    ADD COLUMN IF NOT EXISTS calls             bigint           NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS failures          bigint           NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS slow              bigint           NOT NULL DEFAULT 0,
    -- ... and of the window before it (weighted by how much of it the sliding window holds)
    ADD COLUMN IF NOT EXISTS previous_calls    bigint           NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS previous_failures bigint           NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS previous_slow     bigint           NOT NULL DEFAULT 0;
