"""The one memo type of authz: a bounded dict whose entries may expire.

Every cache in authz is a ``Memo``: verified tokens (keyed by the token's SHA-256, never the
token), introspection answers, key decisions, response protos, rate-limit shapes. A hit costs
one dict lookup, and one comparison with the clock when the entry expires. An entry never
outlives the time it was given, and the memo is bounded: when full, expired entries go, then the
oldest tenth. Keys are values (digests, names, tuples of them), never object identities, so a
memo stays right when a reload builds new objects. One per owner and worker process.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
Clock = Callable[[], float]


def digest(token: str) -> bytes:
    """The memo key of a secret: its SHA-256, so no token is kept in memory past the request."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def _never() -> float:
    return 0.0


class Memo(Generic[K, V]):
    """``get``/``put`` with an optional expiry per entry (an absolute time on ``clock``)."""

    def __init__(self, max_entries: int = 100_000, clock: Clock = _never) -> None:
        self.clock = clock
        self.max_entries = max_entries
        self._entries: dict[K, tuple[V, float]] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: K) -> V | None:
        """The value stored for ``key`` while it has not expired, else None."""
        entry = self._entries.get(key)
        if entry is not None:
            if entry[1] == math.inf or entry[1] > self.clock():
                self.hits += 1
                return entry[0]
            del self._entries[key]
        self.misses += 1
        return None

    def put(self, key: K, value: V, expires: float = math.inf) -> None:
        """Keep ``value`` until ``expires`` (forever, within the bound, when not given)."""
        if expires != math.inf and expires <= self.clock():
            return
        if key not in self._entries and len(self._entries) >= self.max_entries:
            self._evict()
        self._entries[key] = (value, expires)

    def _evict(self) -> None:
        now = self.clock()
        expired = [key for key, (_, expires) in self._entries.items() if expires <= now]
        for key in expired:
            del self._entries[key]
        if len(self._entries) >= self.max_entries:
            for key in list(self._entries)[: max(1, self.max_entries // 10)]:  # the oldest tenth
                del self._entries[key]

    def drop(self, keep: Callable[[V], bool]) -> int:
        """Drop every entry whose value ``keep`` refuses; how many went."""
        gone = [key for key, (value, _) in self._entries.items() if not keep(value)]
        for key in gone:
            del self._entries[key]
        return len(gone)

    def values(self) -> Iterator[V]:
        return (value for value, _ in self._entries.values())

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
