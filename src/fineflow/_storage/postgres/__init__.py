"""The PostgreSQL storage.

Module map (a decision runs top to bottom)::

    storage.py      PostgresStorage: options, open/close, the public methods (the facade)
    connect.py      one direct connection attempt: the server's own reason when it fails
    options.py      the checks of its options (no I/O)
    scheduler.py    its side of coalescing (../coalescing.py): a batch is one statement
    statements.py   which function decides a batch, its parameters, and its rows -> decisions
    errors.py       psycopg errors -> StorageError, in one place
    migrations.py   versioned migrations under an advisory lock; the runtime role's grants
    admin.py        status, reset, cleanup, stats
    stats.py        durable stats: requests counted per minute, written to the rollups table
    cleaner.py      background cleanup (cleanup_every=): a task, one instance at a time
    sqlfiles.py     reads sql/ (package data) and fills in identifiers with psycopg.sql
    sql/            schema.sql, migrations/NNNN_<what>.sql, functions/<name>.sql,
                    queries/<name>.sql, revoke.sql, grant_runtime.sql, versions.sql: the
                    text the database runs
"""
