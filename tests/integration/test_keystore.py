"""The key store contract, one suite run against both backends: SQLite on a temp file and Redis
on the session's real redis-server (flushed before each test). Then the key service on top,
a move between backends, and what an unreachable Redis looks like.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import pytest
import redis

from authz import apikeys
from authz.apikeys import KeyRecord
from authz.errors import KeyNotFound, StoreUnavailable
from authz.keyservice import KeyService
from authz.keystore import AuditEvent, KeyStore, RedisKeyStore, SqliteKeyStore
from sidegate.config import ApiKeys
from tests.conftest import FakeClock, RedisServer

T = TypeVar("T")
PEPPER = b"integration-pepper"
POLICY = ApiKeys()
T0 = 1_700_000_000.0
FEED_DEADLINE = 1.0  # the promise: a change reaches every process within a second


@dataclass
class Backend:
    name: str
    make: Callable[[], KeyStore]  # a new client of the same store (another process's view)


def sqlite_backend(path: Path) -> Backend:
    return Backend("sqlite", lambda: SqliteKeyStore(path))


def redis_backend(server: RedisServer) -> Backend:
    with redis.Redis.from_url(server.url) as client:
        client.flushall()
    return Backend("redis", lambda: RedisKeyStore(server.url))


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return sqlite_backend(tmp_path / "keys.db")
    return redis_backend(request.getfixturevalue("redis_server"))


def run(scenario: Callable[[], Awaitable[T]], timeout: float = 20.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(scenario(), timeout)

    return asyncio.run(bounded())


def record(key_id: str, consumer: str = "acme", **fields: object) -> KeyRecord:
    values: dict[str, object] = {"scopes": ("orders:read",), "created_at": T0}
    values.update(fields)
    digest = hashlib.sha256(key_id.encode()).hexdigest()
    return KeyRecord(key_id=key_id, digest=digest, consumer=consumer, **values)  # type: ignore[arg-type]


def event(action: str, key_id: str | None = None, at: float = T0, **fields: str) -> AuditEvent:
    return AuditEvent(at=at, actor="tester", action=action, key_id=key_id, **fields)


# --- records --------------------------------------------------------------------------------


def test_save_get_all_round_trip(backend: Backend) -> None:
    full = KeyRecord(
        key_id="full",
        digest="ab" * 32,
        consumer="acme",
        scopes=("orders:read", "orders:write"),
        plan="gold",
        version="v2",
        expires_at=T0 + 0.5,
        created_at=T0 + 0.25,
        created_by="alice",
        rotated_at=T0 + 0.125,
        rotated_by="bob",
        successor="next",
    )
    bare = record("bare", created_at=T0 + 1)

    async def scenario() -> None:
        store = backend.make()
        try:
            assert await store.get("full") is None
            assert await store.all() == []
            await store.save([full], event("create", "full"))
            await store.save([bare], event("create", "bare"))
            assert await store.get("full") == full
            assert await store.get("bare") == bare
            assert await store.get("nope") is None
            assert await store.all() == [full, bare]
            revoked = replace(full, revoked=True, revoked_at=T0 + 2, revoked_by="carol")
            await store.save([revoked], event("revoke", "full"))
            assert await store.get("full") == revoked
            assert await store.all() == [revoked, bare]  # replaced, not added
        finally:
            await store.close()

    run(scenario)


def test_a_save_of_two_records_is_one_change_with_one_audit_event(backend: Backend) -> None:
    async def scenario() -> None:
        store = backend.make()
        try:
            old, new = record("old"), record("new", created_at=T0 + 1)
            await store.save([old], event("create", "old"))
            retired = replace(old, successor="new", expires_at=T0 + 60, rotated_at=T0 + 1, rotated_by="tester")
            await store.save([retired, new], event("rotate", "old", detail="successor=new"))
            assert await store.get("old") == retired
            assert await store.get("new") == new
            assert [e.action for e in await store.audit_log()] == ["create", "rotate"]
        finally:
            await store.close()

    run(scenario)


def test_a_save_that_fails_part_way_leaves_nothing(backend: Backend) -> None:
    async def scenario() -> None:
        store = backend.make()
        try:
            broken = record("broken", plan=object())  # cannot be serialised
            with pytest.raises(TypeError):
                await store.save([record("good"), broken], event("import"))
            assert await store.get("good") is None
            assert await store.all() == []
            assert await store.audit_log() == []
        finally:
            await store.close()

    run(scenario)


# --- the audit trail -----------------------------------------------------------------------


def test_the_audit_log_keeps_order_and_content_and_never_a_key(backend: Backend) -> None:
    async def scenario() -> None:
        store, clock = backend.make(), FakeClock(T0)
        service = KeyService(store, PEPPER, POLICY, clock)
        try:
            issued = await service.create(consumer="acme", scopes=["orders:read", "orders:write"], actor="alice")
            clock.now += 1
            _, successor = await service.rotate(issued.record.key_id, actor="bob", grace=3600)
            clock.now += 1
            await service.revoke(successor.record.key_id, actor="carol", reason="leaked")
            clock.now += 1
            await store.audit(AuditEvent(clock.now, "admin-api:mallory", "admin_denied", detail="list"))
            log = await store.audit_log()
            old_id, new_id = issued.record.key_id, successor.record.key_id
            assert log == [
                AuditEvent(T0, "alice", "create", old_id, "acme", "scopes=orders:read orders:write"),
                AuditEvent(T0 + 1, "bob", "rotate", old_id, "acme", f"successor={new_id} grace=3600s"),
                AuditEvent(T0 + 2, "carol", "revoke", new_id, "acme", "leaked"),
                AuditEvent(T0 + 3, "admin-api:mallory", "admin_denied", None, None, "list"),
            ]
            assert await store.audit_log(limit=2) == log[-2:]  # the latest, oldest first
            text = json.dumps([vars(e) for e in log])
            for secret in (issued.key, successor.key, issued.record.digest, successor.record.digest):
                assert secret not in text
        finally:
            await store.close()

    run(scenario)


def test_sqlite_audit_trail_is_append_only(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"

    async def fill() -> None:
        store = SqliteKeyStore(path)
        try:
            await store.save([record("a")], event("create", "a"))
        finally:
            await store.close()

    run(fill)
    db = sqlite3.connect(path)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute("UPDATE audit SET actor = 'someone else'")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute("DELETE FROM audit")
        db.execute("INSERT INTO audit (at, actor, action) VALUES (1, 'x', 'y')")  # appending still works
        db.commit()
        assert db.execute("SELECT actor FROM audit ORDER BY seq").fetchall() == [("tester",), ("x",)]
    finally:
        db.close()


# --- usage times ---------------------------------------------------------------------------


def test_touch_sets_last_used_and_survives_a_revoke(backend: Backend) -> None:
    async def scenario() -> None:
        store = backend.make()
        try:
            await store.save([record("a"), record("b")], event("create", "a"))
            await store.touch({"a": T0 + 10})
            used = await store.get("a")
            assert used is not None
            assert used.last_used_at == T0 + 10
            assert (await store.get("b")).last_used_at is None  # type: ignore[union-attr]
            assert [r.last_used_at for r in await store.all()] == [T0 + 10, None]
            # A revoke written from a record read before the last use keeps the use...
            await store.save([replace(record("a"), revoked=True)], event("revoke", "a"))
            after = await store.get("a")
            assert after is not None
            assert after.revoked
            assert after.last_used_at == T0 + 10
            # ...and a later use never brings the key back.
            await store.touch({"a": T0 + 20})
            again = await store.get("a")
            assert again is not None
            assert again.revoked
            assert again.last_used_at == T0 + 20
            await store.touch({})  # nothing to write is fine
        finally:
            await store.close()

    run(scenario)


@pytest.mark.parametrize(
    "backend",
    [
        "sqlite",
        "redis",
    ],
    indirect=True,
)
def test_an_older_use_does_not_move_last_used_back(backend: Backend) -> None:
    async def scenario() -> None:
        store = backend.make()
        try:
            await store.save([record("a")], event("create", "a"))
            await store.touch({"a": T0 + 20})  # replica 1 flushes
            await store.touch({"a": T0 + 5})  # replica 2 flushes a use it saw earlier
            assert (await store.get("a")).last_used_at == T0 + 20  # type: ignore[union-attr]
        finally:
            await store.close()

    run(scenario)


# --- the change feed -------------------------------------------------------------------------


class Feed:
    """Another store instance's change feed, collected in a queue by a task."""

    def __init__(self, store: KeyStore) -> None:
        self.store = store
        self.items: asyncio.Queue[set[str] | None] = asyncio.Queue()
        self.task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        async for item in self.store.changes():
            await self.items.put(item)

    async def ready(self, writer: KeyStore) -> None:
        """Save probes until one comes through: the feed is then surely listening."""
        deadline = time.monotonic() + 10
        probe = 0
        while True:
            probe += 1
            await writer.save([record(f"probe{probe}")], event("create", f"probe{probe}"))
            if await self.wait_for(f"probe{probe}", 0.5, accept_reset=False) is not None:
                break
            assert time.monotonic() < deadline, "the change feed never started"
        while not self.items.empty():
            self.items.get_nowait()

    async def wait_for(self, key_id: str, within: float, *, accept_reset: bool = True) -> float | None:
        """Seconds until ``key_id`` (or, if accepted, a drop-everything ``None``) arrives; None if not in time."""
        start = time.monotonic()
        while (left := within - (time.monotonic() - start)) > 0:
            try:
                item = await asyncio.wait_for(self.items.get(), left)
            except TimeoutError:
                return None
            if (item is None and accept_reset) or (item is not None and key_id in item):
                return time.monotonic() - start
        return None

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.store.close()


