-- The runtime role: may decide, peek and read one key's status; no table access.
GRANT USAGE ON SCHEMA {schema} TO {role};
GRANT EXECUTE ON FUNCTION {schema}.hit(
    text, text, text, text, bigint, bigint, bigint, bigint, bigint, bigint
) TO {role};
GRANT EXECUTE ON FUNCTION {schema}.hit_keys(
    bigint, text[], bigint[], text, text, text, bigint, bigint, bigint, bigint
) TO {role};
GRANT EXECUTE ON FUNCTION {schema}.hit_many(
    bigint, text[], text[], text[], text[], bigint[], bigint[], bigint[], bigint[], bigint[]
) TO {role};
GRANT EXECUTE ON FUNCTION {schema}.decide(
    text, bigint[], int[], text[], text[], text[], text[], bigint[], bigint[], bigint[], bigint[]
) TO {role};
GRANT EXECUTE ON FUNCTION {schema}.peek(text[], text[], text[]) TO {role};
GRANT EXECUTE ON FUNCTION {schema}.status(text, bigint) TO {role};
-- ... and add its instance's per-minute request counts (never read or delete them).
GRANT EXECUTE ON FUNCTION {schema}.add_rollups(
    bigint[], text[], text[], bigint[], bigint[]
) TO {role};
-- Shared circuit breakers: read and step their rows (LISTEN needs no grant).
GRANT EXECUTE ON FUNCTION {schema}.breaker_state(text) TO {role};
GRANT EXECUTE ON FUNCTION {schema}.breaker_step(
    text, text, bigint, int, double precision, double precision, double precision,
    double precision, int, int, double precision
) TO {role};
-- ... and add their instance's tallies of a closed breaker's outcomes.
GRANT EXECUTE ON FUNCTION {schema}.breaker_count(
    text, bigint, bigint, bigint, bigint, bigint, int, double precision, double precision,
    int, int, double precision, double precision, double precision, double precision,
    double precision
) TO {role};
