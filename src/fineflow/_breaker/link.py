"""SharedLink: one breaker's side of the state it shares with other instances.

The breaker's machine still decides every call in process; the link only moves state
between the machine and a ``BreakerStore`` (see ``shared`` for the row and its rules):

* what happens here goes out, in the background, never awaited by a caller: a trip
  publishes an open (``Action.OPEN``); a half-open round asks the store for trial permits
  when a caller was turned away for want of one (``Action.ACQUIRE``, one per such caller,
  so instances with traffic share the round's budget); each trial's verdict is reported
  (``SUCCESS`` / ``FAILURE``); ``reset()`` closes the row for everyone (``CLOSE``).
* what happens elsewhere comes in as a ``SharedState`` (a step's reply, a notification, a
  read) and enters the machine through ``BreakerMachine.adopt`` and ``grant``; anything
  older than the newest generation seen is dropped.
* With ``count=True`` (``shared_failures=True``) a closed breaker's outcomes are counted
  with the other instances' (``BreakerStore.count``, see ``shared``). The outcomes since the
  last report make one ``Tally``, read off the machine's totals (the calls themselves do no
  extra work), sent ``COUNT_INTERVAL`` after a failure or slow call (or after any call while
  the shared streak last seen was above zero: a success ends it), else ``QUIET_INTERVAL``
  after the first call since the last report (the rates need every instance's calls). So an
  instance sends at most one count step per interval, and none while it has no calls. A
  tally waits for a read of the row when the row's generation is not known yet. Outcomes
  from before a new generation (a transition, a reset anywhere) or gathered while the store
  was away are dropped, never sent into a later period.
* One worker task at a time (run by the store, so closing the storage stops it) sends the
  pending work, in order of precedence. When the store fails or is slow, the machine goes on
  with its local budget and verdicts (``follow(False)``), the link says so once (WARNING),
  keeps retrying with backoff, and says once (INFO) when it rejoins, re-reading the row.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

import anyio

from .._logfields import log_extra
from .config import CircuitState
from .machine import BreakerMachine
from .shared import Action, BreakerStore, SharedPolicy, SharedState, Tally, Task

__all__ = ["COUNT_INTERVAL", "QUIET_INTERVAL", "STEP_TIMEOUT", "SharedLink"]

logger = logging.getLogger("fineflow.breaker")

#: Seconds one store step may take before it counts as a failure of the store.
STEP_TIMEOUT = 2.0
#: Seconds outcomes are gathered after a failure before a count step sends them.
COUNT_INTERVAL = 0.1
#: Seconds outcomes without a failure are gathered before a count step sends them.
QUIET_INTERVAL = 1.0
_FIRST_RETRY, _LAST_RETRY = 0.05, 5.0
_C, _O, _H = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN
_SHARED = (_C, _O, _H)


def _why(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class SharedLink:
    """Connects one breaker's machine to a shared store (see the module docstring).

    Args:
        name: the breaker's name, the row's key.
        store: the shared store.
        machine: the breaker's machine (created with ``remote=True``).
        clock: the breaker's monotonic clock.
        random: the breaker's jitter source.
        count: count the closed breaker's outcomes with the other instances'.
    """

    def __init__(
        self,
        name: str,
        store: BreakerStore,
        machine: BreakerMachine,
        *,
        clock: Callable[[], float],
        random: Callable[[], float],
        count: bool = False,
    ) -> None:
        self.name = name
        self._store = store
        self._machine = machine
        self._policy = SharedPolicy.of(machine.config)
        self._clock = clock
        self._random = random
        self.generation = -1  # the newest generation seen (-1: none yet)
        self._round = -1  # the half-open round this instance holds permits of
        self._exhausted = -1  # a round that granted this instance nothing more
        self._adopting = False
        self._listening = False
        self._down: str | None = None  # why the store is unavailable, once said
        self._away = False  # the store failed since the last step that worked
        self._detached = False
        # Pending work for the worker.
        self._close = self._open = self._read = False
        self._closing = False  # this instance's reset is on its way to the store
        self._want = 0
        self._verdicts: deque[tuple[int, Action]] = deque(maxlen=16)
        self._worker: Task | None = None
        self._wake: anyio.Event | None = None  # set to cut the worker's wait for a tally
        # Shared counting: the machine's totals when outcomes were last reported; whether a
        # tally is pending, soon (a failure) or not, since when (the event loop's clock, set
        # by the worker); whether the shared streak last seen was above zero.
        self.counting = count
        self._tally_pending = self._tally_soon = self._streak_up = False
        self._tally_since: float | None = None
        self._reported = (0, 0, 0)
        self._rebase()
        store.watch(name, self)

    # -- what the breaker tells the link ----------------------------------------------------

    def moved(self, old: CircuitState, new: CircuitState, now: float) -> None:
        """A transition of the machine (adopted ones are not sent: they came from the store)."""
        self._rebase()  # outcomes before a transition are not the next generation's
        self._streak_up = False
        if self._adopting:
            return
        if new is _C:
            # Recovered here (while the store was away): an open not yet published is
            # stale, and publishing it now would open every instance for nothing.
            self._open = False
            return
        if new is _O and old is _C:
            self._open = True
        elif new is _O and old is _H:
            self._verdicts.append((self._round_or_generation(), Action.FAILURE))
        else:
            return
        self._kick()

    def heard(self, now: float, failed: bool) -> None:
        """The machine settled its first call since the last report, or (``failed``) its
        first failure or slow call of a closed breaker: a tally is due (see the module
        docstring)."""
        if not self.counting or self._detached:
            return
        soon = failed or self._streak_up
        if self._tally_pending and (self._tally_soon or not soon):
            return
        self._tally_pending = True
        self._tally_soon |= soon
        self._kick()
        if self._worker is None:
            # The store cannot run it (closed, or no event loop): drop it and hear the next
            # failure (only: a closed storage must not cost every call a try).
            self._drop_tally()
            self._machine.outcomes_reported(failures_only=True)

    def trial_succeeded(self, now: float) -> None:
        """A trial call succeeded; the store counts it towards closing."""
        self._verdicts.append((self._round_or_generation(), Action.SUCCESS))
        self._kick()

    def rejected(self) -> None:
        """A caller was turned away: in a shared half-open round, ask for a permit."""
        m = self._machine
        if m.state is _H and m.remote and self._exhausted != self.generation:
            self._want = min(self._want + 1, self._policy.half_open_max_calls)
            self._kick()

    def reset(self) -> None:
        """``reset()`` by hand: close the row for every instance."""
        self._rebase()  # the failures forgotten here are not reported
        self._open = False
        self._verdicts.clear()
        self._want = 0
        self._close = True
        self._kick()

    async def sync(self) -> bool:
        """Read the row now and adopt it; ``False`` if the store failed (logged)."""
        sent = self.generation
        try:
            with anyio.fail_after(STEP_TIMEOUT):
                state = await self._store.read(self.name)
        except Exception as exc:
            self._unavailable(_why(exc))
            return False
        self._available()
        self._apply(state, read=self.generation == sent)
        self._kick()
        return True

    def detach(self) -> None:
        """Stop watching the store and cancel the background work."""
        self._detached = True
        self._store.unwatch(self.name, self)
        if self._worker is not None:
            self._worker.cancel()
            self._worker = None

    # -- what the store tells the link (Watcher) ---------------------------------------------

    def changed(self, state: SharedState) -> None:
        """A notification: another instance (or this one) changed the row."""
        self._apply(state)

    def connected(self) -> None:
        """Notifications flow (again): re-read, changes may have been missed."""
        self._listening = True
        self._read = True
        self._kick()

    def disconnected(self, reason: str) -> None:
        """Notifications stopped; the store restarts them by itself."""
        self._listening = False
        self._unavailable(reason)

    # -- the worker ---------------------------------------------------------------------------

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()
        if self._worker is None and not self._detached and self._pending():
            self._worker = self._store.spawn(self._work)

    def _pending(self) -> bool:
        return self._urgent() or self._tally_pending

    def _urgent(self) -> bool:
        """Pending work that is sent at once (a tally waits for ``COUNT_INTERVAL``)."""
        return self._close or self._open or bool(self._verdicts) or self._read or self._asking()

    def _asking(self) -> bool:
        m = self._machine
        return self._want > 0 and m.state is _H and m.remote

    async def _work(self) -> None:
        delay = _FIRST_RETRY
        try:
            while not self._detached and self._pending():
                if not self._urgent() and not self._tally_due():
                    await self._gather()
                    continue
                try:
                    with anyio.fail_after(STEP_TIMEOUT):
                        await self._send_one()
                except Exception as exc:
                    self._unavailable(_why(exc))
                    await anyio.sleep(delay)
                    delay = min(delay * 2, _LAST_RETRY)
                else:
                    delay = _FIRST_RETRY
        finally:
            self._worker = None
            self._wake = None

    def _tally_at(self) -> float | None:
        """When the pending tally is to be sent (``None``: none, or not yet timed)."""
        since = self._tally_since
        if since is None or not self._tally_pending:
            return None
        return since + (COUNT_INTERVAL if self._tally_soon else QUIET_INTERVAL)

    def _tally_due(self) -> bool:
        at = self._tally_at()
        return at is not None and anyio.current_time() >= at

    async def _gather(self) -> None:
        """Wait until the pending tally is due, or other work comes in (or a failure makes
        the tally due sooner)."""
        if self._tally_since is None:
            self._tally_since = anyio.current_time()
        at = self._tally_at()
        if at is None:
            return
        self._wake = anyio.Event()
        with anyio.move_on_after(at - anyio.current_time()):
            await self._wake.wait()
        self._wake = None

    def _drop_tally(self) -> None:
        self._tally_pending = self._tally_soon = False
        self._tally_since = None

    async def _send_one(self) -> None:
        """Send the most important pending item.

        The item is taken off the pending work before it is sent, so what callers add
        meanwhile (a reset, another verdict, more asks) is neither lost nor dropped in its
        place. A step the store refused goes back to be sent again; a step cut off by
        ``STEP_TIMEOUT`` (a cancellation) does not: it may have been applied, and sending it
        twice could count a verdict twice or hand out a round's permits twice. The link
        re-reads the row instead.
        """
        store, name, policy = self._store, self.name, self._policy
        shorten = 1.0 - self._machine.config.jitter * self._random()
        if self._close:
            self._close, self._closing = False, True
            try:
                state = await store.step(name, Action.CLOSE, policy)
            except Exception:
                self._close, self._closing = True, False
                raise
        elif self._open:
            self._open = False
            try:
                state = await store.step(name, Action.OPEN, policy, shorten=shorten)
            except Exception:
                self._open = self._machine.state is _O  # unless it recovered meanwhile
                raise
        elif self._verdicts:
            item = self._verdicts.popleft()
            generation, action = item
            try:
                state = await store.step(
                    name, action, policy, generation=generation, shorten=shorten
                )
            except Exception:
                self._verdicts.appendleft(item)
                raise
        elif self._tally_due() and not self._read and self.generation >= 0:
            await self._report()
            return
        elif self._asking():
            want, self._want = self._want, 0
            try:
                state = await store.step(name, Action.ACQUIRE, policy, want=want, shorten=shorten)
            except Exception:
                self._want = min(self._want + want, policy.half_open_max_calls)
                raise
            self._available()
            await self._granted(state)
            return
        else:
            self._read = False
            sent = self.generation
            state = await store.read(name)
            self._available()
            self._apply(state, read=self.generation == sent)
            return
        self._available()
        self._apply(state, own=True)
        self._closing = False  # (this instance's own close, confirmed: see _apply)

    async def _report(self) -> None:
        """Send the outcomes counted since the last report (a count step). A tally that
        fails to go is dropped, not sent again: the step may have been applied."""
        self._drop_tally()
        tally = self._take_tally()
        if tally.calls == 0:
            return
        shorten = 1.0 - self._machine.config.jitter * self._random()
        generation = self.generation
        state = await self._store.count(
            self.name, tally, self._policy, generation=generation, shorten=shorten
        )
        self._available()
        self._apply(state, own=True, why="failures counted across instances")
        self._streak_up = state.state is _C and state.failures > 0
        if self._streak_up and self._tally_pending:
            self._tally_soon = True  # calls settled during the round trip may end it

    def _take_tally(self) -> Tally:
        """The closed breaker's outcomes since the last report (none outside CLOSED)."""
        m = self._machine
        successes, failures, slow = (
            m.successes - self._reported[0],
            m.failures - self._reported[1],
            m.slow_calls - self._reported[2],
        )
        self._rebase()
        m.outcomes_reported()
        if m.state is not _C:
            return Tally()
        trailing = m.consecutive_failures if successes else failures
        return Tally(successes, failures, slow, min(trailing, failures))

    def _rebase(self) -> None:
        m = self._machine
        self._reported = (m.successes, m.failures, m.slow_calls)

    async def _granted(self, state: SharedState) -> None:
        same = state.generation == self.generation
        self._apply(state, own=True)
        m = self._machine
        if state.state is _H and state.generation == self.generation:
            if state.granted:
                self._round = state.generation
                m.grant(state.granted)
            else:
                self._exhausted = state.generation
        elif state.state is _O and same and m.state is _H:
            # This instance's deadline passed before the store's: ask again at the store's
            # (at most a second from now, so other work of this breaker is not held up).
            await anyio.sleep(min(state.open_for, 1.0))
            self._want = max(self._want, 1)

    # -- store availability ------------------------------------------------------------------

    def _unavailable(self, reason: str) -> None:
        self._machine.follow(False)
        self._read = True  # re-read on rejoining
        self._away = True
        if self._down is None:
            self._down = reason
            logger.warning(
                "circuit breaker %r: shared state unavailable (%s); going on with local state",
                self.name,
                reason,
                extra=log_extra(
                    "circuit_breaker_shared_unavailable", breaker=self.name, reason=reason
                ),
            )
        self._kick()

    def _available(self) -> None:
        self._machine.follow(True)
        if self._away:
            # The outcomes gathered while the store was away are dropped, not sent late as
            # one batch into whatever window is current by now.
            self._away = False
            self._rebase()
        if self._down is not None and self._listening:
            logger.info(
                "circuit breaker %r: shared state available again (was: %s)",
                self.name,
                self._down,
                extra=log_extra("circuit_breaker_shared_available", breaker=self.name),
            )
            self._down = None

    # -- adopting what the store says ----------------------------------------------------------

    def _round_or_generation(self) -> int:
        return self._round if self._round >= 0 else self.generation

    def _apply(
        self, shared: SharedState, *, read: bool = False, own: bool = False, why: str = ""
    ) -> None:
        """Bring the machine to the shared state (see the module docstring); ``own``: the
        reply to this instance's step, ``read``: a full read (taken even if older, as after
        the store lost its rows) during which no newer state came in (a notification that
        overtook the read's reply is newer than the read)."""
        if shared.generation < self.generation and not read:
            return  # older than what this instance already adopted (delivered late)
        fresh = shared.generation != self.generation
        known = self.generation >= 0  # (the first read is no new period: just the first news)
        self.generation = shared.generation
        local, target = self._machine.state, shared.state
        if local not in _SHARED:
            return  # a state set by hand stays until reset()
        if target is local:
            if target is _O or (target is _H and fresh):
                self._adopt(target, shared, "")  # a new deadline, or a new round
            elif target is _C and fresh and known and not self._closing:
                # A new closed period decided elsewhere (a reset, or a close this instance
                # missed): start it afresh here too, and report nothing from before it.
                self._rebase()
                self._adopt(target, shared, "")
            return
        if not fresh or self._close or (self._open and target is _C):
            # Same generation, another state: this instance moved ahead (a trip, a verdict,
            # a reset) and its own step is on its way; or the open here is early.
            return
        if target is _C:
            reason = (
                "trial calls succeeded across instances" if own else "closed by another instance"
            )
        elif target is _O and why and local is _C:
            reason = why
        elif target is _O:
            reason = "reopened by another instance" if local is _H else "opened by another instance"
        else:
            reason = "half-open across instances"
        self._adopt(target, shared, reason)

    def _adopt(self, state: CircuitState, shared: SharedState, reason: str) -> None:
        self._adopting = True
        try:
            self._machine.adopt(state, self._clock(), open_for=shared.open_for, reason=reason)
        finally:
            self._adopting = False
