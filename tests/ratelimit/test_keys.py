"""Key functions: client address behind trusted proxies, headers, users; hostile input."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fineflow import ConfigurationError, keys
from fineflow._asgi.types import Scope


def scope(
    peer: str | None = "203.0.113.9", headers: list[tuple[bytes, bytes]] | None = None
) -> Scope:
    s: dict[str, Any] = {"type": "http", "headers": headers or []}
    if peer is not None:
        s["client"] = (peer, 50000)
    return s


def test_without_trusted_proxies_the_peer_is_the_key_and_headers_are_ignored() -> None:
    key = keys.client_ip()
    spoof = [(b"x-forwarded-for", b"1.1.1.1"), (b"forwarded", b"for=2.2.2.2")]
    assert key(scope("203.0.113.9", spoof)) == "203.0.113.9"


def test_missing_client_uses_the_fallback() -> None:
    assert keys.client_ip()(scope(None)) == "unknown"
    assert keys.client_ip(fallback=None)(scope(None)) is None
    assert keys.client_ip(["10.0.0.0/8"])({"type": "http", "client": None}) == "unknown"
    assert keys.client_ip()({"type": "http", "client": ()}) == "unknown"
    assert keys.client_ip()({"type": "http", "client": (None, 1)}) == "unknown"


XFF_CASES = [
    # (peer, X-Forwarded-For, expected): proxies are 10.0.0.0/8
    ("10.0.0.1", "198.51.100.7", "198.51.100.7"),
    ("10.0.0.1", "6.6.6.6, 198.51.100.7", "198.51.100.7"),  # leftmost entry is forgeable
    ("10.0.0.1", "6.6.6.6, 198.51.100.7, 10.0.0.2", "198.51.100.7"),  # two proxies
    ("10.0.0.1", "10.0.0.3, 10.0.0.2", "10.0.0.3"),  # all trusted: the leftmost
    ("203.0.113.9", "198.51.100.7", "203.0.113.9"),  # untrusted peer: header ignored
    ("10.0.0.1", "198.51.100.7:4711", "198.51.100.7"),
    ("10.0.0.1", "[2001:db8::1]:443", "2001:db8::1"),
    ("10.0.0.1", "2001:DB8:0:0::1", "2001:db8::1"),  # canonical form: one key per address
    ("10.0.0.1", "::ffff:198.51.100.7", "198.51.100.7"),
    ("10.0.0.1", "garbage", "garbage"),  # what a trusted proxy wrote, verbatim
    ("10.0.0.1", "", "unknown"),
    ("::ffff:10.0.0.1", "198.51.100.7", "198.51.100.7"),
]


@pytest.mark.parametrize(("peer", "xff", "expected"), XFF_CASES)
def test_x_forwarded_for_is_walked_right_to_left(peer: str, xff: str, expected: str) -> None:
    key = keys.client_ip(["10.0.0.0/8"])
    assert key(scope(peer, [(b"x-forwarded-for", xff.encode())])) == expected


def test_several_x_forwarded_for_lines_are_one_list() -> None:
    key = keys.client_ip(["10.0.0.0/8"])
    headers = [(b"X-Forwarded-For", b"6.6.6.6, 198.51.100.7"), (b"x-forwarded-for", b"10.0.0.2")]
    assert key(scope("10.0.0.1", headers)) == "198.51.100.7"


def test_trusted_peer_without_header_is_the_key() -> None:
    assert keys.client_ip("10.0.0.0/8")(scope("10.0.0.1")) == "10.0.0.1"


FORWARDED_CASES = [
    ("for=198.51.100.7", "198.51.100.7"),
    ('for="[2001:db8:cafe::17]:4711"', "2001:db8:cafe::17"),
    ("for=6.6.6.6, for=198.51.100.7;proto=https;by=10.0.0.1", "198.51.100.7"),
    ("For=198.51.100.7", "198.51.100.7"),
    ("for=_hidden", "_hidden"),
    ("proto=https", "unknown"),
    ("for=6.6.6.6, for=198.51.100.7, for=10.0.0.2", "198.51.100.7"),
]


@pytest.mark.parametrize(("value", "expected"), FORWARDED_CASES)
def test_forwarded_header(value: str, expected: str) -> None:
    key = keys.client_ip(["10.0.0.0/8"], header="forwarded")
    headers = [(b"forwarded", value.encode()), (b"x-forwarded-for", b"9.9.9.9")]
    assert key(scope("10.0.0.1", headers)) == expected


def test_only_the_configured_header_is_read() -> None:
    # Proxies that write X-Forwarded-For pass a client's Forwarded header through untouched.
    key = keys.client_ip(["10.0.0.0/8"])
    headers = [(b"forwarded", b"for=6.6.6.6"), (b"x-forwarded-for", b"198.51.100.7")]
    assert key(scope("10.0.0.1", headers)) == "198.51.100.7"


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "not-an-ip", "", "10.0.0.0/8/8"])
def test_bad_trusted_proxies_are_rejected(bad: str) -> None:
    with pytest.raises(ConfigurationError):
        keys.client_ip([bad])


def test_bad_header_option_is_rejected() -> None:
    with pytest.raises(ConfigurationError):
        keys.client_ip(header="x-real-ip")  # type: ignore[arg-type]


def test_many_hops_are_bounded() -> None:
    key = keys.client_ip(["10.0.0.0/8"])
    hops = b", ".join([b"10.0.0.2"] * 100_000)
    result = key(scope("10.0.0.1", [(b"x-forwarded-for", b"6.6.6.6, " + hops)]))
    assert result == "10.0.0.2"  # gave up inside the trusted chain; never the forged entry


@given(
    peer=st.one_of(st.none(), st.text(max_size=50), st.sampled_from(["10.0.0.1", "::1"])),
    values=st.lists(st.binary(max_size=300), max_size=5),
    forwarded=st.booleans(),
)
def test_hostile_headers_never_crash(
    peer: str | None, values: list[bytes], forwarded: bool
) -> None:
    name = b"forwarded" if forwarded else b"x-forwarded-for"
    key = keys.client_ip(
        ["10.0.0.0/8", "::1"], header="forwarded" if forwarded else "x-forwarded-for"
    )
    result = key(scope(peer, [(name, v) for v in values]))
    assert result is None or isinstance(result, str)


def test_header_key() -> None:
    key = keys.header("X-API-Key")
    assert key(scope(headers=[(b"x-api-key", b"k1"), (b"x-api-key", b"k2")])) == "k1"
    assert key(scope(headers=[])) is None
    assert key(scope(headers=[(b"x-api-key", b"")])) is None
    assert keys.header("x-api-key", default="anon")(scope(headers=[])) == "anon"
    assert key(scope(headers=[(b"x-api-key", b"\xff\x00")])) == "\xff\x00"
    assert key({"type": "http"}) is None
    with pytest.raises(ConfigurationError):
        keys.header("")
    with pytest.raises(ConfigurationError):
        keys.header("ключ")


class User:
    def __init__(self, identity: str, authenticated: bool = True) -> None:
        self.identity = identity
        self.display_name = identity.upper()
        self.is_authenticated = authenticated


class NoIdentity:
    is_authenticated = True
    display_name = "Dee"

    @property
    def identity(self) -> str:
        raise NotImplementedError


def test_user_key() -> None:
    key = keys.user()
    assert key({"user": User("ann")}) == "ann"
    assert key({"user": User("ann", authenticated=False)}) is None
    assert key({}) is None
    assert key({"user": NoIdentity()}) == "Dee"
    assert key({"user": "bob"}) == "bob"
    assert keys.user("display_name")({"user": User("ann")}) == "ANN"
    assert keys.user("missing", default="anon")({"user": User("ann")}) == "anon"
    assert keys.user(default="anon")({}) == "anon"


@pytest.mark.anyio
async def test_first_tries_key_functions_in_order() -> None:
    async def async_key(scope: Scope) -> str | None:
        return scope.get("tenant")

    key = keys.first(keys.header("x-api-key"), async_key, keys.client_ip())
    assert await key(scope(headers=[(b"x-api-key", b"k")])) == "k"
    assert await key({**scope(), "tenant": "t1"}) == "t1"
    assert await key(scope()) == "203.0.113.9"
    assert await keys.first(keys.header("x"))(scope()) is None
    with pytest.raises(ConfigurationError):
        keys.first()


def test_repr() -> None:
    assert "10.0.0.0/8" in repr(keys.client_ip("10.0.0.0/8"))


def test_the_peer_shortcut_agrees_with_the_general_rules() -> None:
    class Address(str):
        pass

    key = keys.client_ip()
    assert key.peer_only and not keys.client_ip(["10.0.0.0/8"]).peer_only
    assert key({"type": "http", "client": ["203.0.113.9", 1]}) == "203.0.113.9"
    assert key({"type": "http", "client": (Address("203.0.113.9"), 1)}) == "203.0.113.9"
    assert key({"type": "http", "client": ("", 1)}) == "unknown"
    assert key({"type": "http", "client": (b"203.0.113.9", 1)}) == "unknown"
