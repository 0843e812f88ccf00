"""The storage conformance suite, for fineflow's storages and yours.

Every storage fineflow ships passes these tests; a storage of your own (anything that
implements :class:`fineflow.Storage`) can run them against itself. Subclass
:class:`StorageConformance` in a test module whose name pytest collects, name the class
``Test...``, and give it a ``storage`` fixture yielding an open, empty storage::

    import pytest
    from fineflow.testing.conformance import StorageConformance

    class TestMyStorage(StorageConformance):
        expires_by_itself = True  # my storage expires state by itself; cleanup() returns 0

        @pytest.fixture
        async def storage(self):
            async with MyStorage("…") as storage:
                yield storage

Needs pytest, Hypothesis and anyio's pytest plugin (anyio comes with fineflow; the
``fineflow[test]`` extra has the others). The tests are marked ``anyio``: they run on the
backends of the ``anyio_backend`` fixture (define it in your module or ``conftest.py`` to
choose, e.g. ``return "asyncio"``).

What is checked: decisions for the three algorithms (``gcra``, ``fixed_window``,
``sliding_window``) against fineflow's pure reference functions, on fixed times passed as
``now`` (a storage must honour ``now`` when it is given) and in Hypothesis-generated
sequences; isolation of keys, endpoints, quotas and tiers; several quotas decided all or
nothing; expiry and ``cleanup()``; ``status()``, ``reset()`` and peeks (``cost=0``); hostile
keys; bad costs rejected with ``ValueError``; an impossible cost denied with no
``retry_after``; concurrent requests decided as in some serial order.
"""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import ClassVar

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .._ratelimit.algorithms import ALGORITHMS, NS, BucketState, Decision, step_all
from .._ratelimit.quota import Quota
from .._storage.base import Hit, MinuteStats, StatsRow, Storage

__all__ = ["T0", "StatsConformance", "StorageConformance"]

T0 = 1_700_000_000 * NS
"""The time (nanoseconds since the epoch) the suite's decisions are made at."""

_QUOTAS = [Quota(3, 1.0), Quota(5, 2.5, burst=2), Quota(4, 10.0)]
_OPS = st.lists(
    st.tuples(
        st.integers(0, 2),  # key
        st.lists(st.integers(0, 2), min_size=1, max_size=2, unique=True),  # quota indexes
        st.integers(0, 3),  # cost
        st.integers(0, 2 * NS),  # time step
    ),
    min_size=1,
    max_size=25,
)
_HOSTILE_KEYS = [
    "",
    "x" * 1_000_000,
    "nul\x00byte",
    "\udcff-surrogate",
    "'; DROP TABLE x; --",
    "ü" * 100,
]


def _endpoint() -> str:
    """An endpoint name of its own, so tests sharing a storage never meet."""
    return f"e{secrets.token_hex(4)}"


async def _one(storage: Storage, algorithm: str, hit: Hit, now: int = T0) -> Decision:
    return (await storage.decide(algorithm, [hit], now=now))[0]


