"""Key functions: who a rate limit applies to, computed from the ASGI scope.

A key function takes the scope and returns a string (the caller's identity under a rule) or
``None``, which exempts the request from the rule. Any callable of that shape works, sync or
async::

    async def api_key(scope):
        return await lookup_account(scope)

The helpers here never raise on hostile input (odd bytes, huge or malformed headers, a
missing ``client``): what they cannot make sense of is treated as untrusted.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Iterable
from typing import Literal

from ._asgi.types import Scope
from ._errors import ConfigurationError
from ._logfields import key_digest

__all__ = ["ClientIP", "KeyFunc", "client_ip", "digest", "first", "header", "user"]

KeyFunc = Callable[[Scope], str | Awaitable[str | None] | None]
"""A function of the ASGI scope returning the key, or ``None`` to exempt the request."""

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# A header written by a chain of proxies rarely has more than a handful of hops; walking at
# most this many bounds the work a client can cause with a huge X-Forwarded-For.
MAX_HOPS = 32
# Tokens that are not addresses (RFC 7239 obfuscated identifiers) are cut to this length.
MAX_TOKEN = 64


def digest(key: str) -> str:
    """The digest fineflow's log records carry in place of ``key`` (field ``key_digest``).

    Keys (API keys, user ids, client addresses) are never logged raw. To find the records
    of a caller you know, compute its digest and search for it::

        python -c 'import fineflow.keys as k; print(k.digest("sk-live-..."))'

    12 hex digits of BLAKE2b, the same in every process. With the environment variable
    ``FINEFLOW_LOG_DIGEST_SECRET`` set (to the same value everywhere, including where you
    compute digests to search), the digest is keyed by it, so nobody can reverse the
    digest of a guessable key, such as an IPv4 address, by trying every candidate.
    """
    return key_digest(key)


def _parse_ip(text: str) -> _IPAddress | None:
    text = text.strip().strip('"').strip()
    if not text or len(text) > 100:
        return None
    if text.startswith("["):  # "[2001:db8::1]:443" or "[2001:db8::1]"
        end = text.find("]")
        if end < 0:
            return None
        text = text[1:end]
    elif text.count(":") == 1:  # "192.0.2.1:8080"
        text = text.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _forwarded_for(element: str) -> str:
    """The ``for=`` value of one RFC 7239 ``Forwarded`` element ('' if none)."""
    for pair in element.split(";"):
        name, sep, value = pair.partition("=")
        if sep and name.strip().lower() == "for":
            return value.strip()
    return ""


class ClientIP:
    """The key function made by :func:`client_ip` (see there)."""

    __slots__ = ("_fallback", "_forwarded", "_header", "_networks")

    def __init__(
        self,
        trusted_proxies: Iterable[str] | str = (),
        *,
        header: Literal["x-forwarded-for", "forwarded"] = "x-forwarded-for",
        fallback: str | None = "unknown",
    ) -> None:
        if isinstance(trusted_proxies, str):
            trusted_proxies = [trusted_proxies]
        networks: list[_IPNetwork] = []
        for cidr in trusted_proxies:
            try:
                networks.append(ipaddress.ip_network(str(cidr).strip(), strict=False))
            except ValueError as exc:
                raise ConfigurationError(
                    f"trusted proxy {cidr!r} is not an IP address or CIDR network such as "
                    "'10.0.0.0/8' or '2001:db8::/32'"
                ) from exc
        lowered = header.lower() if isinstance(header, str) else header
        if lowered not in ("x-forwarded-for", "forwarded"):
            raise ConfigurationError(
                f"header must be 'x-forwarded-for' or 'forwarded', got {header!r}"
            )
        if fallback is not None and not isinstance(fallback, str):
            raise ConfigurationError("fallback must be a string or None")
        self._networks = tuple(networks)
        self._header = lowered.encode("latin-1")
        self._forwarded = lowered == "forwarded"
        self._fallback = fallback

    def _trusted(self, ip: _IPAddress | None) -> bool:
        return ip is not None and any(ip in net for net in self._networks)

    @property
    def peer_only(self) -> bool:
        """True when no proxy is trusted: the key is the peer address, headers are ignored."""
        return not self._networks

    def __call__(self, scope: Scope) -> str | None:
        """The client address of the request in ``scope`` (see :func:`client_ip`)."""
        client = scope.get("client")
        if client.__class__ is tuple and client and not self._networks:
            # The common case: a server's (host, port) tuple and no proxies to walk.
            peer = client[0]
            if peer.__class__ is str and peer:
                return peer
        peer = client[0] if isinstance(client, list | tuple) and client else None
        if not isinstance(peer, str) or not peer:
            return self._fallback
        if not self._networks:
            return peer
        ip = _parse_ip(peer)
        if not self._trusted(ip):
            return peer[:MAX_TOKEN]
        name = self._header
        values = [v for n, v in scope.get("headers") or () if n.lower() == name]
        if not values:
            return str(ip)
        joined = b",".join(values).decode("latin-1")
        hops = joined.rsplit(",", MAX_HOPS)
        # Walk from the proxy nearest to us outwards: each hop was written by the proxy to
        # its right, so it is only believed while that proxy is trusted.
        for hop in reversed(hops[-MAX_HOPS:]):
            text = _forwarded_for(hop) if self._forwarded else hop
            hop_ip = _parse_ip(text)
            if hop_ip is None:
                token = text.strip().strip('"').strip()[:MAX_TOKEN]
                return token or self._fallback
            ip = hop_ip
            if not self._trusted(ip):
                return str(ip)
        return str(ip)

    def __repr__(self) -> str:
        nets = [str(n) for n in self._networks]
        return f"client_ip(trusted_proxies={nets}, header={self._header.decode()!r})"


def client_ip(
    trusted_proxies: Iterable[str] | str = (),
    *,
    header: Literal["x-forwarded-for", "forwarded"] = "x-forwarded-for",
    fallback: str | None = "unknown",
) -> ClientIP:
    """Key requests by the client's IP address (the default key of the middleware).

    Without ``trusted_proxies`` the key is the peer address (``scope["client"][0]``) and
    forwarding headers are ignored, so a client cannot pick its own key. With them, the
    ``header`` your proxies write is walked right to left, starting at the peer: while the
    current address is a trusted proxy, the hop it appended is believed; the first
    untrusted address is the client. The leftmost entry, which any client can forge, is
    never believed on its own.

    Read only the header your proxies actually write: a header they pass through untouched
    is entirely client-controlled.

    Args:
        trusted_proxies: IP addresses or CIDR networks of your proxies / load balancers,
            e.g. ``["10.0.0.0/8"]``.
        header: ``"x-forwarded-for"`` (default) or ``"forwarded"`` (RFC 7239 ``for=``).
        fallback: the key when the peer address is unknown (e.g. a unix socket); all such
            requests share it. ``None`` exempts them instead.

    Returns:
        A key function of the scope.

    Raises:
        ConfigurationError: if a proxy entry is not an address or network.
    """
    return ClientIP(trusted_proxies, header=header, fallback=fallback)


def header(name: str, *, default: str | None = None) -> Callable[[Scope], str | None]:
    """Key requests by a request header, e.g. an API key.

    Args:
        name: the header name (case-insensitive), e.g. ``"x-api-key"``.
        default: the key when the header is missing or empty. ``None`` (the default)
            exempts such requests; combine with :func:`first` to fall back to another key,
            e.g. ``first(header("x-api-key"), client_ip())``.

    Returns:
        A key function returning the first value of that header (decoded as latin-1).

    Raises:
        ConfigurationError: if ``name`` is empty or not ASCII.
    """
    if not isinstance(name, str) or not name or not name.isascii():
        raise ConfigurationError(f"header name must be a non-empty ASCII string, got {name!r}")
    wanted = name.lower().encode("ascii")

    def header_key(scope: Scope) -> str | None:
        for n, v in scope.get("headers") or ():
            if n.lower() == wanted:
                return v.decode("latin-1") if v else default
        return default

    header_key.__qualname__ = f"header({name!r})"
    return header_key


def user(
    attribute: str | None = None, *, default: str | None = None
) -> Callable[[Scope], str | None]:
    """Key requests by the authenticated user in ``scope["user"]``.

    Works with Starlette's ``AuthenticationMiddleware`` (add it *outside* the rate-limit
    middleware so it runs first) or anything that sets ``scope["user"]``. A user whose
    ``is_authenticated`` is false counts as no user.

    Args:
        attribute: the user attribute to use; by default ``identity``, then
            ``display_name``, then ``str(user)``.
        default: the key when there is no authenticated user; ``None`` exempts the request.

    Returns:
        A key function of the scope.
    """
    names = (attribute,) if attribute else ("identity", "display_name")

    def user_key(scope: Scope) -> str | None:
        who = scope.get("user")
        if who is None or not getattr(who, "is_authenticated", True):
            return default
        if isinstance(who, str):
            return who or default
        for attr in names:
            try:
                value = getattr(who, attr)
            except (AttributeError, NotImplementedError):
                continue
            if value is not None and value != "":
                return str(value)
        if attribute:
            return default
        return str(who) or default

    return user_key


def first(*keys: KeyFunc) -> Callable[[Scope], Awaitable[str | None]]:
    """The first non-``None`` key of several key functions, tried in order.

    Example: ``first(header("x-api-key"), client_ip())`` limits callers by API key and
    anonymous callers by address.
    """
    if not keys or not all(callable(k) for k in keys):
        raise ConfigurationError("first() needs one or more key functions")

    async def first_key(scope: Scope) -> str | None:
        for fn in keys:
            value = fn(scope)
            if isinstance(value, Awaitable):
                value = await value
            if value is not None:
                return value
        return None

    return first_key
