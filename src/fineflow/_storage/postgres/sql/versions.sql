-- The bookkeeping of migrations, created before anything else (see migrations.py):
-- schema_migrations lists every version applied; schema_version records the compatibility
-- level, the oldest version whose code can still use the schema, which every fineflow
-- compares with the newest version it knows.
CREATE TABLE IF NOT EXISTS {schema}.schema_version (
    version    int         NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
    version    int         PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);
