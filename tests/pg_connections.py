"""Counting a test's connections on the PostgreSQL server, by the application name its DSN
carries (to check that a pool is opened when needed and closed with its app)."""

from __future__ import annotations

import anyio
import psycopg


def connections(dsn: str, application_name: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            (application_name,),
        ).fetchone()
    assert row is not None
    return int(row[0])


async def connections_left(dsn: str, application_name: str) -> int:
    """The count once closed connections are gone: a server process leaves
    pg_stat_activity a moment after its client closed, so poll (bounded) for 0."""
    for _ in range(100):
        left = connections(dsn, application_name)
        if left == 0:
            break
        await anyio.sleep(0.05)
    return left
