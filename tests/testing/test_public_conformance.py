"""The public storage conformance suite as a third party meets it: a test file of theirs,
run by pytest in a subprocess, with a storage of their own that passes and one that is
broken in a way the suite must catch."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

THIRD_PARTY_TESTS = '''
import pytest

import fineflow as ff
from fineflow.testing.conformance import T0, StorageConformance


class WrappedMemory:
    """A third-party storage: every call delegated to a MemoryStorage."""

    def __init__(self):
        self.inner = ff.MemoryStorage(clock=lambda: T0)

    async def __aenter__(self):
        await self.open()
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def open(self):
        await self.inner.open()

    async def close(self):
        await self.inner.close()

    async def migrate(self):
        await self.inner.migrate()

    async def decide(self, algorithm, hits, *, now=None, timeout=None):
        return await self.inner.decide(algorithm, hits, now=now, timeout=timeout)

    async def status(self, key, *, now=None):
        return await self.inner.status(key, now=now)

    async def reset(self, key, *, endpoint=None):
        return await self.inner.reset(key, endpoint=endpoint)

    async def cleanup(self, *, batch_size=1000, now=None):
        return await self.inner.cleanup(batch_size=batch_size, now=now)

    async def stats(self):
        return await self.inner.stats()


class OneQuotaAtATime(WrappedMemory):
    """Broken: decides each quota of a request on its own, so when one denies, the others
    stay charged (not all or nothing)."""

    async def decide(self, algorithm, hits, *, now=None, timeout=None):
        decisions = []
        for hit in hits:
            decisions += await self.inner.decide(algorithm, [hit], now=now, timeout=timeout)
        return decisions


@pytest.fixture
def anyio_backend():
    return "asyncio"


class TestWrappedMemory(StorageConformance):
    @pytest.fixture
    async def storage(self):
        async with WrappedMemory() as storage:
            yield storage


class TestOneQuotaAtATime(StorageConformance):
    @pytest.fixture
    async def storage(self):
        async with OneQuotaAtATime() as storage:
            yield storage
'''


def test_a_third_party_storage_runs_the_suite_and_a_broken_one_fails_it(tmp_path: Path) -> None:
    (tmp_path / "test_my_storage.py").write_text(THIRD_PARTY_TESTS)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "HYPOTHESIS_PROFILE": "default"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output  # tests failed (not a usage or collection error)
    failed = set(re.findall(r"^FAILED test_my_storage\.py::(\w+)::(\w+)", result.stdout, re.M))
    assert {cls for cls, _ in failed} == {"TestOneQuotaAtATime"}, output
    assert ("TestOneQuotaAtATime", "test_all_or_nothing_over_several_quotas") in failed, output
    assert ("TestOneQuotaAtATime", "test_backend_matches_reference_model") in failed, output
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed is not None and int(passed[1]) >= 25, output  # the whole suite, and more
