"""fineflow's benchmark suite: ``python -m benchmarks [--quick | --full | --smoke]``.

Every comparison is measured side by side in one run: the contenders of a table are run
round-robin for R rounds (the starting contender rotates each round), and each figure is
quoted as a ratio against its baseline with the median and the min-max over rounds. A row
may carry a reference ratio (``target``) that the figure is expected to stay within;
``met?`` compares the median ratio to it.

Suites (one module each):

* :mod:`benchmarks.asgi`: in-process ASGI overhead per request (no HTTP);
* :mod:`benchmarks.http`: real HTTP through uvicorn on 127.0.0.1 with a bounded load generator;
* :mod:`benchmarks.storage`: PostgreSQL decisions/s and latency vs a naive upsert and pgbench,
  and the memory storage vs ``limits.aio``;
* :mod:`benchmarks.breaker`: circuit-breaker overhead, closed and open.
"""
