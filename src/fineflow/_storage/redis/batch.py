"""How a request becomes script calls, and the script's replies become decisions.

A request's quotas are decided by one call of ``decide.lua`` (all or nothing, atomically),
except on Redis Cluster when they live in several slots: then each slot's quotas are one
call, and if any call denies, the calls that charged are refunded (see ``refunds``). That
never admits more than the quotas allow; while a charge awaits its refund it may deny a
concurrent request that would have fit, as if the denied request had been admitted and
had then given its cost back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..._errors import StorageError
from ..._ratelimit.algorithms import ALGORITHMS, BucketState, Decision
from ..base import storage_key
from ..coalescing import Request
from .scripts import Names, decide_args, refund_args
from .wire import pack_evalsha, resp

__all__ = ["Call", "answer", "pack", "plan", "refunds"]


@dataclass(slots=True)
class Call:
    """One script call: the quotas (``positions`` in the request's hits) of one slot.

    ``keys`` are their hashes; ``hashes[i]`` is the 1-based index in ``keys`` of the hash
    of the quota at ``positions[i]``.
    """

    request: Request
    positions: list[int]
    keys: list[str]
    hashes: list[int]
    encoded: list[bytes]  # per quota, its arguments after the index, encoded (wire.resp)
    args: list[int | str | bytes]  # the script's arguments (see ``decide.lua``)
    reply: object = None


_INDEXES = [resp(i) for i in range(256)]


def plan(request: Request, names: Names, slot_of: Callable[[str], int] | None) -> list[Call]:
    """The calls deciding ``request``: one, or on a cluster (``slot_of``) one per slot."""
    algorithm = request.algorithm
    now = "" if request.now is None else request.now
    groups: dict[int, Call] = {}
    for position, hit in enumerate(request.hits):
        name = names.key(storage_key(hit.key))
        slot = 0 if slot_of is None else slot_of(name)
        call = groups.get(slot)
        if call is None:
            call = groups[slot] = Call(request, [], [], [], [], [algorithm, now, 0])
        if name in call.keys:
            index = call.keys.index(name) + 1
        else:
            call.keys.append(name)
            index = len(call.keys)
        call.positions.append(position)
        call.hashes.append(index)
        args, encoded = decide_args(algorithm, hit.endpoint, hit.tier, hit.quota, hit.cost)
        call.args[2] = len(call.positions)
        call.args.append(index)
        call.args += args
        call.encoded.append(encoded)
    return list(groups.values())


def pack(calls: Sequence[Call], sha: bytes) -> bytes:
    """One EVALSHA deciding ``calls`` one after the other (one server), in RESP."""
    keys: list[str] = []
    parts: list[bytes] = []
    count = 0
    for call in calls:
        offset = len(keys)
        keys += call.keys
        request = call.request
        now = "" if request.now is None else request.now
        parts.append(resp(request.algorithm, now, len(call.positions)))
        for index, encoded in zip(call.hashes, call.encoded, strict=True):
            index += offset
            parts.append(_INDEXES[index] if index < len(_INDEXES) else resp(index))
            parts.append(encoded)
        count += 3 + 4 * len(call.positions)
    return pack_evalsha(sha, keys, b"".join(parts), count)


def _parse(reply: object) -> tuple[bool, int, list[BucketState | None]]:
    """The script's reply: ``b"<admitted> <now>"``, then ``b" <t> <used> <prev>"`` per quota."""
    if isinstance(reply, str):  # (a client of yours that decodes responses)
        reply = reply.encode()
    parts = reply.split() if isinstance(reply, bytes) else []
    if len(parts) < 2 or (len(parts) - 2) % 3:
        raise StorageError(f"unexpected reply from the decision script: {reply!r:.200}")
    states: list[BucketState | None] = []
    for i in range(2, len(parts), 3):
        t = parts[i]
        states.append(
            None if t == b"-" else BucketState(int(t), int(parts[i + 1]), int(parts[i + 2]))
        )
    return parts[0] == b"1", int(parts[1]), states


def answer(calls: list[Call]) -> list[Call]:
    """Set the decisions of the request whose ``calls`` have replied; return the calls to
    refund (cluster, several slots, one denied). A failed call fails the request."""
    request = calls[0].request
    algorithm = request.algorithm
    step = ALGORITHMS[algorithm]
    hits = request.hits
    failed = next((c.reply for c in calls if isinstance(c.reply, BaseException)), None)
    parsed = [None if isinstance(c.reply, BaseException) else _parse(c.reply) for c in calls]
    charged = [c for c, p in zip(calls, parsed, strict=True) if p is not None and p[0]]
    if failed is not None:
        request.future.set_exception(
            failed if isinstance(failed, StorageError) else StorageError(repr(failed))
        )
        return charged
    admitted = all(p is not None and p[0] for p in parsed)
    out: list[Decision | None] = [None] * len(hits)
    for call, reply in zip(calls, parsed, strict=True):
        assert reply is not None
        ok, now, states = reply
        verdict = True
        for position, state in zip(call.positions, states, strict=True):
            hit = hits[position]
            decision = step(state, now, hit.quota, hit.cost)[0]
            verdict = verdict and decision.allowed
            if not admitted and decision.allowed:
                decision = step(state, now, hit.quota, 0)[0]  # uncharged: a peek
            out[position] = decision
        if verdict != ok:
            request.future.set_exception(
                StorageError(
                    "the Redis decision script and the reference algorithm disagree "
                    f"({algorithm}); please report this as a fineflow bug"
                )
            )
            return charged if not admitted else []
    request.result = out  # type: ignore[assignment]
    return [] if admitted else charged


def refunds(calls: list[Call]) -> list[tuple[list[str], list[int | str]]]:
    """The refund calls (keys, arguments) for ``calls`` that charged and must give back."""
    out = []
    for call in calls:
        request = call.request
        _, now, states = _parse(call.reply)
        args: list[int | str] = ["refund", request.algorithm]
        step = ALGORITHMS[request.algorithm]
        for position, state, index in zip(call.positions, states, call.hashes, strict=True):
            hit = request.hits[position]
            if hit.cost == 0:
                continue
            new_state = step(state, now, hit.quota, hit.cost)[1]
            assert new_state is not None
            args.append(index)
            args += refund_args(request.algorithm, hit, new_state)
        if len(args) > 2:
            out.append((call.keys, args))
    return out
