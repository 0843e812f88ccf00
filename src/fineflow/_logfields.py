"""The structured fields of fineflow's log records, named once for the whole library.

Every record a fineflow logger writes carries ``extra`` fields built by :func:`log_extra`:
an ``event`` name always, and the fields below as they apply. A log pipeline (a JSON
formatter, python-json-logger, an OTel log exporter) reads them from the record's
attributes. Rate-limit keys (user ids, API keys, client addresses) are never logged raw:
records carry ``key_digest``, the first 12 hex digits of a BLAKE2b digest of the key
(:func:`key_digest`, public as :func:`fineflow.keys.digest`), which an operator who knows a
key can compute to find its records. Error texts go through :func:`error_text`, which keeps
the first line of the message only and replaces the request's keys in it by their digests.

This module imports only the standard library, so every layer may use it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

__all__ = [
    "DIGEST_SECRET_ENV",
    "FIELDS",
    "MAX_TEXT",
    "error_text",
    "key_digest",
    "log_extra",
    "redact",
]

FIELDS = (
    "event",  # what happened, e.g. "ratelimit_denied", "circuit_breaker_transition"
    "rule",  # the rate-limit rule's name: the endpoint its state and stats are kept under
    "tier",  # the caller's tier under that rule
    "policy",  # the quota's policy name, e.g. "100/minute"
    "key_digest",  # key_digest(key): never the key itself
    "method",  # the request's method
    "path",  # the request's path, cut to MAX_TEXT, keys in it replaced by their digests
    "storage",  # the storage's class name: "PostgresStorage", "RedisStorage", ...
    "breaker",  # a circuit breaker's name
    "from_state",  # a breaker transition's states, e.g. "closed" -> "open"
    "to_state",
    "reason",  # why: "5 consecutive failures", "timeout", ...
    "error",  # error_text(exc): the exception's type and first line, keys replaced
    "count",  # how many: records suppressed, requests decided while failing, ...
)
"""The ``extra`` field names a fineflow log record may carry (besides ``event``, only those
that apply)."""

DIGEST_SECRET_ENV = "FINEFLOW_LOG_DIGEST_SECRET"
"""With this environment variable set, key digests are keyed by its value (BLAKE2b's keyed
mode): a digest of a guessable key (an IPv4 address) cannot then be reversed by trying every
candidate without the secret."""

DIGEST_HEX = 12
MAX_TEXT = 200


def key_digest(key: str) -> str:
    """The short digest logged in place of a rate-limit key: 12 hex digits of BLAKE2b.

    The same key gives the same digest in every process (with the same
    ``FINEFLOW_LOG_DIGEST_SECRET``, if set), so ``fineflow.keys.digest("sk-live-...")``
    finds a known caller's records. 48 bits: collisions among a few million keys are
    unlikely, not impossible; a digest identifies a key for searching logs, not for
    authorisation.
    """
    secret = os.environ.get(DIGEST_SECRET_ENV, "")
    digest = hashlib.blake2b(
        key.encode("utf-8", "surrogatepass"),
        digest_size=DIGEST_HEX // 2,
        # BLAKE2b takes keys of up to 64 bytes: a secret of any length is hashed down.
        key=hashlib.blake2b(secret.encode("utf-8", "surrogatepass")).digest() if secret else b"",
    )
    return digest.hexdigest()


def redact(text: str, keys: Iterable[str]) -> str:
    """``text`` with each of ``keys`` replaced by ``<key DIGEST>``, cut to 200 characters."""
    for key in keys:
        if key and key in text:
            text = text.replace(key, f"<key {key_digest(key)}>")
    return text[:MAX_TEXT]


def error_text(exc: BaseException, keys: Iterable[str] = ()) -> str:
    """``exc`` as a log field: ``"TypeName: first line of the message"``, cut to 200
    characters, with each of ``keys`` replaced by ``<key DIGEST>``.

    The first line only: drivers put the data of the failing row (which holds the key) in
    later lines, and a batched statement's error may quote other callers' keys too.
    """
    message = str(exc).partition("\n")[0]
    return redact(f"{type(exc).__name__}: {message}" if message else type(exc).__name__, keys)


def log_extra(event: str, /, *, key: str | None = None, **fields: object) -> dict[str, object]:
    """The ``extra`` dict of one fineflow log record.

    Args:
        event: the event name (the ``event`` field).
        key: a rate-limit key, logged as ``key_digest`` (never raw).
        fields: other fields, named as in :data:`FIELDS`; ``None`` values are left out.

    Raises:
        ValueError: for a field name not in :data:`FIELDS` (a typo at a call site).
    """
    extra: dict[str, object] = {"event": event}
    if key is not None:
        extra["key_digest"] = key_digest(key)
    for name, value in fields.items():
        if name not in FIELDS:
            raise ValueError(f"unknown log field {name!r}; the fields are {FIELDS}")
        if value is not None:
            extra[name] = value
    return extra
