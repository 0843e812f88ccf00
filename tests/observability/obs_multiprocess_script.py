"""Run by ``test_multiprocess_export.py`` in a fresh interpreter with
``PROMETHEUS_MULTIPROC_DIR`` set (prometheus_client reads it at import): flushes of
``MultiprocessExport`` by hand, printing the scraped text after each step as JSON."""

from __future__ import annotations

import asyncio
import gc
import json

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

import fineflow as ff
from fineflow.prometheus import MultiprocessExport


def scrape() -> str:
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return generate_latest(registry).decode()


def fail() -> None:
    raise ConnectionError("down")


async def main() -> None:
    export = MultiprocessExport(interval=3600)  # flushed by hand only
    texts = []
    keep = ff.CircuitBreaker("mp-shared", failure_threshold=1)
    gone = ff.CircuitBreaker("mp-shared", failure_threshold=1)
    for breaker in (keep, gone):
        await breaker.call(lambda: 1)
    export.flush()
    texts.append(scrape())  # 2 successful, 2 closed
    del breaker, gone
    gc.collect()
    export.flush()
    texts.append(scrape())  # the counter keeps 2, the state gauge says 1 closed
    await keep.call(lambda: 1)
    try:
        await keep.call(fail)
    except ConnectionError:
        pass
    export.flush()
    texts.append(scrape())  # 3 successful, 1 failed, 1 open
    export.stop()
    texts.append(scrape())  # the live gauges of this process are gone, counters stay
    print(json.dumps(texts))


asyncio.run(main())
