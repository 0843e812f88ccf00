"""Rules: route templates, methods, quotas and tiers, configuration-time validation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fineflow import ConfigurationError, Quota, Rule
from fineflow._ratelimit.rules import PathPattern

MATCHES = [
    ("/users/{id}", "/users/1", True),
    ("/users/{id}", "/users/abc", True),
    ("/users/{id}", "/users/1/posts", False),
    ("/users/{id}", "/users/", False),
    ("/users/{id}", "/users", False),
    ("/users/{id:int}", "/users/42", True),
    ("/users/{id:int}", "/users/x", False),
    ("/price/{p:float}", "/price/1.5", True),
    ("/price/{p:float}", "/price/1.", False),
    ("/o/{u:uuid}", "/o/12345678-1234-1234-1234-123456789abc", True),
    ("/o/{u:uuid}", "/o/12345678", False),
    ("/files/{rest:path}", "/files/a/b/c.txt", True),
    ("/files/{rest:path}", "/files/", True),
    ("/api/chat/*", "/api/chat/", True),
    ("/api/chat/*", "/api/chat/completions/stream", True),
    ("/api/chat/*", "/api/chat", False),
    ("/api/chat/*", "/api/chatter", False),
    ("/api/chat/*", "/api/chat/a\nb", True),  # a newline cannot dodge a wildcard
    ("/files/{rest:path}", "/files/\n", True),
    ("/{path:path}", "/", True),
    ("/{path:path}", "/anything/at/all", True),
    ("/health", "/health", True),
    ("/health", "/health/", False),
    ("/a.b", "/aXb", False),  # literal dots are not regex wildcards
    ("/a+b", "/a+b", True),
    ("/v1/{org}/items/{item}", "/v1/acme/items/7", True),
]


@pytest.mark.parametrize(("template", "path", "expected"), MATCHES)
def test_templates_match_whole_paths(template: str, path: str, expected: bool) -> None:
    assert PathPattern(template).matches(path) is expected
    assert Rule(template, quota="1/s").matches("GET", path) is expected


def test_literal_paths_compile_to_equality_and_templates_to_one_regex() -> None:
    assert PathPattern("/health").regex is None
    assert PathPattern("/health").literal == "/health"
    pattern = PathPattern("/users/{id}")
    assert pattern.literal is None
    assert pattern.regex is not None


@pytest.mark.parametrize(
    "template",
    ["users/{id}", "", "/users/{id", "/users/id}", "/users/{1x}", "/users/{id:nope}", "/{}"],
)
def test_bad_templates_are_rejected(template: str) -> None:
    with pytest.raises(ConfigurationError):
        PathPattern(template)


def test_methods_are_normalized_and_filter() -> None:
    rule = Rule("/x", ["get", "Post"], quota="1/s")
    assert rule.methods == frozenset({"GET", "POST"})
    assert rule.matches("GET", "/x")
    assert rule.matches("POST", "/x")
    assert not rule.matches("DELETE", "/x")
    assert Rule("/x", "put", quota="1/s").methods == frozenset({"PUT"})
    assert Rule("/x", quota="1/s").matches("DELETE", "/x")


def test_default_name_is_derived_from_methods_and_path() -> None:
    assert Rule("/users/{id}", quota="1/s").name == "/users/{id}"
    assert Rule("/users/{id}", ["post", "GET"], quota="1/s").name == "GET,POST /users/{id}"
    assert Rule("/users/{id}", quota="1/s", name="users").name == "users"


def test_quota_forms() -> None:
    assert Rule("/x", quota="100/minute").quotas == (Quota(100, 60.0),)
    assert Rule("/x", quota=Quota(5, 1.0)).quotas == (Quota(5, 1.0),)
    both = Rule("/x", quota=["10/second", "1000/day"]).quotas
    assert both == (Quota(10, 1.0), Quota(1000, 86400.0))


def test_tiers() -> None:
    rule = Rule("/x", tiers={"free": "10/minute", "pro": ["100/minute", "10000/day"]})
    assert rule.quotas == ()
    assert rule.tiers["free"] == (Quota(10, 60.0),)
    assert len(rule.tiers["pro"]) == 2
    assert len(rule.all_quotas()) == 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"quota": "1/s", "tiers": {"free": "1/s"}},
        {"quota": "nonsense"},
        {"quota": []},
        {"tiers": {}},
        {"tiers": {"": "1/s"}},
        {"quota": ["1/s", "1/s"]},  # same policy twice would share one state slot
        {"quota": "1/s", "cost": -1},
        {"quota": "1/s", "cost": True},
        {"quota": "1/s", "cost": "2"},
        {"quota": "1/s", "key": "not callable"},
        {"quota": "1/s", "name": ""},
        {"quota": "1/s", "methods": []},
    ],
)
def test_invalid_rules_are_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        Rule("/x", **kwargs)  # type: ignore[arg-type]


def test_fixed_cost_that_can_never_fit_is_rejected_at_configuration() -> None:
    with pytest.raises(ConfigurationError, match="can never fit"):
        Rule("/x", quota="5/minute", cost=6)
    with pytest.raises(ConfigurationError, match="can never fit"):
        Rule("/x", tiers={"free": "5/minute", "pro": "50/minute"}, cost=10)
    Rule("/x", quota="5/minute", cost=5)
    Rule("/x", quota="5/minute", cost=0)
    Rule("/x", quota="5/minute", cost=lambda scope: 100)  # checked per request instead


def test_check_against_the_algorithm_and_default_tier() -> None:
    rule = Rule("/x", quota=Quota(10, 60.0, burst=2), cost=5)
    rule.check("fixed_window", None)  # windows admit up to the limit
    with pytest.raises(ConfigurationError, match="gcra"):
        rule.check("gcra", None)  # gcra admits at most the burst at once
    tiered = Rule("/x", tiers={"free": "1/s", "pro": "10/s"})
    tiered.check("gcra", "free")
    tiered.check("gcra", None)
    with pytest.raises(ConfigurationError, match="default_tier"):
        tiered.check("gcra", "gold")


def test_rules_are_immutable() -> None:
    rule = Rule("/x", quota="1/s")
    with pytest.raises(AttributeError):
        rule.name = "y"
    with pytest.raises(AttributeError):
        del rule.path
    with pytest.raises(TypeError):
        rule.tiers["gold"] = ()  # type: ignore[index]
    assert "Rule('/x'" in repr(rule)


@given(st.text(max_size=60))
def test_templates_never_match_outside_their_shape(path: str) -> None:
    matched = PathPattern("/users/{id}").matches(path)
    rest = path[len("/users/") :]
    assert matched == (path.startswith("/users/") and rest != "" and "/" not in rest)


PREFIX_TEMPLATES = ["/{path:path}", "/api/chat/*", "/files/{rest:path}", "/a.b/*", "/*"]


@given(st.text(max_size=40), st.sampled_from(PREFIX_TEMPLATES))
def test_wildcard_tails_match_by_prefix_exactly_like_their_regex(path: str, template: str) -> None:
    pattern = PathPattern(template)
    assert pattern.prefix is not None and pattern.regex is not None
    assert pattern.matches(path) == (pattern.regex.fullmatch(path) is not None)


def test_only_a_single_wildcard_tail_compiles_to_a_prefix() -> None:
    assert PathPattern("/api/*").prefix == "/api/"
    assert PathPattern("/{path:path}").prefix == "/"
    for template in ["/health", "/users/{id}", "/a/*/b", "/{a}/{rest:path}", "/x/{p:int}"]:
        assert PathPattern(template).prefix is None
