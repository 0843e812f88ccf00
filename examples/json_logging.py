"""fineflow's log records as JSON lines, with the standard library only.

Run it with ``python examples/json_logging.py``: it sends a few requests through a
rate-limited, circuit-broken raw ASGI app and prints the records fineflow logs, one JSON
object per line. Every record carries ``event`` and the fields that apply (``rule``,
``tier``, ``policy``, ``key_digest``, ``breaker``, ``from_state``, ``to_state``, ``reason``,
``error`` ...); keys appear only as ``key_digest`` (``fineflow.keys.digest(key)``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import Any

import fineflow as ff

# The attributes every LogRecord has: anything else on a record came in through `extra`.
STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, then the extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update((k, v) for k, v in vars(record).items() if k not in STANDARD)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(stream: Any = sys.stdout) -> logging.Handler:
    """Send fineflow's records, as JSON, to ``stream`` (INFO and up)."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    fineflow_logger = logging.getLogger("fineflow")
    fineflow_logger.addHandler(handler)
    fineflow_logger.setLevel(logging.INFO)
    return handler


async def app(scope: Any, receive: Any, send: Any) -> None:
    status = 502 if scope["path"] == "/upstream" else 200
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def main(stream: Any = sys.stdout) -> None:
    """Three requests: one admitted, one denied (logged), one that opens the breaker."""
    handler = configure(stream)
    limited = ff.RateLimitMiddleware(
        app,
        storage=ff.MemoryStorage(),
        rules=[ff.Rule("/items", quota="1/minute", name="items", key=ff.keys.header("x-api-key"))],
        log_denied=True,
    )
    guarded = ff.CircuitBreakerMiddleware(
        limited, breaker=ff.CircuitBreaker("upstream", failure_threshold=1)
    )
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/upstream",
        "headers": [(b"x-api-key", b"sk-live-example")],
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        pass

    try:
        for path in ("/items", "/items", "/upstream"):
            await guarded({**scope, "path": path}, receive, send)
    finally:
        logging.getLogger("fineflow").removeHandler(handler)


if __name__ == "__main__":
    asyncio.run(main())
