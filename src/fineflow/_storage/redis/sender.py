"""Redis's side of coalescing (:mod:`fineflow._storage.coalescing`): a batch is one round
trip of script calls.

On one server, one EVALSHA decides ``_PER_CALL`` requests, all of a batch's calls in one
write. On a Cluster, one call per request and slot, each node's calls in one write; the
calls of a request charged in several slots are refunded when one denies (see
:mod:`.batch`). A server that answers NOSCRIPT (after a restart or SCRIPT FLUSH) gets the
script again and the calls it did not run go again once.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import AskError, MovedError, NoScriptError, RedisError

from ..._errors import StorageClosedError, StorageError
from ..._logfields import error_text, log_extra
from ..coalescing import Request
from ..rollups import Rollups
from .admin import Client
from .batch import Call, answer, pack, plan, refunds
from .errors import DecisionTimeout, storage_error
from .scripts import DECIDE, Names, load
from .wire import evalsha_all, evalsha_on_nodes

__all__ = ["ScriptSender", "slot"]

logger = logging.getLogger("fineflow.storage")

# Requests decided by one script call on a standalone server: the server runs nothing else
# meanwhile, so a call stays short (a few hundred microseconds); a batch is several calls.
_PER_CALL = 32


def slot(name: str) -> int:
    """The Cluster slot of the key ``name``."""
    return key_slot(name.encode("utf-8", "surrogatepass"))


class ScriptSender:
    """Sends a batch as script calls in one round trip (a
    :class:`~fineflow._storage.coalescing.Sender`).

    Args:
        client: gives the storage's client (raises when the storage is not open).
        names: the storage's key names.
        cluster: whether the client is a ``RedisCluster`` (calls go per slot).
        rollups: where answered requests are counted for the stats (``None``: not counted).

    Attributes:
        refunded: refund calls that succeeded (cluster, several slots, one denied).
    """

    def __init__(
        self,
        client: Callable[[], Client],
        names: Names,
        *,
        cluster: bool,
        rollups: Rollups | None = None,
    ) -> None:
        self._client = client
        self._names = names
        self._slot_of = slot if cluster else None
        self._rollups = rollups
        self.refunded = 0

    def session(self) -> contextlib.nullcontext[Client]:
        """The client: redis-py's pool lends a connection per round trip."""
        return contextlib.nullcontext(self._client())

    async def send(self, session: Client, batch: list[Request]) -> bool:
        """Decide ``batch`` in one round trip (plus one for refunds, if any)."""
        per_request = [plan(r, self._names, self._slot_of) for r in batch]
        await self._execute(session, [c for calls in per_request for c in calls])
        charged: list[Call] = []
        for calls in per_request:
            charged += answer(calls)
        if self._rollups is not None:
            self._rollups.count_answered(batch, time.time_ns())
        if charged:
            await self._refund(session, charged)
        return True

    def failure(self, exc: BaseException) -> StorageError:
        return storage_error("rate-limit decision", exc)

    def out_of_budget(self) -> BaseException:
        return DecisionTimeout("the rate-limit decision ran out of its time budget")

    def closed(self) -> StorageError:
        return StorageClosedError("RedisStorage was closed")

    async def _execute(self, client: Client, calls: list[Call], *, reload: bool = True) -> None:
        """Run ``calls`` (one EVALSHA each, one round trip) and set each ``reply``: the
        script's reply or the error for that call. On one server a lost connection raises
        (the batch fails); on a cluster a node that fails fails its own calls. Calls a
        server answers NOSCRIPT (not run) go again once the script is loaded."""
        replies: list[object]
        if isinstance(client, RedisCluster):
            replies = await self._on_cluster(client, calls)
        else:
            # One script call per _PER_CALL requests, all in one write.
            sha = DECIDE.sha.encode()
            chunks = [calls[i : i + _PER_CALL] for i in range(0, len(calls), _PER_CALL)]
            replies = []
            for chunk, reply in zip(
                chunks,
                await evalsha_all(client.connection_pool, [pack(c, sha) for c in chunks]),
                strict=True,
            ):
                lines = reply.split(b"\n") if isinstance(reply, bytes) else [reply] * len(chunk)
                if len(lines) != len(chunk):
                    raise storage_error("rate-limit decision", ValueError(f"reply {reply!r:.200}"))
                replies += lines
        missing = [c for c, r in zip(calls, replies, strict=True) if isinstance(r, NoScriptError)]
        for call, reply in zip(calls, replies, strict=True):
            if isinstance(reply, BaseException):
                call.reply = storage_error("rate-limit decision", reply)
            else:
                call.reply = reply
        if missing and reload:
            # Not run (the server had no script): load it and send those calls again.
            await load(client, DECIDE)
            await self._execute(client, missing, reload=False)

    async def _on_cluster(self, client: RedisCluster, calls: list[Call]) -> list[object]:
        """The replies of ``calls`` on a cluster: each to its slot's node (see wire.py)."""
        sha = DECIDE.sha.encode()
        replies = await evalsha_on_nodes(client, [(c.keys[0], pack([c], sha)) for c in calls])
        redirected = [i for i, r in enumerate(replies) if isinstance(r, MovedError | AskError)]
        if redirected:
            # Not run (the slot moved, or is moving): redis-py's cluster pipeline follows
            # the redirection and updates the client's map of slots.
            pipe = client.pipeline(transaction=False)
            for i in redirected:
                call = calls[i]
                pipe.evalsha(DECIDE.sha, len(call.keys), *call.keys, *call.args)
            for i, reply in zip(redirected, await pipe.execute(raise_on_error=False), strict=True):
                replies[i] = reply
        return replies

    async def _refund(self, client: Client, charged: list[Call]) -> None:
        """Give back what ``charged`` calls took (a request on several cluster slots that
        was denied, or failed, elsewhere). A refund that fails is logged: the cost stays
        charged until the state expires, which never admits more than the quotas allow."""
        try:
            pipe = client.pipeline(transaction=False)
            for keys, args in refunds(charged):
                pipe.evalsha(DECIDE.sha, len(keys), *keys, *args)
            replies = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            replies = [exc]
        failures = [r for r in replies if isinstance(r, BaseException)]
        self.refunded += len(replies) - len(failures)
        if failures:
            error = error_text(failures[0], (key for call in charged for key in call.keys))
            logger.warning(
                "refund of a denied multi-slot request failed: %s",
                error,
                extra=log_extra("storage_refund_failed", storage="RedisStorage", error=error),
            )
