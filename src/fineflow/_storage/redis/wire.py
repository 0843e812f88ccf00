"""Script calls on one server, written and read straight on a pooled connection.

redis-py's pipeline builds each command through several layers of Python and parses each
reply through more; for a batch of script calls that is most of this process's work per
decision. Here a batch is packed into one bytes object, sent in one write, and its replies
are read one by one: the same RESP protocol, the same connection pool (and its limits,
TLS, authentication), about half the client CPU per call. On Redis Cluster the
calls go the same way to each slot's node (all of a node's calls in one write, the nodes
at once); a call a node redirects (MOVED, ASK) was not run, and goes again through
redis-py's cluster pipeline, which follows the redirection and updates its map of slots.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import RedisError, ResponseError

__all__ = ["evalsha_all", "evalsha_on_nodes", "pack_evalsha", "resp"]

# redis-py before 5.3 wants a command name for get_connection(); later versions warn on it.
_NAMED = tuple(int(p) for p in redis.__version__.split(".")[:2] if p.isdigit()) < (5, 3)


def resp(*items: str | int | bytes) -> bytes:
    """``items`` as RESP bulk strings (the arguments of a command, without its header)."""
    parts = []
    for item in items:
        raw = (
            item.encode()
            if isinstance(item, str)
            else b"%d" % item
            if isinstance(item, int)
            else item
        )
        parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(parts)


def pack_evalsha(sha: bytes, keys: Sequence[str], args: bytes, nargs: int) -> bytes:
    """``EVALSHA sha numkeys keys... args...`` in RESP, ``args`` already encoded (``resp``)."""
    head = b"*%d\r\n$7\r\nEVALSHA\r\n" % (3 + len(keys) + nargs)
    return head + resp(sha, len(keys), *keys) + args


async def evalsha_all(pool: ConnectionPool, commands: Sequence[bytes]) -> list[object]:
    """Send packed ``commands`` in one write on one pooled connection; return each reply
    (``bytes``, ``int``, a list, or the ``ResponseError`` the server answered).

    Raises:
        redis.exceptions.ConnectionError, TimeoutError: the connection failed (it is
            dropped, not returned to the pool in an unknown state).
    """
    connection: AbstractConnection = await (
        pool.get_connection("EVALSHA") if _NAMED else pool.get_connection()  # type: ignore[no-untyped-call]
    )
    try:
        await connection.send_packed_command(b"".join(commands), check_health=False)
        replies: list[object] = []
        for _ in commands:
            try:
                replies.append(await connection.read_response(disable_decoding=True))
            except ResponseError as exc:
                replies.append(exc)
        return replies
    except BaseException:
        # Cut short (an error, a cancellation): replies may still be on their way.
        await connection.disconnect(nowait=True)
        raise
    finally:
        await pool.release(connection)


async def evalsha_on_nodes(
    client: RedisCluster, commands: Sequence[tuple[str, bytes]]
) -> list[object]:
    """Send packed ``commands``, each ``(a key of its slot, command)``, to their nodes: one
    write per node, the nodes at once. Return each reply, or the error for it (a node that
    fails fails only its own commands)."""
    await client.initialize()  # (once: the map of slots, on first use)
    replies: list[object] = [None] * len(commands)
    nodes: dict[str, tuple[ClusterNode, list[int]]] = {}
    for i, (key, _) in enumerate(commands):
        try:
            node = client.get_node_from_key(key)
        except RedisError as exc:  # (a slot no node serves: a cluster that is down)
            replies[i] = exc
            continue
        if node is None:
            replies[i] = RedisError(f"no node serves the slot of {key!r}")
            continue
        nodes.setdefault(node.name, (node, []))[1].append(i)

    async def send(node: ClusterNode, indexes: list[int]) -> None:
        try:
            connection = node.acquire_connection()
        except RedisError as exc:  # (too many connections)
            for i in indexes:
                replies[i] = exc
            return
        try:
            await connection.send_packed_command(
                b"".join(commands[i][1] for i in indexes), check_health=False
            )
            for i in indexes:
                try:
                    replies[i] = await connection.read_response(disable_decoding=True)
                except ResponseError as exc:
                    replies[i] = exc
        except (RedisError, OSError) as exc:
            await connection.disconnect(nowait=True)
            for i in indexes:
                if replies[i] is None:
                    replies[i] = exc
        except BaseException:
            await connection.disconnect(nowait=True)
            raise
        finally:
            node.release(connection)

    await asyncio.gather(*(send(node, indexes) for node, indexes in nodes.values()))
    return replies
