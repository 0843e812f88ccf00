"""Header rendering: IETF structured fields parse with an RFC 9651 parser; other styles."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asgi_helpers import sf
from fineflow import ConfigurationError, Decision, Quota
from fineflow._ratelimit import headers as _headers
from fineflow._ratelimit.headers import (
    AppliedPolicy,
    render_headers,
    retry_after_header,
    sf_string,
    validate_style,
)
from fineflow._ratelimit.problems import QUOTA_EXCEEDED, quota_exceeded


def decision(remaining: int, reset: float, allowed: bool = True, limit: int = 100) -> Decision:
    return Decision(allowed, limit, remaining, reset, 0.0 if allowed else 3.0, "p", 60.0)


def test_ietf_single_policy() -> None:
    applied = [AppliedPolicy("api", Quota(100, 60.0))]
    headers = dict(render_headers("ietf", applied, [decision(42, 16.2)]))
    assert sf(headers[b"ratelimit-policy"]) == [("api", {"q": 100, "w": 60})]
    assert sf(headers[b"ratelimit"]) == [("api", {"r": 42, "t": 17})]


def test_rendered_ietf_headers_are_kept_by_remaining_and_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_headers, "MAX_CACHED_RATES", 4)
    cached = AppliedPolicy("api", Quota(100, 60.0))
    for remaining in [42, 41, 42, 40, 39, 38, 37, 42]:
        for reset in (16.2, 3.0, 16.2):
            fresh = AppliedPolicy("api", Quota(100, 60.0))
            pairs = cached.ietf_headers(decision(remaining, reset))
            assert pairs == fresh.ietf_headers(decision(remaining, reset))
            assert sf(pairs[1][1]) == [("api", {"r": remaining, "t": math.ceil(reset)})]
            assert 1 <= len(cached.rendered) <= 4
    assert cached.ietf_headers(decision(42, 16.2)) is cached.ietf_headers(decision(42, 16.2))


def test_ietf_one_item_per_applied_quota() -> None:
    applied = [
        AppliedPolicy("api:10-per-1s", Quota(10, 1.0)),
        AppliedPolicy("api:1000-per-86400s", Quota(1000, 86400.0)),
        AppliedPolicy("search", Quota(5, 1.5)),
    ]
    decisions = [decision(9, 0.1), decision(999, 86.4), decision(0, 1.5, limit=5)]
    headers = render_headers("ietf", applied, decisions)
    assert [name for name, _ in headers] == [b"ratelimit-policy", b"ratelimit"]
    values = dict(headers)
    assert sf(values[b"ratelimit-policy"]) == [
        ("api:10-per-1s", {"q": 10, "w": 1}),
        ("api:1000-per-86400s", {"q": 1000, "w": 86400}),
        ("search", {"q": 5, "w": 2}),  # windows are whole seconds, rounded up
    ]
    assert sf(values[b"ratelimit"]) == [
        ("api:10-per-1s", {"r": 9, "t": 1}),
        ("api:1000-per-86400s", {"r": 999, "t": 87}),
        ("search", {"r": 0, "t": 2}),
    ]


@given(st.text(max_size=40))
def test_any_policy_name_renders_a_valid_structured_field(name: str) -> None:
    applied = [AppliedPolicy(name, Quota(3, 60.0))]
    values = dict(render_headers("ietf", applied, [decision(1, 2.0, limit=3)]))
    [(parsed_name, params)] = sf(values[b"ratelimit-policy"])
    assert params == {"q": 3, "w": 60}
    expected = "".join(ch if " " <= ch <= "~" else "?" for ch in name)
    assert parsed_name == expected
    assert sf(values[b"ratelimit"])[0][0] == expected


def test_sf_string_escapes() -> None:
    assert sf_string('a"b\\c') == b'"a\\"b\\\\c"'
    assert sf_string("tab\there é") == b'"tab?here ?"'


@pytest.mark.parametrize(
    ("style", "names"),
    [
        ("legacy", (b"ratelimit-limit", b"ratelimit-remaining", b"ratelimit-reset")),
        ("x", (b"x-ratelimit-limit", b"x-ratelimit-remaining", b"x-ratelimit-reset")),
    ],
)
def test_single_value_styles_report_the_most_restrictive_quota(
    style: str, names: tuple[bytes, bytes, bytes]
) -> None:
    applied = [AppliedPolicy("a", Quota(10, 1.0)), AppliedPolicy("b", Quota(1000, 86400.0))]
    decisions = [decision(9, 0.1, limit=10), decision(3, 3600.2, limit=1000)]
    headers = render_headers(style, applied, decisions)  # type: ignore[arg-type]
    assert headers == [(names[0], b"1000"), (names[1], b"3"), (names[2], b"3601")]


def test_retry_after_is_whole_seconds_rounded_up_and_at_least_one() -> None:
    assert retry_after_header(16.01) == (b"retry-after", b"17")
    assert retry_after_header(17.0) == (b"retry-after", b"17")
    assert retry_after_header(0.0001) == (b"retry-after", b"1")
    assert retry_after_header(0.0) == (b"retry-after", b"1")


def test_validate_style() -> None:
    for style in ("ietf", "legacy", "x", None):
        assert validate_style(style) == style
    with pytest.raises(ConfigurationError):
        validate_style("draft-7")


def test_problem_body_is_rfc9457_json() -> None:
    violated = [AppliedPolicy('we"ird', Quota(1, 1.0)), AppliedPolicy("day", Quota(5, 86400.0))]
    response = quota_exceeded(violated, 2.5, [(b"ratelimit", b'"day";r=0;t=3')])
    body = json.loads(response.body)
    assert body == {
        "type": QUOTA_EXCEEDED,
        "title": "Too Many Requests",
        "status": 429,
        "detail": "Quota exceeded; retry in 3 seconds.",
        "violated-policies": ['we"ird', "day"],
    }
    headers = dict(response.headers)
    assert headers[b"content-type"] == b"application/problem+json"
    assert headers[b"retry-after"] == b"3"
    assert headers[b"content-length"] == str(len(response.body)).encode()
    never = quota_exceeded(violated[:1], None)
    assert b"retry-after" not in dict(never.headers)
    assert "can ever admit" in json.loads(never.body)["detail"]
