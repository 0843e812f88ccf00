"""Quota parsing and validation."""

from __future__ import annotations

import pytest

from fineflow import ConfigurationError, Quota


@pytest.mark.parametrize(
    ("text", "limit", "period", "burst"),
    [
        ("100/minute", 100, 60.0, None),
        ("10/second", 10, 1.0, None),
        ("1000/day", 1000, 86400.0, None),
        ("5/30s", 5, 30.0, None),
        ("100/minute;burst=20", 100, 60.0, 20),
        ("2/1.5h", 2, 5400.0, None),
        (" 7 per hour ", 7, 3600.0, None),
        ("3/S", 3, 1.0, None),
    ],
)
def test_parse_accepted_forms(text: str, limit: int, period: float, burst: int | None) -> None:
    quota = Quota.parse(text)
    assert (quota.limit, quota.period, quota.burst) == (limit, period, burst)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "100",
        "100/",
        "/minute",
        "abc/minute",
        "100/fortnight",
        "-1/second",
        "0/second",
        "100/0s",
        "1.5/second",
        "100/minute;burst=0",
        "100/minute;bust=3",
        "x" * 10_000,
    ],
)
def test_parse_rejects_with_the_accepted_forms(text: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Quota.parse(text)
    assert "100/minute" in str(info.value) or "must" in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"limit": 0, "period": 1.0}, "limit"),
        ({"limit": True, "period": 1.0}, "limit"),
        ({"limit": 1, "period": -1.0}, "period"),
        ({"limit": 1, "period": float("nan")}, "period"),
        ({"limit": 1, "period": 1.0, "burst": 0}, "burst"),
        ({"limit": 10**12, "period": 1.0}, "nanosecond"),
        ({"limit": 1, "period": 86400.0 * 365 * 5, "burst": 10}, "ten years"),
    ],
)
def test_constructor_validates(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Quota(**kwargs)  # type: ignore[arg-type]


def test_parse_passes_quotas_through_and_names_policies() -> None:
    quota = Quota(100, 60)
    assert Quota.parse(quota) is quota
    assert quota.policy == "100-per-60s"
    assert Quota(5, 30, burst=2).policy == "5-per-30s-b2"
    assert Quota(5, 30, name="chat").policy == "chat"
    assert quota.capacity == 100
    assert Quota(5, 30, burst=2).capacity == 2
    assert str(Quota.parse("100/minute;burst=20")) == "100/60s;burst=20"
    assert Quota.parse("3/second").emission_interval_ns == 333_333_333