def test_a_change_reaches_another_store_instance_within_a_second(backend: Backend) -> None:
    async def scenario() -> None:
        writer = backend.make()
        feed = Feed(backend.make())
        try:
            await feed.ready(writer)
            await writer.save([record("a")], event("create", "a"))
            assert await feed.wait_for("a", FEED_DEADLINE, accept_reset=False) is not None
            await writer.save([replace(record("a"), revoked=True)], event("revoke", "a"))
            took = await feed.wait_for("a", FEED_DEADLINE, accept_reset=False)
            assert took is not None, f"{backend.name}: the revocation did not arrive within {FEED_DEADLINE}s"
            print(f"{backend.name}: a revocation reached another instance in {took * 1000:.0f} ms")
            await writer.touch({"a": T0})
            assert await feed.wait_for("a", 0.5) is None  # a usage update is not a change
        finally:
            await feed.close()
            await writer.close()

    run(scenario)


@pytest.mark.parametrize(
    "backend",
    [
        "sqlite",
        "redis",
    ],
    indirect=True,
)
def test_imported_records_reach_the_change_feed(backend: Backend) -> None:
    async def scenario() -> None:
        writer = backend.make()
        feed = Feed(backend.make())
        try:
            await writer.save([record("a")], event("create", "a"))
            await feed.ready(writer)
            service = KeyService(writer, PEPPER, POLICY, FakeClock(T0))
            await service.import_records([replace(record("a"), revoked=True).to_dict()], actor="restore")
            assert await feed.wait_for("a", FEED_DEADLINE) is not None
        finally:
            await feed.close()
            await writer.close()

    run(scenario)


