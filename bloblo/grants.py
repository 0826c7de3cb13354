"""Remembered authorizations: a client the upstream let read a blob, for BLOBLO_AUTH_CACHE_TTL.

An authorization is remembered for exactly the request that earned it: every header that reaches
the upstream except those that carry no identity, the client address, and the request target
(issue #6, part 1). A request that carries no credentials at all is never remembered. At most
MAX_REMEMBERED authorizations are kept per worker: beyond it the least recently used is forgotten
(issue #13, item 1).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

from cachetools import TTLCache

from .clients import Client

# Headers that say nothing about who asks: left out of the key, and alone they are no credentials.
NO_IDENTITY = frozenset(
    {
        "user-agent",
        "cache-control",
        "pragma",
        "via",
        "x-request-id",
        "x-correlation-id",
        "x-amzn-trace-id",
        "x-cloud-trace-context",
        "traceparent",
        "tracestate",
        "b3",
        "host",
        "content-length",
        "content-type",
    }
)
_NO_IDENTITY_PREFIXES = ("accept", "x-b3-", "x-datadog-")
# A request carries credentials when it has one of these; only such a request is remembered.
CREDENTIALS = frozenset({"authorization", "cookie"})
# Authorizations one worker remembers (a 32-byte key each: a few MiB at most); beyond it the
# least recently used is forgotten, and its client's next GET asks the upstream again.
MAX_REMEMBERED = 10_000


def _carries_no_identity(name: str) -> bool:
    return name in NO_IDENTITY or name.startswith(_NO_IDENTITY_PREFIXES)


class Grants:
    """Authorizations remembered for ttl seconds (0: never) as read on clock, at most maxsize of
    them, the least recently used forgotten first; keys are SHA-256 hashes, so no credential is
    kept in memory in the clear."""

    def __init__(self, ttl: float, clock: Callable[[], float], maxsize: int = MAX_REMEMBERED):
        self._ttl = ttl
        self._granted: TTLCache[bytes, bool] = TTLCache(maxsize=maxsize, ttl=ttl, timer=clock)

    def __len__(self) -> int:
        """How many fresh authorizations are remembered (never more than maxsize)."""
        return len(self._granted)

    def key(
        self, upstream_headers: Iterable[tuple[str, str]], client: Client, target: str
    ) -> bytes | None:
        """The key of a request, or None when it must not be remembered (no credentials, or
        no TTL). upstream_headers are the headers the request carries upstream."""
        if not self._ttl:
            return None
        identity = sorted(
            (name.lower(), value)
            for name, value in upstream_headers
            if not _carries_no_identity(name.lower())
        )
        if not any(name in CREDENTIALS for name, _ in identity):
            return None  # anonymous: the upstream's answer may change at any time
        material = [client.address, target, *(f"{n}: {v}" for n, v in identity)]
        return hashlib.sha256("\0".join(material).encode("utf-8", "surrogateescape")).digest()

    def allows(self, key: bytes | None) -> bool:
        """Whether an authorization for key is remembered and still fresh (a use: it is then
        the most recently used)."""
        return key is not None and self._granted.get(key, False)

    def grant(self, key: bytes | None) -> None:
        """Remember an authorization for key for ttl seconds from now, again if it was already
        (nothing when key is None)."""
        if key is not None:
            self._granted[key] = True
