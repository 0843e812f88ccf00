-- Circuit-breaker state shared between instances (CircuitBreaker(shared=storage)): one row
-- per breaker name, changed only by breaker_step() (one atomic step, see
-- fineflow/_breaker/shared.py for the rules) and read by breaker_state(). Few rows, rarely
-- written: always LOGGED, so an open survives a crash of the database.
CREATE TABLE IF NOT EXISTS {schema}.breakers (
    name            text        PRIMARY KEY,
    state           text        NOT NULL DEFAULT 'closed'
                                CHECK (state IN ('closed', 'open', 'half_open')),
    generation      bigint      NOT NULL DEFAULT 0,  -- bumped by every shared transition
    open_until      timestamptz,                     -- the open deadline (database clock)
    step            int         NOT NULL DEFAULT 0,  -- consecutive opens: the backoff step
    granted         int         NOT NULL DEFAULT 0,  -- trial permits of the half-open round
    successes       int         NOT NULL DEFAULT 0,  -- trial successes of that round
    half_open_since timestamptz,
    changed_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TRIGGER breakers_changed
    AFTER UPDATE ON {schema}.breakers
    FOR EACH ROW WHEN (OLD.generation IS DISTINCT FROM NEW.generation)
    EXECUTE FUNCTION {schema}.breaker_notify();
