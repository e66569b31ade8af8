"""An in-memory cache of key records in front of the key store, one per worker process.

* Hits cost a dict lookup; misses go to the store once per id even under a burst
  (concurrent misses share one fetch), and unknown ids are cached too (negative caching).
* Every change in the store reaches ``invalidate`` through the store's change feed, so a
  revoked key is dropped within the feed's delay (well under a second); the TTL is only a
  safety net. A fetch that raced an invalidation is not cached (generation check).
* When the store is down or slow, entries already cached keep answering (stale is better than
  a gateway-wide outage, and nothing can be revoked while the store is down either). A request
  waits at most ``wait`` for the store: past it, a stale entry answers and the fetch goes on in
  the background, and a key never seen is ``StoreUnavailable`` (503 ``key_store_unavailable``),
  well before Envoy's own timeout turns the call into a 503 ``sidecar_unavailable``. After a
  failed or slow fetch a stale entry is served for ``retry`` more seconds before the store is
  asked again, so a dead or hung store costs one fetch per key and second, not one per request.
* Usage times are gathered in memory and written to the store in one batch per interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from authz.apikeys import KeyRecord
from authz.errors import StoreUnavailable
from authz.keystore import KeyStore
from sidegate import telemetry

log = logging.getLogger("authz.keycache")
_HIT = telemetry.CACHE.labels("authz", "api_keys", "hit")
_MISS = telemetry.CACHE.labels("authz", "api_keys", "miss")
_STORE_ERRORS = telemetry.STORE_ERRORS.labels("authz", "api_keys")
_STORE_SECONDS = telemetry.STORE_SECONDS.labels("authz", "api_keys")
Clock = Callable[[], float]
WAIT = 0.15  # seconds a request waits on the store (Envoy gives authz 0.25 s by default)
RETRY = 1.0  # seconds a stale entry answers after the store failed to, before asking again


@dataclass(frozen=True)
class _Entry:
    record: KeyRecord | None
    fresh_until: float


class KeyCache:
    def __init__(
        self,
        store: KeyStore,
        clock: Clock,
        *,
        ttl: float,
        negative_ttl: float,
        max_entries: int = 100_000,
        wait: float = WAIT,
        retry: float = RETRY,
    ) -> None:
        self.store = store
        self.clock = clock
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.max_entries = max_entries
        self.wait = wait
        self.retry = retry
        self._entries: dict[str, _Entry] = {}
        self._inflight: dict[str, asyncio.Future[KeyRecord | None]] = {}
        self._generation = 0
        self._used: dict[str, float] = {}
        self.hits = 0
        self.misses = 0

    async def get(self, key_id: str) -> KeyRecord | None:
        """The record for ``key_id`` (None if unknown); raises StoreUnavailable only on a cold miss."""
        entry = self._entries.get(key_id)
        if entry is not None and entry.fresh_until > self.clock():
            self.hits += 1
            _HIT.inc()
            return entry.record
        self.misses += 1
        _MISS.inc()
        task = self._inflight.get(key_id)
        if task is None:
            # One fetch per id, in a task of its own: a caller cancelled by Envoy's timeout
            # leaves it running for the others, and its outcome reaches every waiter.
            task = asyncio.ensure_future(self._fetch(key_id, entry))
            self._inflight[key_id] = task
            task.add_done_callback(functools.partial(self._done, key_id))
        # asyncio.wait, not asyncio.timeout: the sidecars' server runs a call's first steps
        # outside any task, and waiting never cancels the shared fetch.
        done, _ = await asyncio.wait((task,), timeout=self.wait)
        if done:
            return task.result()
        _STORE_ERRORS.inc()
        if entry is not None and self._entries.get(key_id) is entry:
            self._hold(key_id, entry)
            return entry.record
        raise StoreUnavailable("key store: no answer in time")

    def _hold(self, key_id: str, entry: _Entry) -> None:
        """Serve a stale ``entry`` for ``retry`` more seconds: the store failed to answer for it."""
        self._entries[key_id] = _Entry(entry.record, self.clock() + self.retry)

    async def _fetch(self, key_id: str, entry: _Entry | None) -> KeyRecord | None:
        generation = self._generation
        started = time.perf_counter()
        try:
            record = await self.store.get(key_id)
        except StoreUnavailable:
            _STORE_ERRORS.inc()
            if entry is not None and self._entries.get(key_id) is entry:  # stale beats an outage
                self._hold(key_id, entry)
                return entry.record
            raise
        _STORE_SECONDS.observe(time.perf_counter() - started)
        if generation == self._generation:
            self._put(key_id, record)
        return record

    def _done(self, key_id: str, task: asyncio.Future[KeyRecord | None]) -> None:
        if self._inflight.get(key_id) is task:
            del self._inflight[key_id]
        if not task.cancelled():
            task.exception()  # retrieved: the waiters re-raise it; nobody else must log it

    def _put(self, key_id: str, record: KeyRecord | None) -> None:
        if len(self._entries) >= self.max_entries:
            for old in list(self._entries)[: self.max_entries // 10 or 1]:  # oldest tenth
                del self._entries[old]
        ttl = self.ttl if record is not None else self.negative_ttl
        self._entries[key_id] = _Entry(record, self.clock() + ttl)

    def invalidate(self, key_ids: set[str] | None) -> None:
        """Drop ``key_ids`` (all entries when None)."""
        self._generation += 1
        if key_ids is None:
            self._entries.clear()
        else:
            for key_id in key_ids:
                self._entries.pop(key_id, None)

    def used(self, key_id: str) -> None:
        self._used[key_id] = self.clock()

    async def follow_changes(self) -> None:
        """Apply the store's change feed until cancelled."""
        async for key_ids in self.store.changes():
            self.invalidate(key_ids)

    async def flush_usage(self) -> None:
        if not self._used:
            return
        batch, self._used = self._used, {}
        try:
            await self.store.touch(batch)
        except StoreUnavailable:
            for key_id, at in batch.items():  # keep them for the next round
                self._used.setdefault(key_id, at)

    async def write_usage_every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(StoreUnavailable):
                await self.flush_usage()