# --- the key service on each backend ---------------------------------------------------------


def verdict(key: str, found: KeyRecord | None, now: float, pepper: bytes = PEPPER) -> str:
    return apikeys.check(
        key, apikeys.parse(key), found, pepper=pepper, prefix=POLICY.prefix, environment=POLICY.environment, now=now
    )


async def verdict_of(store: KeyStore, key: str, now: float, pepper: bytes = PEPPER) -> str:
    parsed = apikeys.parse(key)
    assert parsed is not None
    return verdict(key, await store.get(parsed.key_id), now, pepper)


def test_create_rotate_with_grace_revoke(backend: Backend) -> None:
    async def scenario() -> None:
        store, clock = backend.make(), FakeClock(T0)
        service = KeyService(store, PEPPER, POLICY, clock)
        try:
            issued = await service.create(
                consumer="acme", scopes=["orders:read"], actor="alice", plan="gold", version="v1", expires_in=86400
            )
            assert issued.record.expires_at == T0 + 86400
            assert await verdict_of(store, issued.key, clock.now) == apikeys.OK
            stored = await store.get(issued.record.key_id)
            assert stored == issued.record
            assert stored is not None
            assert issued.key not in json.dumps(stored.to_dict())

            clock.now += 100
            retired, successor = await service.rotate(issued.record.key_id, actor="bob", grace=60)
            assert retired.expires_at == T0 + 160
            assert retired.successor == successor.record.key_id
            assert (successor.record.consumer, successor.record.plan, successor.record.version) == (
                "acme",
                "gold",
                "v1",
            )
            assert successor.record.scopes == ("orders:read",)
            assert successor.record.expires_at == T0 + 86400  # the successor keeps the original expiry
            assert await verdict_of(store, issued.key, T0 + 159.9) == apikeys.OK  # grace
            assert await verdict_of(store, issued.key, T0 + 160) == apikeys.EXPIRED  # then stops by itself
            assert await verdict_of(store, successor.key, T0 + 160) == apikeys.OK

            clock.now = T0 + 200
            with pytest.raises(ValueError, match="expired"):
                await service.rotate(issued.record.key_id, actor="bob", grace=60)  # only active keys rotate
            revoked = await service.revoke(successor.record.key_id, actor="carol", reason="leaked")
            assert (revoked.revoked, revoked.revoked_by, revoked.revoked_at) == (True, "carol", T0 + 200)
            assert await verdict_of(store, successor.key, clock.now) == apikeys.REVOKED
            assert await service.revoke(successor.record.key_id, actor="dave") == revoked  # idempotent
            assert [e.action for e in await service.audit_log()] == ["create", "rotate", "revoke"]

            with pytest.raises(KeyNotFound):
                await service.revoke("nosuchkey", actor="carol")
            with pytest.raises(KeyNotFound):
                await service.rotate("nosuchkey", actor="carol", grace=1)
        finally:
            await store.close()

    run(scenario)


