"""Verified bearer tokens, in memory, keyed by the SHA-256 of the token (never the token).

A hit costs one digest, one dict lookup and one comparison with the clock: no signature and no
JSON. An entry never outlives what it caches — a JWT's ``exp``, an introspection answer's
``min(exp, cache_ttl)`` — and the cache is bounded: when full, the oldest tenth goes. One per
worker process; values are whatever the owner stores (``jwt.Verified``, a cached verdict).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Generic, TypeVar

V = TypeVar("V")
Clock = Callable[[], float]


def digest(token: str) -> bytes:
    """The cache key of a token: its SHA-256, so no token is kept in memory past the request."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class TokenCache(Generic[V]):
    def __init__(self, clock: Clock, max_entries: int = 100_000) -> None:
        self.clock = clock
        self.max_entries = max_entries
        self._entries: dict[bytes, tuple[V, float]] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: bytes) -> V | None:
        """The value stored for ``key`` while it has not expired, else None."""
        entry = self._entries.get(key)
        if entry is not None:
            if entry[1] > self.clock():
                self.hits += 1
                return entry[0]
            del self._entries[key]
        self.misses += 1
        return None

    def put(self, key: bytes, value: V, expires: float) -> None:
        """Keep ``value`` until ``expires`` (an absolute time on the cache's clock)."""
        now = self.clock()
        if expires <= now:
            return
        if key not in self._entries and len(self._entries) >= self.max_entries:
            self._evict(now)
        self._entries[key] = (value, expires)

    def _evict(self, now: float) -> None:
        expired = [key for key, (_, expires) in self._entries.items() if expires <= now]
        for key in expired:
            del self._entries[key]
        if len(self._entries) >= self.max_entries:
            for key in list(self._entries)[: max(1, self.max_entries // 10)]:  # the oldest tenth
                del self._entries[key]

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