@pytest.mark.anyio
class StorageConformance:
    """The conformance tests; subclass it as ``Test...`` with a ``storage`` fixture that
    yields an open storage, fresh or at least with keys no other test writes (the tests name
    their endpoints at random, so one storage may serve them all). See the module.

    Attributes:
        expires_by_itself: ``True`` when the storage removes expired state on its own
            (Redis's PEXPIRE): its ``cleanup()`` must then return 0. ``False`` (the default)
            when ``cleanup()`` does the removing and must report at least one row.
    """

    expires_by_itself: ClassVar[bool] = False

    def arrival_order(self, storage: Storage) -> None:
        """Called before the concurrent test: make requests sent at once reach the storage's
        state in arrival order if it can (fineflow's PostgreSQL tests keep one statement in
        flight). The default does nothing: a storage deciding each request atomically in
        arrival order needs nothing."""

    @pytest.mark.parametrize("algorithm", list(ALGORITHMS))
    async def test_first_requests_allowed_then_blocked(
        self, storage: Storage, algorithm: str
    ) -> None:
        quota, endpoint = Quota(3, 60.0), _endpoint()
        out = [await _one(storage, algorithm, Hit("u", quota, 1, endpoint)) for _ in range(5)]
        assert [d.allowed for d in out] == [True, True, True, False, False]
        assert [d.remaining for d in out[:3]] == [2, 1, 0]
        assert out[3].retry_after is not None and out[3].retry_after > 0
        assert out[3].policy == quota.policy and out[3].limit == 3

    async def test_users_endpoints_and_policies_are_isolated(self, storage: Storage) -> None:
        quota, endpoint, other = Quota(1, 60.0), _endpoint(), _endpoint()
        assert (await _one(storage, "gcra", Hit("alice", quota, 1, endpoint))).allowed
        assert (await _one(storage, "gcra", Hit("bob", quota, 1, endpoint))).allowed
        assert (await _one(storage, "gcra", Hit("alice", quota, 1, other))).allowed
        assert (await _one(storage, "gcra", Hit("alice", Quota(1, 30.0), 1, endpoint))).allowed
        assert not (await _one(storage, "gcra", Hit("alice", quota, 1, endpoint))).allowed

    async def test_tiers_have_their_own_quotas(self, storage: Storage) -> None:
        endpoint = _endpoint()
        free, pro = Quota(2, 60.0, name="free"), Quota(5, 60.0, name="pro")
        admitted = {}
        for tier, quota in (("free", free), ("pro", pro)):
            hit = Hit(f"user-{tier}", quota, 1, endpoint, tier)
            admitted[tier] = sum([(await _one(storage, "gcra", hit)).allowed for _ in range(8)])
        assert admitted == {"free": 2, "pro": 5}
        rows = await storage.stats()
        assert all(isinstance(row, StatsRow) for row in rows)

    async def test_all_or_nothing_over_several_quotas(self, storage: Storage) -> None:
        endpoint = _endpoint()
        per_second, per_day = Quota(2, 1.0), Quota(3, 86400.0)
        hits = [Hit("k", per_second, 1, endpoint), Hit("k", per_day, 1, endpoint)]
        first = await storage.decide("gcra", hits, now=T0)
        second = await storage.decide("gcra", hits, now=T0)
        third = await storage.decide("gcra", hits, now=T0)
        assert [d.allowed for d in first] == [True, True]
        assert [d.allowed for d in second] == [True, True]
        assert [d.allowed for d in third] == [False, True]
        assert third[1].remaining == 1  # the day quota was not charged
        later = await storage.decide("gcra", hits, now=T0 + 2 * NS)
        assert [d.allowed for d in later] == [True, True]
        blocked = await storage.decide("gcra", hits, now=T0 + 4 * NS)
        assert [d.allowed for d in blocked] == [True, False]

    async def test_window_slides_and_state_expires(self, storage: Storage) -> None:
        hit = Hit("w", Quota(2, 1.0), 1, _endpoint())
        assert [(await _one(storage, "gcra", hit)).allowed for _ in range(3)] == [
            True,
            True,
            False,
        ]
        assert (await _one(storage, "gcra", hit, T0 + NS // 2)).allowed
        removed = await storage.cleanup(now=T0 + 10 * NS)
        if self.expires_by_itself:
            assert removed == 0  # nothing left for cleanup() to do
        else:
            assert removed >= 1
        assert await storage.status("w", now=T0 + 10 * NS) == []
        assert await storage.cleanup(now=T0 + 10 * NS) == 0

    async def test_status_reset_and_peek(self, storage: Storage) -> None:
        quota, endpoint = Quota(5, 60.0), _endpoint()
        for _ in range(2):
            await _one(storage, "gcra", Hit("s", quota, 1, endpoint, "pro"))
        (status,) = await storage.status("s", now=T0)
        assert (status.endpoint, status.policy, status.tier) == (endpoint, quota.policy, "pro")
        assert status.decision.remaining == 3
        assert (status.allowed_total, status.denied_total) == (2, 0)
        peek = await _one(storage, "gcra", Hit("s", quota, 0, endpoint))
        assert peek.allowed and peek.remaining == 3
        assert await storage.reset("s") == 1
        assert await storage.status("s", now=T0) == []
        assert (await _one(storage, "gcra", Hit("s", quota, 1, endpoint))).remaining == 4

    @pytest.mark.parametrize("key", _HOSTILE_KEYS, ids=range(len(_HOSTILE_KEYS)))
    async def test_any_key_is_a_correct_decision(self, storage: Storage, key: str) -> None:
        hit = Hit(key, Quota(1, 60.0), 1, _endpoint())
        assert (await _one(storage, "gcra", hit)).allowed
        assert not (await _one(storage, "gcra", hit)).allowed

    @pytest.mark.parametrize("cost", [-1, 1.5, True, "1"])
    async def test_bad_costs_are_clear_errors(self, storage: Storage, cost: object) -> None:
        with pytest.raises(ValueError, match="cost"):
            await _one(storage, "gcra", Hit("c", Quota(1, 1.0), cost))  # type: ignore[arg-type]

    async def test_enormous_cost_is_denied_not_crashed(self, storage: Storage) -> None:
        decision = await _one(storage, "gcra", Hit("c", Quota(1, 1.0), 10**30, _endpoint()))
        assert not decision.allowed and decision.retry_after is None

    @pytest.mark.parametrize("algorithm", list(ALGORITHMS))
    @settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(ops=_OPS)
    async def test_backend_matches_reference_model(
        self, storage: Storage, algorithm: str, ops: list[tuple[int, list[int], int, int]]
    ) -> None:
        """Random sequences of requests (keys, several quotas, costs, time steps) get the
        decisions of the reference functions."""
        endpoint = _endpoint()
        model: dict[tuple[int, int], BucketState | None] = {}
        now = T0
        for key, quota_ids, cost, gap in ops:
            now += gap
            quotas = [_QUOTAS[i] for i in quota_ids]
            states = [model.get((key, i)) for i in quota_ids]
            expected, new_states = step_all(algorithm, states, now, quotas, cost)
            for i, state in zip(quota_ids, new_states, strict=True):
                model[(key, i)] = state
            hits = [Hit(str(key), q, cost, endpoint) for q in quotas]
            assert await storage.decide(algorithm, hits, now=now) == expected

    @pytest.mark.parametrize("algorithm", list(ALGORITHMS))
    @settings(max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(
        batch=st.lists(st.integers(0, 3), min_size=1, max_size=40),
        gap=st.integers(0, 3 * NS),
    )
    async def test_concurrent_requests_match_the_model_in_arrival_order(
        self, storage: Storage, algorithm: str, batch: list[int], gap: int
    ) -> None:
        """Many requests at once get the decisions the model gives when it takes them one
        by one in arrival order (see :meth:`arrival_order`). Each key has one cost."""
        self.arrival_order(storage)
        endpoint, quota, now = _endpoint(), _QUOTAS[0], T0 + gap
        costs = {0: 1, 1: 2, 2: 1, 3: 3}
        arrivals: list[int] = []  # the order the requests reach decide() (trio shuffles)
        got: list[Decision | None] = [None] * len(batch)

        async def send(i: int, key: int) -> None:
            arrivals.append(i)
            got[i] = await _one(storage, algorithm, Hit(str(key), quota, costs[key], endpoint), now)

        async with anyio.create_task_group() as group:
            for i, key in enumerate(batch):
                group.start_soon(send, i, key)
        model: dict[int, BucketState | None] = {}
        expected: list[Decision | None] = [None] * len(batch)
        for i in arrivals:
            key = batch[i]
            decisions, states = step_all(algorithm, [model.get(key)], now, [quota], costs[key])
            model[key], expected[i] = states[0], decisions[0]
        assert got == expected


class StatsConformance:
    """The checks of per-minute request stats, for a storage that also has
    ``stats(since=, by=, now=)`` and ``stats_series()`` (every fineflow storage has).
    Mix it in beside :class:`StorageConformance`::

        class TestMyStorage(StorageConformance, StatsConformance): ...

    Attributes:
        counts_keys: ``False`` when the storage reports ``keys`` as 0 (counting them would
            take a scan, as on Redis).
    """

    counts_keys: ClassVar[bool] = True

    @staticmethod
    def _stats(storage: Storage) -> MinuteStats:
        assert isinstance(storage, MinuteStats), f"{type(storage).__name__} keeps no stats"
        return storage

    async def test_stats_count_requests_once_by_endpoint_and_tier(self, storage: Storage) -> None:
        """A request counts once per endpoint and tier, whatever its quotas and cost; denied
        when any quota denies; a peek counts nothing."""
        one, two = _endpoint(), _endpoint()
        quotas = [
            Hit("k", Quota(2, 60.0), 1, one, "free"),
            Hit("k", Quota(99, 86400.0), 1, one, "free"),
        ]
        wide = [Hit("k", Quota(5, 60.0), 3, one, "pro"), Hit("g", Quota(1, 60.0), 1, two)]
        seen = [all(d.allowed for d in await storage.decide("gcra", quotas, now=T0)) for _ in "abc"]
        seen += [all(d.allowed for d in await storage.decide("gcra", wide, now=T0)) for _ in "ab"]
        await storage.decide("gcra", [Hit("k", Quota(2, 60.0), 0, one, "free")], now=T0)  # peek
        assert seen == [True, True, False, True, False]
        stats = self._stats(storage)
        rows = {(r.endpoint, r.tier): (r.allowed, r.denied) for r in await stats.stats()}
        assert rows == {(one, "free"): (2, 1), (one, "pro"): (1, 1), (two, ""): (1, 1)}
        by_endpoint = await stats.stats(by=["endpoint"])
        assert [(r.endpoint, r.tier, r.allowed, r.denied) for r in by_endpoint] == sorted(
            [(one, "", 3, 2), (two, "", 1, 1)]
        )
        (total,) = await stats.stats(by=())
        assert (total.endpoint, total.tier, total.allowed, total.denied) == ("", "", 4, 3)
        keys = {(r.endpoint, r.tier): r.keys for r in await stats.stats()}
        if self.counts_keys:
            assert keys == {(one, "free"): 1, (one, "pro"): 1, (two, ""): 1}
        else:
            assert set(keys.values()) == {0}

    async def test_stats_per_minute_and_since(self, storage: Storage) -> None:
        endpoint, quota = _endpoint(), Quota(2, 3600.0)
        at = [T0, T0 + 61 * NS, T0 + 125 * NS, T0 + 126 * NS]  # minutes m0, m1, m2, m2
        for now in at:
            await storage.decide("gcra", [Hit("u", quota, 1, endpoint, "t")], now=now)
        stats = self._stats(storage)
        points = await stats.stats_series()
        m0 = T0 // (60 * NS) * 60
        assert [(int(p.minute.timestamp()) - m0, p.allowed, p.denied) for p in points] == [
            (0, 1, 0),
            (60, 1, 0),
            (120, 0, 2),
        ]
        assert {(p.endpoint, p.tier) for p in points} == {(endpoint, "t")}
        recent = await stats.stats_series(since=60, now=at[-1], by=["tier"])
        assert [(p.endpoint, p.tier, p.allowed, p.denied) for p in recent] == [
            ("", "t", 1, 0),
            ("", "t", 0, 2),
        ]
        (row,) = await stats.stats(since=timedelta(seconds=60), now=at[-1])
        assert (row.allowed, row.denied) == (1, 2)
        for bad in ({"since": -1}, {"since": float("nan")}, {"by": ["user"]}, {"by": "keys"}):
            with pytest.raises(ValueError):
                await stats.stats(**bad)

    async def test_stats_survive_cleanup(self, storage: Storage) -> None:
        endpoint = _endpoint()
        for _ in range(3):
            await storage.decide("gcra", [Hit("u", Quota(2, 1.0), 1, endpoint)], now=T0)
        await storage.cleanup(now=T0 + 600 * NS)  # the state is gone (or expired by itself)
        assert await storage.status("u", now=T0 + 600 * NS) == []
        (row,) = await self._stats(storage).stats()
        assert (row.endpoint, row.keys, row.allowed, row.denied) == (endpoint, 0, 2, 1)
