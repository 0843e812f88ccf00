-- Tables and functions are PUBLIC by default; only roles granted by grant_runtime.sql may
-- use them.
REVOKE ALL ON ALL TABLES IN SCHEMA {schema} FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA {schema} FROM PUBLIC;
