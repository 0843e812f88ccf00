"""``health_app``: an ASGI readiness endpoint from the storages' health and breakers' states.

Theory of operation
-------------------
Each ``GET`` (or ``HEAD``) checks every storage at once, each within ``timeout`` seconds
(:meth:`SupportsHealth.health`), and reads the state of every breaker (those given and
those of the registry, read at each request). The answer is ``200`` when nothing critical is
down, else ``503``, with a JSON body listing what it found. Critical: by default every
storage, and no breaker (an open breaker around an upstream is reported, ``"status":
"warn"``, but the app can still serve); ``critical_breakers`` names the breakers whose
unhealthy state (``unhealthy_states``, default open and forced open) fails readiness.
The body names storages and breakers and gives one-line reasons; it never holds keys, and
credentials in an error text (a URL's password, ``password=...``) are masked.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from ._asgi.types import Receive, Scope, Send
from ._breaker.breaker import CircuitBreaker
from ._breaker.config import CircuitState
from ._breaker.registry import BreakerRegistry
from ._errors import ConfigurationError
from ._logfields import error_text
from ._storage.base import StorageHealth, SupportsHealth

__all__ = ["health_app"]

_DEFAULT_UNHEALTHY = (CircuitState.OPEN, CircuitState.FORCED_OPEN)
_CREDENTIALS = (
    # scheme://user:password@host: up to the last "@" (a password may hold one, a host not)
    (re.compile(r"(://[^:/@\s]*:)\S*@"), r"\1***@"),
    # password=... in a DSN, a quoted value (spaces, escaped quotes) as a whole
    (re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE), r"\1***"),
)


def health_app(
    *,
    storages: Mapping[str, SupportsHealth] | Sequence[SupportsHealth] = (),
    breakers: Iterable[CircuitBreaker] = (),
    registry: BreakerRegistry | None = None,
    critical_storages: bool | Iterable[str] = True,
    critical_breakers: bool | Iterable[str] = False,
    unhealthy_states: Iterable[CircuitState | str] = _DEFAULT_UNHEALTHY,
    timeout: float = 1.0,
) -> HealthApp:
    """An ASGI app answering a readiness probe: ``200`` or ``503`` with a JSON body.

    Mount it where your probe looks, e.g. ``Mount("/ready", app=ff.health_app(...))`` in
    Starlette, outside any rate limit. ``GET`` and ``HEAD`` are answered (``HEAD`` without
    the body); other methods get ``405``. The body::

        {"status": "pass" | "warn" | "fail",
         "storages": [{"name": "postgres", "healthy": true, "latency_ms": 0.4}, ...],
         "breakers": [{"name": "payments", "state": "open", "critical": false,
                       "retry_after": 12.5}, ...]}

    ``"fail"`` (with ``503``): a critical storage is unhealthy or a critical breaker is in
    one of ``unhealthy_states``; ``"warn"`` (``200``): only non-critical ones are.

    Args:
        storages: the storages to check (:class:`PostgresStorage`, :class:`RedisStorage`,
            :class:`MemoryStorage`, anything with :class:`SupportsHealth`'s ``health()``),
            by name (a mapping), or a list, named by backend (``postgres``, ``postgres-2``).
        breakers: breakers to report.
        registry: a :class:`BreakerRegistry` whose breakers are reported (read at each
            request, so breakers created later appear).
        critical_storages: ``True`` (default: any storage down fails readiness), ``False``
            (reported only, e.g. when the limiter fails open), or the names of those that do.
        critical_breakers: ``False`` (default: reported only), ``True`` (every breaker), or
            the names of the breakers whose unhealthy state fails readiness.
        unhealthy_states: the breaker states that count as unhealthy (default ``open``
            and ``forced_open``).
        timeout: seconds each storage has to answer (default 1.0).

    Raises:
        ConfigurationError: for a storage without ``health()``, duplicate storage names,
            an unknown state, or a timeout that is not a positive number.
    """
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise ConfigurationError(f"timeout must be seconds > 0, got {timeout!r}")
    named = _named_storages(storages)
    if registry is not None and not isinstance(registry, BreakerRegistry):
        raise ConfigurationError("registry must be a fineflow.BreakerRegistry")
    listed = list(breakers)
    if not all(isinstance(b, CircuitBreaker) for b in listed):
        raise ConfigurationError("breakers must be fineflow.CircuitBreaker instances")
    try:
        states = frozenset(CircuitState(s) for s in unhealthy_states)
    except ValueError as exc:
        known = ", ".join(s.value for s in CircuitState)
        raise ConfigurationError(f"unhealthy_states: {exc}; the states are {known}") from exc
    return HealthApp(
        storages=named,
        breakers=listed,
        registry=registry,
        critical_storages=_names(critical_storages, "critical_storages"),
        critical_breakers=_names(critical_breakers, "critical_breakers"),
        unhealthy_states=states,
        timeout=float(timeout),
    )


@dataclass(frozen=True, slots=True)
class HealthApp:
    """The ASGI app :func:`health_app` returns (see there), its options already checked."""

    storages: dict[str, SupportsHealth]
    breakers: list[CircuitBreaker]
    registry: BreakerRegistry | None
    critical_storages: bool | frozenset[str]
    critical_breakers: bool | frozenset[str]
    unhealthy_states: frozenset[CircuitState]
    timeout: float

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer one ASGI connection: ``http`` with the report, ``lifespan`` by
        acknowledging it, ``websocket`` by refusing it."""
        kind = scope["type"]
        if kind == "lifespan":
            await _lifespan(receive, send)
            return
        if kind != "http":
            await send({"type": "websocket.close", "code": 1008})
            return
        method = scope.get("method") or "GET"
        if method not in ("GET", "HEAD"):
            body = json.dumps({"error": "method not allowed; use GET or HEAD"}).encode()
            await _respond(send, 405, body, [(b"allow", b"GET, HEAD")])
            return
        status, report = await self.report()
        body = json.dumps(report).encode()
        await _respond(send, status, b"" if method == "HEAD" else body, length=len(body))

    async def report(self) -> tuple[int, dict[str, Any]]:
        """Check everything now; the HTTP status and the JSON report."""
        healths = await self._check_storages()
        storages, failed = [], False
        for name, health in healths.items():
            storages.append(_storage_entry(name, health))
            if not health.healthy and _is_critical(self.critical_storages, name):
                failed = True
        breakers, warned = [], any(not h.healthy for h in healths.values())
        for breaker in self._breakers():
            critical = _is_critical(self.critical_breakers, breaker.name)
            state = breaker.state
            if state in self.unhealthy_states:
                warned = True
                failed = failed or critical
            breakers.append(_breaker_entry(breaker, state, critical))
        status = "fail" if failed else "warn" if warned else "pass"
        report = {"status": status, "storages": storages, "breakers": breakers}
        return (503 if failed else 200), report

    async def _check_storages(self) -> dict[str, StorageHealth]:
        results: dict[str, StorageHealth] = {}

        async def check(name: str, storage: SupportsHealth) -> None:
            results[name] = await _checked(storage, self.timeout)

        async with anyio.create_task_group() as tg:
            for name, storage in self.storages.items():
                tg.start_soon(check, name, storage)
        return {name: results[name] for name in self.storages}

    def _breakers(self) -> list[CircuitBreaker]:
        seen: list[CircuitBreaker] = list(self.breakers)
        if self.registry is not None:
            ids = {id(b) for b in seen}
            seen.extend(b for b in self.registry if id(b) not in ids)
        return seen


async def _checked(storage: SupportsHealth, timeout: float) -> StorageHealth:  # noqa: ASYNC109
    """``storage.health()``, held to ``timeout`` and to never raising, whoever wrote it."""
    with anyio.move_on_after(timeout + 0.5):
        try:
            return await storage.health(timeout=timeout)
        except Exception as exc:
            return StorageHealth(False, type(storage).__name__, 0.0, error_text(exc))
    return StorageHealth(False, type(storage).__name__, timeout, f"no answer within {timeout:g}s")


def _storage_entry(name: str, health: StorageHealth) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": name,
        "backend": health.backend,
        "healthy": health.healthy,
        "latency_ms": round(health.latency * 1000, 1),
    }
    if health.error is not None:
        entry["error"] = masked(health.error)
    return entry


