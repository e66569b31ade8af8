"""The key cache in front of the key store, with an in-memory store and a clock the test moves.

Each test runs its own event loop (``asyncio.run``); a store call can be held open on an
``asyncio.Event`` to line up races exactly, with no sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

import pytest

from authz.apikeys import KeyRecord
from authz.errors import StoreUnavailable
from authz.keycache import RETRY, KeyCache
from authz.keystore import AuditEvent, KeyStore
from tests.conftest import FakeClock

T = TypeVar("T")
TTL, NEGATIVE_TTL = 30.0, 5.0


class FakeStore:
    """The KeyStore protocol in memory. ``gate``, when set, holds every ``get`` until it opens."""

    def __init__(self, *records: KeyRecord) -> None:
        self.records = {r.key_id: r for r in records}
        self.gets: list[str] = []
        self.touched: list[dict[str, float]] = []
        self.down = False
        self.failure: Exception | None = None  # raised by get, to model a bug behind the store
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.feed: asyncio.Queue[set[str] | None] = asyncio.Queue()
        self.on_touch: Callable[[], None] | None = None

    async def get(self, key_id: str) -> KeyRecord | None:
        self.gets.append(key_id)
        found = self.records.get(key_id)  # what the store holds when the read starts
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.failure is not None:
            raise self.failure
        if self.down:
            raise StoreUnavailable("fake store down")
        return found

    async def save(self, records: Sequence[KeyRecord], event: AuditEvent) -> None:
        self.records.update({r.key_id: r for r in records})

    async def all(self) -> list[KeyRecord]:
        return list(self.records.values())

    async def audit(self, event: AuditEvent) -> None:
        pass

    async def audit_log(self, limit: int = 1000) -> list[AuditEvent]:
        return []

    async def touch(self, used: Mapping[str, float]) -> None:
        if self.on_touch is not None:
            self.on_touch()
        if self.down:
            raise StoreUnavailable("fake store down")
        self.touched.append(dict(used))

    async def changes(self) -> AsyncIterator[set[str] | None]:
        while True:
            yield await self.feed.get()

    async def close(self) -> None:
        pass


def record(key_id: str, consumer: str = "acme", **fields: object) -> KeyRecord:
    return KeyRecord(key_id=key_id, digest="0" * 64, consumer=consumer, **fields)  # type: ignore[arg-type]


def make(*records: KeyRecord, max_entries: int = 100_000) -> tuple[KeyCache, FakeStore, FakeClock]:
    store, clock = FakeStore(*records), FakeClock(1_000.0)
    protocol: KeyStore = store  # the fake keeps to the protocol the real stores implement
    return KeyCache(protocol, clock, ttl=TTL, negative_ttl=NEGATIVE_TTL, max_entries=max_entries), store, clock


def run(scenario: Callable[[], Awaitable[T]]) -> T:
    """Run ``scenario`` in a fresh loop, bounded: a hang fails the test instead of stalling it."""

    async def bounded() -> T:
        return await asyncio.wait_for(scenario(), timeout=5.0)

    return asyncio.run(bounded())


def test_a_hit_needs_no_store_call() -> None:
    async def scenario() -> None:
        cache, store, _ = make(record("a"))
        assert await cache.get("a") == record("a")
        assert await cache.get("a") == record("a")
        assert await cache.get("a") == record("a")
        assert store.gets == ["a"]
        assert (cache.hits, cache.misses) == (2, 1)

    run(scenario)


def test_an_entry_expires_after_its_ttl() -> None:
    async def scenario() -> None:
        cache, store, clock = make(record("a"))
        await cache.get("a")
        store.records["a"] = record("a", consumer="changed")
        clock.now += TTL - 0.001
        assert (await cache.get("a")).consumer == "acme"  # type: ignore[union-attr]
        clock.now += 0.001
        assert (await cache.get("a")).consumer == "changed"  # type: ignore[union-attr]
        assert store.gets == ["a", "a"]

    run(scenario)


def test_unknown_ids_are_cached_for_the_negative_ttl() -> None:
    async def scenario() -> None:
        cache, store, clock = make()
        assert await cache.get("ghost") is None
        assert await cache.get("ghost") is None
        assert store.gets == ["ghost"]
        store.records["ghost"] = record("ghost")
        clock.now += NEGATIVE_TTL - 0.001
        assert await cache.get("ghost") is None  # still the negative entry
        clock.now += 0.001
        assert await cache.get("ghost") == record("ghost")
        assert store.gets == ["ghost", "ghost"]
        clock.now += NEGATIVE_TTL  # a found record keeps the (longer) positive TTL
        assert await cache.get("ghost") == record("ghost")
        assert len(store.gets) == 2

    run(scenario)


def test_invalidate_drops_the_named_ids_only() -> None:
    async def scenario() -> None:
        cache, store, _ = make(record("a"), record("b"))
        await cache.get("a")
        await cache.get("b")
        store.records["a"] = record("a", revoked=True)
        cache.invalidate({"a", "not-cached"})
        assert (await cache.get("a")).revoked  # type: ignore[union-attr]
        await cache.get("b")
        assert store.gets == ["a", "b", "a"]

    run(scenario)


def test_invalidate_none_drops_everything() -> None:
    async def scenario() -> None:
        cache, store, _ = make(record("a"), record("b"))
        for key_id in ("a", "b", "ghost"):
            await cache.get(key_id)
        cache.invalidate(None)
        for key_id in ("a", "b", "ghost"):
            await cache.get(key_id)
        assert store.gets == ["a", "b", "ghost", "a", "b", "ghost"]

    run(scenario)


def test_the_change_feed_invalidates() -> None:
    async def scenario() -> None:
        cache, store, _ = make(record("a"), record("b"))
        following = asyncio.create_task(cache.follow_changes())
        try:
            await cache.get("a")
            await cache.get("b")
            await store.feed.put({"a"})
            while store.feed.qsize():
                await asyncio.sleep(0)
            await asyncio.sleep(0)
            await cache.get("a")
            await cache.get("b")
            assert store.gets == ["a", "b", "a"]
        finally:
            following.cancel()
            with pytest.raises(asyncio.CancelledError):
                await following

    run(scenario)


def test_a_fetch_that_raced_an_invalidation_is_not_cached() -> None:
    async def scenario() -> None:
        cache, store, _ = make(record("a"))
        store.gate = asyncio.Event()
        fetch = asyncio.create_task(cache.get("a"))
        await store.entered.wait()  # the store read the old record...
        store.records["a"] = record("a", revoked=True)
        cache.invalidate({"a"})  # ...and the revocation arrived before the answer
        store.gate.set()
        assert await fetch == record("a")  # this caller got what the store said then
        assert (await cache.get("a")).revoked  # type: ignore[union-attr]  # not the cached old one
        assert store.gets == ["a", "a"]

    run(scenario)


def test_a_fetch_after_an_unrelated_invalidation_is_still_cached_later() -> None:
    async def scenario() -> None:
        cache, store, _ = make(record("a"))
        cache.invalidate({"b"})
        await cache.get("a")
        await cache.get("a")
        assert store.gets == ["a"]

    run(scenario)


def test_concurrent_misses_share_one_store_call() -> None:
    async def scenario() -> None:
        cache, store, _ = make(record("a"))
        store.gate = asyncio.Event()
        callers = [asyncio.create_task(cache.get("a")) for _ in range(20)]
        await store.entered.wait()
        await asyncio.sleep(0)
        store.gate.set()
        assert await asyncio.gather(*callers) == [record("a")] * 20
        assert store.gets == ["a"]
        await cache.get("a")
        assert store.gets == ["a"]

    run(scenario)


def test_concurrent_cold_misses_all_see_the_outage() -> None:
    async def scenario() -> None:
        cache, store, _ = make(record("a"))
        store.down = True
        store.gate = asyncio.Event()
        callers = [asyncio.create_task(cache.get("a")) for _ in range(5)]
        await store.entered.wait()
        store.gate.set()
        results = await asyncio.gather(*callers, return_exceptions=True)
        assert all(isinstance(r, StoreUnavailable) for r in results), results
        assert store.gets == ["a"]

    run(scenario)


def test_an_outage_serves_the_stale_entry() -> None:
    async def scenario() -> None:
        cache, store, clock = make(record("a"))
        await cache.get("a")
        clock.now += TTL * 10
        store.down = True
        assert await cache.get("a") == record("a")
        assert await cache.get("a") == record("a")
        assert store.gets == ["a", "a"]  # the store failed: asked again after RETRY, not per request
        clock.now += RETRY
        assert await cache.get("a") == record("a")
        assert store.gets == ["a", "a", "a"]  # it keeps asking: the outage may be over
        clock.now += RETRY
        store.down = False
        store.records["a"] = record("a", revoked=True)
        assert (await cache.get("a")).revoked  # type: ignore[union-attr]

    run(scenario)


def test_a_hung_store_serves_the_stale_entry_within_the_wait() -> None:
    """A store that does not answer (Redis stopped) costs a request at most ``wait``: a stale
    entry answers, and the fetch goes on for the next requests."""

    async def scenario() -> None:
        cache, store, clock = make(record("a"))
        cache.wait = 0.05
        await cache.get("a")
        clock.now += TTL * 10
        store.gate = asyncio.Event()  # hung
        started = asyncio.get_running_loop().time()
        assert await cache.get("a") == record("a")
        assert asyncio.get_running_loop().time() - started < 1.0
        assert await cache.get("a") == record("a")  # held for RETRY: no second wait
        assert store.gets == ["a", "a"]
        with pytest.raises(StoreUnavailable):  # a key never seen: 503, not a hang
            await cache.get("b")
        store.gate.set()

    run(scenario)


def test_an_outage_on_a_cold_miss_raises() -> None:
    async def scenario() -> None:
        cache, store, _ = make(record("a"))
        store.down = True
        with pytest.raises(StoreUnavailable):
            await cache.get("a")
        store.down = False
        assert await cache.get("a") == record("a")  # a failure is not cached

    run(scenario)


def test_an_invalidated_entry_is_not_served_stale() -> None:
    async def scenario() -> None:
        cache, store, _ = make(record("a"))
        await cache.get("a")
        cache.invalidate({"a"})  # a revocation reached us, then the store went away
        store.down = True
        with pytest.raises(StoreUnavailable):
            await cache.get("a")

    run(scenario)


def test_a_cancelled_fetcher_does_not_strand_the_callers_sharing_its_fetch() -> None:
    """Envoy cancels a Check at its ext_authz timeout: the others waiting on that fetch still get it."""

    async def scenario() -> None:
        cache, store, _ = make(record("a"))
        store.gate = asyncio.Event()
        first = asyncio.create_task(cache.get("a"))
        await store.entered.wait()
        second = asyncio.create_task(cache.get("a"))
        await asyncio.sleep(0)
        first.cancel()
        await asyncio.sleep(0)
        store.gate.set()
        assert await asyncio.wait_for(second, timeout=1.0) == record("a")

    run(scenario)


def test_an_unexpected_store_error_reaches_the_callers_sharing_the_fetch() -> None:
    """A corrupt record or a bug behind the store reaches every waiter instead of stranding them."""

    async def scenario() -> None:
        cache, store, _ = make(record("a"))
        store.gate = asyncio.Event()
        store.failure = ValueError("corrupt record")
        first = asyncio.create_task(cache.get("a"))
        await store.entered.wait()
        second = asyncio.create_task(cache.get("a"))
        await asyncio.sleep(0)
        store.gate.set()
        with pytest.raises(ValueError, match="corrupt record"):
            await first
        with pytest.raises(ValueError, match="corrupt record"):
            await asyncio.wait_for(second, timeout=1.0)

    run(scenario)


def test_usage_is_written_in_one_batch_with_the_latest_time() -> None:
    async def scenario() -> None:
        cache, store, clock = make()
        await cache.flush_usage()
        assert store.touched == []  # nothing to write, no call
        cache.used("a")
        clock.now += 1
        cache.used("b")
        clock.now += 1
        cache.used("a")
        await cache.flush_usage()
        assert store.touched == [{"a": 1002.0, "b": 1001.0}]
        await cache.flush_usage()
        assert len(store.touched) == 1  # the batch was taken

    run(scenario)


def test_usage_survives_a_failed_write() -> None:
    async def scenario() -> None:
        cache, store, clock = make()
        cache.used("a")
        cache.used("b")
        store.down = True
        await cache.flush_usage()  # does not raise: it keeps the batch for the next round
        assert store.touched == []
        store.down = False
        await cache.flush_usage()
        assert store.touched == [{"a": clock.now, "b": clock.now}]

    run(scenario)


def test_usage_recorded_during_a_failed_write_keeps_the_newer_time() -> None:
    async def scenario() -> None:
        cache, store, clock = make()
        cache.used("a")

        def a_request_meanwhile() -> None:
            clock.now += 5
            cache.used("a")

        store.on_touch = a_request_meanwhile
        store.down = True
        await cache.flush_usage()
        store.on_touch = None
        store.down = False
        await cache.flush_usage()
        assert store.touched == [{"a": 1005.0}]

    run(scenario)


def test_the_cache_holds_at_most_max_entries() -> None:
    async def scenario() -> None:
        cache, store, _ = make(*(record(f"k{i}") for i in range(50)), max_entries=10)
        for i in range(50):
            await cache.get(f"k{i}")
        assert len(cache._entries) <= 10
        calls = len(store.gets)
        await cache.get("k49")  # the newest is still there
        assert len(store.gets) == calls
        await cache.get("k0")  # the oldest went first
        assert len(store.gets) == calls + 1

    run(scenario)
