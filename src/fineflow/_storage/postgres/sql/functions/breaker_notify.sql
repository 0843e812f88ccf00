-- breaker_notify(): the trigger that tells every instance of a change of a breaker's shared
-- row: NOTIFY on the channel 'fineflow_breakers.<schema>', or 'fineflow_breakers.<md5 of
-- the schema>' when that would pass PostgreSQL's 63-byte limit (what PostgresBreakerStore
-- LISTENs to: fineflow._breaker.shared.breaker_channel), with the row as JSON, its deadline as the milliseconds left on the database
-- clock. Fired by the UPDATE of breaker_step() or breaker_count() when the generation
-- changes.
CREATE OR REPLACE FUNCTION {schema}.breaker_notify()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    PERFORM pg_notify(CASE
        WHEN octet_length('fineflow_breakers.' || TG_TABLE_SCHEMA) <= 63
        THEN 'fineflow_breakers.' || TG_TABLE_SCHEMA
        ELSE 'fineflow_breakers.' || md5(TG_TABLE_SCHEMA)
    END, json_build_object(
        'name', NEW.name,
        'state', NEW.state,
        'generation', NEW.generation,
        'open_ms', CASE WHEN NEW.state = 'open'
                        THEN greatest(extract(epoch FROM NEW.open_until - clock_timestamp())
                                      * 1000, 0)
                        ELSE 0 END
    )::text);
    RETURN NULL;
END
$fn$;