def test_rotate_never_extends_an_earlier_expiry(backend: Backend) -> None:
    async def scenario() -> None:
        store, clock = backend.make(), FakeClock(T0)
        service = KeyService(store, PEPPER, POLICY, clock)
        try:
            issued = await service.create(consumer="acme", scopes=[], actor="a", expires_in=30)
            retired, _ = await service.rotate(issued.record.key_id, actor="a", grace=3600)
            assert retired.expires_at == T0 + 30
        finally:
            await store.close()

    run(scenario)


class HeldSaves:
    """A store whose saves for one action wait for ``release``: to line two writers up exactly."""

    def __init__(self, store: KeyStore, action: str) -> None:
        self.store, self.action = store, action
        self.reached, self.release = asyncio.Event(), asyncio.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(self.store, name)

    async def save(self, records: Sequence[KeyRecord], event: AuditEvent) -> None:
        if event.action == self.action:
            self.reached.set()
            await self.release.wait()
        await self.store.save(records, event)


def test_a_rotation_racing_a_revocation_never_undoes_it(backend: Backend) -> None:
    async def scenario() -> None:
        rotating_store, revoking_store, clock = backend.make(), backend.make(), FakeClock(T0)
        held = HeldSaves(rotating_store, "rotate")
        rotator = KeyService(held, PEPPER, POLICY, clock)  # type: ignore[arg-type]
        revoker = KeyService(revoking_store, PEPPER, POLICY, clock)
        try:
            issued = await revoker.create(consumer="acme", scopes=[], actor="cli")
            rotation = asyncio.create_task(rotator.rotate(issued.record.key_id, actor="automation", grace=86400))
            await held.reached.wait()  # the rotation has read the key and is about to write
            await revoker.revoke(issued.record.key_id, actor="security", reason="leaked")
            held.release.set()
            await asyncio.gather(rotation, return_exceptions=True)  # refusing the rotation would be fine
            assert await verdict_of(revoking_store, issued.key, clock.now) == apikeys.REVOKED
        finally:
            await rotating_store.close()
            await revoking_store.close()

    run(scenario)


