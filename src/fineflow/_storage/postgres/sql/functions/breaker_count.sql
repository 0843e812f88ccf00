-- breaker_count(): add one instance's tally of a closed breaker's outcomes to the row's
-- shared counting, the SQL form of count_row() in fineflow/_breaker/shared.py (the reference
-- the tests hold it to; the arithmetic is written in the same order, so that the two agree
-- to the last bit). The tally: p_successes and p_failures, p_slow of them slow, p_trailing
-- failures after its last success. It counts for the closed generation p_generation only;
-- a tally of any other is stale and changes nothing.
--   the streak   a tally with a success sets it to p_trailing, one without adds p_failures;
--                p_failure_threshold of it opens the row
--   the window   a sliding window estimated from two fixed ones, the current one and the one
--                before (weighted by how much of it still overlaps): of p_window_calls calls,
--                or (p_window_calls 0) of p_window_s seconds on the database clock;
--                p_failure_rate or p_slow_rate opens the row once it holds p_minimum_calls
-- A NULL threshold or rate is no such policy. The counters belong to the closed generation
-- `counted`: the first tally of a generation starts them afresh. A trip reopens the row as
-- breaker_step() does, for least(p_reset_ms * p_multiplier ^ step, p_cap_ms) * p_shorten,
-- and the trigger breaker_notify() NOTIFYs it. Returns the row after the step, failures
-- being the shared streak (0 unless the row is still that closed generation).
--
-- The row is locked for the step (SELECT ... FOR UPDATE), as in breaker_step(): an instance
-- reports its tally of a breaker every few seconds at most, never once per call.
CREATE OR REPLACE FUNCTION {schema}.breaker_count(
    p_name text, p_generation bigint,
    p_successes bigint, p_failures bigint, p_slow bigint, p_trailing bigint,
    p_failure_threshold int, p_failure_rate double precision, p_slow_rate double precision,
    p_minimum_calls int, p_window_calls int, p_window_s double precision,
    p_reset_ms double precision, p_multiplier double precision, p_cap_ms double precision,
    p_shorten double precision
) RETURNS TABLE (state text, generation bigint, open_ms double precision, failures int)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict use_column
DECLARE
    r          {schema}.breakers%ROWTYPE;
    v_ts       timestamptz := clock_timestamp();
    v_now      double precision := extract(epoch FROM v_ts);  -- count_row()'s now
    v_gen      bigint;
    v_ended    double precision;  -- time windows ended since window_start
    v_weight   double precision;  -- the share of the previous window still in the sliding one
    v_calls    double precision;  -- the sliding window's estimates
    v_failures double precision;
    v_slow     double precision;
    v_trips    boolean;
BEGIN
    INSERT INTO {schema}.breakers (name) VALUES (p_name) ON CONFLICT (name) DO NOTHING;
    SELECT * INTO r FROM {schema}.breakers b WHERE b.name = p_name FOR UPDATE;
    v_gen := r.generation;

    IF r.state = 'closed' AND r.generation = p_generation THEN
        IF r.counted <> r.generation THEN  -- the first tally of this closed generation
            r.counted := r.generation; r.streak := 0; r.window_start := v_now;
            r.calls := 0; r.failures := 0; r.slow := 0;
            r.previous_calls := 0; r.previous_failures := 0; r.previous_slow := 0;
        END IF;
        IF p_window_calls = 0 AND v_now - r.window_start >= p_window_s THEN
            -- the current window ended: it becomes the previous one (if adjacent)
            v_ended := floor((v_now - r.window_start) / p_window_s);
            r.window_start := r.window_start + v_ended * p_window_s;
            r.previous_calls := CASE WHEN v_ended = 1 THEN r.calls ELSE 0 END;
            r.previous_failures := CASE WHEN v_ended = 1 THEN r.failures ELSE 0 END;
            r.previous_slow := CASE WHEN v_ended = 1 THEN r.slow ELSE 0 END;
            r.calls := 0; r.failures := 0; r.slow := 0;
        END IF;
        -- Saturated where the int column ends (any int threshold is still reached): only
        -- failures without a success under rate policies alone could ever grow it so far.
        r.streak := least(CASE WHEN p_successes > 0 THEN p_trailing
                               ELSE r.streak + p_failures END, 2147483647);
        r.calls := r.calls + (p_successes + p_failures);
        r.failures := r.failures + p_failures;
        r.slow := r.slow + p_slow;
        IF p_window_calls > 0 AND r.calls >= p_window_calls THEN
            r.previous_calls := r.calls; r.previous_failures := r.failures;
            r.previous_slow := r.slow;
            r.calls := 0; r.failures := 0; r.slow := 0;
        END IF;

        IF p_window_calls > 0 THEN
            v_weight := 1 - r.calls::double precision / p_window_calls;
        ELSE
            v_weight := 1 - (v_now - r.window_start) / p_window_s;
        END IF;
        v_calls := r.previous_calls::double precision * v_weight + r.calls;
        v_failures := r.previous_failures::double precision * v_weight + r.failures;
        v_slow := r.previous_slow::double precision * v_weight + r.slow;
        v_trips := coalesce(r.streak >= p_failure_threshold, false);
        IF NOT v_trips AND v_calls >= p_minimum_calls AND v_calls > 0 THEN
            v_trips := coalesce(v_failures / v_calls >= p_failure_rate, false)
                       OR coalesce(v_slow / v_calls >= p_slow_rate, false);
        END IF;

        IF v_trips THEN  -- reopen, as in breaker_step()
            r.open_until := v_ts + least(p_reset_ms * power(p_multiplier, least(r.step, 64)),
                                         p_cap_ms) * p_shorten * interval '1 millisecond';
            r.state := 'open'; r.generation := r.generation + 1; r.step := r.step + 1;
            r.granted := 0; r.successes := 0; r.half_open_since := NULL;
        END IF;

        UPDATE {schema}.breakers b
        SET state = r.state, generation = r.generation, open_until = r.open_until,
            step = r.step, granted = r.granted, successes = r.successes,
            half_open_since = r.half_open_since,
            changed_at = CASE WHEN r.generation <> v_gen THEN v_ts ELSE b.changed_at END,
            counted = r.counted, streak = r.streak, window_start = r.window_start,
            calls = r.calls, failures = r.failures, slow = r.slow,
            previous_calls = r.previous_calls, previous_failures = r.previous_failures,
            previous_slow = r.previous_slow
        WHERE b.name = p_name;
    END IF;

    state := r.state;
    generation := r.generation;
    open_ms := CASE WHEN r.state = 'open'
                    THEN greatest(extract(epoch FROM r.open_until - v_ts) * 1000, 0)
                    ELSE 0 END;
    failures := CASE WHEN r.state = 'closed' AND r.counted = r.generation
                     THEN r.streak ELSE 0 END;
    RETURN NEXT;
END
$fn$;
