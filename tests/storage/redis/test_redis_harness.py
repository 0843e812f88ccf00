"""fineflow.testing.redis: how tests find Redis, and the throwaway path even where a server
runs."""

from __future__ import annotations

import pytest

from fineflow.testing.redis import (
    RedisNotFoundError,
    _ping,
    find_redis,
    shared_redis,
    unique_prefix,
)


def test_the_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINEFLOW_TEST_REDIS_URL", "redis://example.invalid:1/3")
    with find_redis() as server:
        assert (server.source, server.url) == ("env", "redis://example.invalid:1/3")


def test_a_throwaway_server_starts_and_is_removed() -> None:
    with find_redis(throwaway=True) as server:
        assert server.source == "throwaway" and server.process is not None
        port, directory = server.process.port, server.process.directory
        assert _ping("127.0.0.1", port)
    assert not _ping("127.0.0.1", port)
    assert not directory.exists()


def test_without_redis_server_the_error_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RedisNotFoundError, match=r"apt-get install redis-server.*REDIS_URL"):
        find_redis(throwaway=True).__enter__()


def test_the_session_server_is_shared_and_prefixes_are_unique() -> None:
    assert shared_redis() is shared_redis()
    assert unique_prefix() != unique_prefix()
