-- breaker_step(): one atomic step of a breaker's shared row, the SQL form of step_row() in
-- fineflow/_breaker/shared.py (the reference the tests hold it to). p_action is
--   'open'     a closed row opens (an open or half-open one is returned as it is)
--   'acquire'  a due open row turns half-open; a half-open row grants up to p_want trial
--              permits, at most p_max_calls per round in total, or reopens when the round
--              had no verdict within p_max_wait_ms
--   'success'  a trial of round p_generation succeeded: p_to_close of them close the row
--   'failure'  a trial of round p_generation failed: the row reopens, backed off
--   'close'    reset() by hand
-- A reopen lasts least(p_reset_ms * p_multiplier ^ step, p_cap_ms) * p_shorten. Every change
-- of state bumps the generation, and the trigger breaker_notify() NOTIFYs the row to every
-- instance. Returns the row after the step with the permits granted by it.
--
-- The row is locked for the step (SELECT ... FOR UPDATE): steps are rare (transitions and
-- trial calls, never a closed breaker's calls), and one lock keeps the rules readable.
CREATE OR REPLACE FUNCTION {schema}.breaker_step(
    p_name text, p_action text, p_generation bigint, p_want int,
    p_reset_ms double precision, p_multiplier double precision, p_cap_ms double precision,
    p_shorten double precision, p_max_calls int, p_to_close int, p_max_wait_ms double precision
) RETURNS TABLE (state text, generation bigint, open_ms double precision, granted int)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict use_column
DECLARE
    r       {schema}.breakers%ROWTYPE;
    v_now   timestamptz := clock_timestamp();
    v_gen   bigint;
    v_grant int := 0;
    v_open  boolean := false;  -- this step (re)opens the row
BEGIN
    IF p_action NOT IN ('open', 'acquire', 'success', 'failure', 'close') THEN
        RAISE EXCEPTION 'unknown breaker action %', p_action USING ERRCODE = '22023';
    END IF;
    INSERT INTO {schema}.breakers (name) VALUES (p_name) ON CONFLICT (name) DO NOTHING;
    SELECT * INTO r FROM {schema}.breakers b WHERE b.name = p_name FOR UPDATE;
    v_gen := r.generation;

    IF p_action = 'open' THEN
        v_open := r.state = 'closed';
    ELSIF p_action = 'close' THEN
        r.state := 'closed'; r.generation := r.generation + 1; r.step := 0;
        r.open_until := NULL; r.granted := 0; r.successes := 0; r.half_open_since := NULL;
    ELSIF p_action = 'acquire' THEN
        IF r.state = 'open' AND r.open_until <= v_now THEN
            r.state := 'half_open'; r.generation := r.generation + 1; r.open_until := NULL;
            r.half_open_since := v_now; r.granted := 0; r.successes := 0;
        END IF;
        IF r.state = 'half_open' THEN
            IF r.half_open_since + p_max_wait_ms * interval '1 millisecond' <= v_now THEN
                v_open := true;
            ELSE
                v_grant := greatest(least(p_want, p_max_calls - r.granted), 0);
                r.granted := r.granted + v_grant;
            END IF;
        END IF;
    ELSIF r.state = 'half_open' AND r.generation = p_generation THEN
        IF p_action = 'failure' THEN
            v_open := true;
        ELSIF r.successes + 1 >= p_to_close THEN
            r.state := 'closed'; r.generation := r.generation + 1; r.step := 0;
            r.granted := 0; r.successes := 0; r.half_open_since := NULL;
        ELSE
            r.successes := r.successes + 1;
        END IF;
    END IF;

    IF v_open THEN
        r.open_until := v_now + least(p_reset_ms * power(p_multiplier, least(r.step, 64)),
                                      p_cap_ms) * p_shorten * interval '1 millisecond';
        r.state := 'open'; r.generation := r.generation + 1; r.step := r.step + 1;
        r.granted := 0; r.successes := 0; r.half_open_since := NULL;
    END IF;

    UPDATE {schema}.breakers b
    SET state = r.state, generation = r.generation, open_until = r.open_until, step = r.step,
        granted = r.granted, successes = r.successes, half_open_since = r.half_open_since,
        changed_at = CASE WHEN r.generation <> v_gen THEN v_now ELSE b.changed_at END
    WHERE b.name = p_name;

    state := r.state;
    generation := r.generation;
    open_ms := CASE WHEN r.state = 'open'
                    THEN greatest(extract(epoch FROM r.open_until - v_now) * 1000, 0)
                    ELSE 0 END;
    granted := v_grant;
    RETURN NEXT;
END
$fn$;
