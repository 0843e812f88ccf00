-- breaker_state(): the shared row of one breaker as (state, generation, open_ms), open_ms
-- being the milliseconds left until the open deadline on the database clock (0 when due or
-- not open): instances add it to their own clock, so their clocks are never compared.
-- A name without a row is closed, generation 0.
CREATE OR REPLACE FUNCTION {schema}.breaker_state(p_name text)
RETURNS TABLE (state text, generation bigint, open_ms double precision)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
SELECT coalesce(b.state, 'closed'),
       coalesce(b.generation, 0),
       CASE WHEN b.state = 'open'
            THEN greatest(extract(epoch FROM b.open_until - clock_timestamp()) * 1000, 0)
            ELSE 0 END::double precision
FROM (SELECT 1) one
LEFT JOIN {schema}.breakers b ON b.name = p_name
$fn$;