def _breaker_entry(breaker: CircuitBreaker, state: CircuitState, critical: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": breaker.name, "state": state.value, "critical": critical}
    retry_after = breaker.retry_after()
    if retry_after:
        entry["retry_after"] = round(retry_after, 3)
    return entry


def masked(text: str) -> str:
    """``text`` with credentials masked: a URL's password, a DSN's ``password=``."""
    for pattern, replacement in _CREDENTIALS:
        text = pattern.sub(replacement, text)
    return text


def _named_storages(
    storages: Mapping[str, SupportsHealth] | Sequence[SupportsHealth],
) -> dict[str, SupportsHealth]:
    if isinstance(storages, Mapping):
        pairs = list(storages.items())
    elif isinstance(storages, list | tuple):
        pairs = []
        counts: dict[str, int] = {}
        for storage in storages:
            base = _backend_name(storage)
            counts[base] = counts.get(base, 0) + 1
            pairs.append((base if counts[base] == 1 else f"{base}-{counts[base]}", storage))
    else:
        raise ConfigurationError("storages must be a list of storages or a mapping of names")
    for name, storage in pairs:
        if not isinstance(storage, SupportsHealth):
            raise ConfigurationError(
                f"storage {name!r} ({type(storage).__name__}) has no health() method: "
                "give it async def health(self, *, timeout) -> fineflow.StorageHealth"
            )
    return dict(pairs)


def _backend_name(storage: object) -> str:
    name = type(storage).__name__
    return name.removesuffix("Storage").lower() or name


def _names(option: bool | Iterable[str], what: str) -> bool | frozenset[str]:
    if isinstance(option, bool):
        return option
    names = [] if isinstance(option, str) else list(option)
    if isinstance(option, str) or not all(isinstance(n, str) for n in names):
        raise ConfigurationError(f"{what} must be True, False or a list of names")
    return frozenset(names)


def _is_critical(option: bool | frozenset[str], name: str) -> bool:
    return option if isinstance(option, bool) else name in option


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    extra: Sequence[tuple[bytes, bytes]] = (),
    *,
    length: int | None = None,
) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body) if length is None else length).encode()),
        (b"cache-control", b"no-store"),
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