@pytest.mark.parametrize("direction", ["sqlite-to-redis", "redis-to-sqlite"])
def test_export_then_import_moves_keys_between_backends(
    direction: str, tmp_path: Path, redis_server: RedisServer
) -> None:
    sqlite, redis_ = sqlite_backend(tmp_path / "keys.db"), redis_backend(redis_server)
    source, target = (sqlite, redis_) if direction == "sqlite-to-redis" else (redis_, sqlite)

    async def scenario() -> None:
        clock = FakeClock(T0)
        origin, destination = source.make(), target.make()
        try:
            service = KeyService(origin, PEPPER, POLICY, clock)
            kept = await service.create(consumer="acme", scopes=["orders:read"], actor="alice", plan="gold")
            clock.now += 1
            gone = await service.create(consumer="evil", scopes=[], actor="alice")
            await service.revoke(gone.record.key_id, actor="alice")
            await origin.touch({kept.record.key_id: T0 + 5})

            exported = json.loads(json.dumps(await service.export()))  # what travels is plain JSON
            text = json.dumps(exported)
            assert kept.key not in text
            assert gone.key not in text
            assert kept.record.digest in text  # digests travel: they are useless without the pepper

            moved = KeyService(destination, PEPPER, POLICY, clock)
            assert await moved.import_records(exported, actor="mover") == 2
            assert await verdict_of(destination, kept.key, clock.now) == apikeys.OK
            assert await verdict_of(destination, gone.key, clock.now) == apikeys.REVOKED
            assert await verdict_of(destination, kept.key, clock.now, pepper=b"another pepper") == apikeys.UNKNOWN
            assert {r.key_id for r in await destination.all()} == {kept.record.key_id, gone.record.key_id}
            imported = await destination.get(kept.record.key_id)
            assert imported is not None
            assert (imported.consumer, imported.plan, imported.scopes) == ("acme", "gold", ("orders:read",))
            assert (await destination.audit_log())[-1].action == "import"
        finally:
            await origin.close()
            await destination.close()

    run(scenario)


@pytest.mark.parametrize(
    ("rows", "problem"),
    [
        ([{"key_id": "a", "consumer": "c"}], "^record 1: .*digest"),  # no digest
        ([{"key_id": "a", "digest": "short", "consumer": "c"}], "^record 1: needs key_id and a 64-hex-digit digest"),
        ([{"key_id": "", "digest": "0" * 64, "consumer": "c"}], "^record 1: needs key_id"),
    ],
)
def test_import_refuses_bad_rows_and_writes_nothing(
    backend: Backend, rows: list[dict[str, object]], problem: str
) -> None:
    async def scenario() -> None:
        store = backend.make()
        try:
            service = KeyService(store, PEPPER, POLICY, FakeClock(T0))
            good = {"key_id": "ok", "digest": "0" * 64, "consumer": "c"}
            with pytest.raises(ValueError, match=problem):
                await service.import_records([good, *rows], actor="x")
            assert await store.all() == []
            assert await store.audit_log() == []
        finally:
            await store.close()

    run(scenario)


# --- an unreachable Redis ----------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def store_calls(store: KeyStore) -> list[Callable[[], Awaitable[object]]]:
    return [
        lambda: store.get("a"),
        lambda: store.save([record("a")], event("create", "a")),
        store.all,
        lambda: store.audit(event("admin_denied")),
        store.audit_log,
        lambda: store.touch({"a": T0}),
    ]


def test_redis_down_is_store_unavailable_not_a_redis_error() -> None:
    async def scenario() -> None:
        store = RedisKeyStore(f"redis://127.0.0.1:{closed_port()}/0")
        try:
            for call in store_calls(store):
                started = time.monotonic()
                with pytest.raises(StoreUnavailable, match=r"^redis: ") as caught:
                    await asyncio.wait_for(call(), timeout=5.0)  # a hang would be TimeoutError
                assert isinstance(caught.value.__cause__, redis.exceptions.ConnectionError)
                assert time.monotonic() - started < 5.0
        finally:
            await store.close()

    run(scenario)


def test_a_redis_that_never_answers_is_store_unavailable_within_the_timeout() -> None:
    with socket.socket() as silent:  # accepts connections, never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"

        async def scenario() -> None:
            store = RedisKeyStore(url, timeout=0.2)
            try:
                started = time.monotonic()
                with pytest.raises(StoreUnavailable):
                    await asyncio.wait_for(store.get("a"), timeout=5.0)
                assert time.monotonic() - started < 5.0
            finally:
                await store.close()

        run(scenario)
