"""Helpers for the middleware tests: raw ASGI apps, a raw ASGI driver, storage doubles."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from http_sfv.list import List as SfList

from fineflow import (
    Decision,
    Hit,
    KeyStatus,
    MemoryStorage,
    StatsRow,
    StorageClosedError,
    StorageError,
)
from fineflow._asgi.types import Message, Receive, Scope, Send
from fineflow.testing import FakeClock

with warnings.catch_warnings():
    # starlette.testclient prefers the httpx2 fork and warns when it runs on httpx.
    warnings.filterwarnings("ignore", message=".*starlette.testclient.*")
    from starlette.testclient import TestClient, WebSocketDenialResponse

__all__ = [
    "FailingStorage",
    "RecordingStorage",
    "Response",
    "TestClient",
    "WebSocketDenialResponse",
    "call",
    "echo_app",
    "http_scope",
    "sf",
]

START = 1_700_000_000 * 10**9


@dataclass
class Response:
    """What a raw ASGI call sent."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    messages: list[Message] = field(default_factory=list)

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.headers if n.lower() == name), None)

    def json(self) -> Any:
        return json.loads(self.body)


def http_scope(
    path: str = "/",
    method: str = "GET",
    headers: Sequence[tuple[bytes, bytes]] = (),
    client: tuple[str, int] | None = ("203.0.113.9", 5000),
    **extra: Any,
) -> Scope:
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("utf-8", "surrogateescape"),
        "query_string": b"",
        "root_path": "",
        "headers": list(headers),
        "server": ("testserver", 80),
        **extra,
    }
    if client is not None:
        scope["client"] = client
    return scope


async def call(app: Any, scope: Scope) -> Response:
    """Run one HTTP request through a raw ASGI app and collect the response."""
    messages: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        messages.append(message)

    await app(scope, receive, send)
    start = next(m for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return Response(start["status"], list(start.get("headers", [])), body, messages)


async def echo_app(scope: Scope, receive: Receive, send: Send) -> None:
    """A raw ASGI app answering 200 with the path; records the decisions it saw."""
    decisions = scope.get("state", {}).get("fineflow")
    body = f"{scope['path']} {decisions is not None}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"x-app", b"yes")]})
    await send({"type": "http.response.body", "body": body})


class RecordingStorage(MemoryStorage):
    """MemoryStorage that records open / migrate / close calls and, like a database
    storage, refuses decisions until it is opened."""

    def __init__(self, clock: FakeClock | None = None, *, fail_open: bool = False) -> None:
        super().__init__(clock=(clock or FakeClock()).time_ns)
        self.calls: list[str] = []
        self.fail_open = fail_open
        self.is_open = False

    async def open(self) -> None:
        self.calls.append("open")
        if self.fail_open:
            raise StorageError("database is down")
        await super().open()
        self.is_open = True

    def decide_local(
        self, algorithm: str, hits: Sequence[Hit], *, now: int | None = None
    ) -> list[Decision]:
        if not self.is_open:
            raise StorageClosedError("not open")
        return super().decide_local(algorithm, hits, now=now)

    async def migrate(self) -> None:
        self.calls.append("migrate")

    async def close(self) -> None:
        self.calls.append("close")
        await super().close()


class FailingStorage:
    """A storage whose every operation fails, as a database that is down."""

    def __init__(self) -> None:
        self.decide_calls = 0

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def migrate(self) -> None:
        pass

    async def decide(
        self,
        algorithm: str,
        hits: Sequence[Hit],
        *,
        now: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the Storage protocol's
    ) -> list[Decision]:
        self.decide_calls += 1
        raise StorageError("connection refused")

    async def status(self, key: str, *, now: int | None = None) -> list[KeyStatus]:
        raise StorageError("connection refused")

    async def reset(self, key: str, *, endpoint: str | None = None) -> int:
        raise StorageError("connection refused")

    async def cleanup(self, *, batch_size: int = 1000, now: int | None = None) -> int:
        raise StorageError("connection refused")

    async def stats(self) -> list[StatsRow]:
        raise StorageError("connection refused")


def sf(value: bytes | str | None) -> list[tuple[object, dict[str, object]]]:
    """Parse a Structured Field list (RFC 9651) into (value, params) pairs."""
    assert value is not None, "header missing"
    parsed = SfList()
    parsed.parse(value.encode("latin-1") if isinstance(value, str) else value)
    return [(item.value, dict(item.params)) for item in parsed]
