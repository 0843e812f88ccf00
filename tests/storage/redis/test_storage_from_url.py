"""storage_from_url: the storage a URL's scheme names."""

from __future__ import annotations

import pytest

import fineflow as ff


@pytest.mark.parametrize(
    ("url", "kind", "cluster"),
    [
        ("postgresql://app@db:5432/app", "PostgresStorage", None),
        ("postgres://app@db/app", "PostgresStorage", None),
        ("redis://localhost:6379/0", "RedisStorage", False),
        ("rediss://user:secret@cache:6380/2", "RedisStorage", False),
        ("unix:///run/redis.sock", "RedisStorage", False),
        ("redis+cluster://node-1:7000", "RedisStorage", True),
        ("REDIS://localhost", "RedisStorage", False),
        ("memory://", "MemoryStorage", None),
    ],
)
def test_each_scheme_gives_its_storage(url: str, kind: str, cluster: bool | None) -> None:
    storage = ff.storage_from_url(url)
    assert type(storage).__name__ == kind
    if cluster is not None:
        assert isinstance(storage, ff.RedisStorage) and storage.cluster is cluster


@pytest.mark.parametrize("url", ["mysql://db", "http://x", "localhost:6379", "", "sqlite:///x"])
def test_other_schemes_are_a_clear_error(url: str) -> None:
    with pytest.raises(ff.ConfigurationError, match=r"postgresql://.*redis://.*memory://"):
        ff.storage_from_url(url)


def test_a_password_is_never_echoed() -> None:
    with pytest.raises(ff.ConfigurationError) as info:
        ff.storage_from_url("mongodb://user:hunter2@db")
    assert "hunter2" not in str(info.value)


def test_not_a_string() -> None:
    with pytest.raises(ff.ConfigurationError, match="string"):
        ff.storage_from_url(None)  # type: ignore[arg-type]
