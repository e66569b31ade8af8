"""The key-management gRPC API for real: ``authz.admin.start`` on a free loopback port, called with
a grpc.aio client through the generated stubs, over a SQLite key store in a temp dir."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from authz import admin, apikeys
from authz.apikeys import KeyRecord
from authz.keyservice import KeyService
from authz.keystore import KeyStore, RedisKeyStore, SqliteKeyStore
from sidegate.admin.v1 import keys_pb2 as pb
from sidegate.admin.v1 import keys_pb2_grpc
from sidegate.config import ApiKeys
from tests.conftest import FakeClock, free_port

T = TypeVar("T")
TOKEN = "admin-token-for-tests"
PEPPER = b"admin-test-pepper"
POLICY = ApiKeys()
T0 = 1_700_000_000.0
AS_ALICE = (("authorization", f"Bearer {TOKEN}"), ("x-actor", "alice"))
KEY_SHAPE = re.compile(r"^sg_live_[a-z2-7]+_[a-z2-7]{32}$")


def run(scenario: Callable[[], Awaitable[T]]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(scenario(), timeout=20.0)

    return asyncio.run(bounded())


@contextlib.asynccontextmanager
async def admin_api(service: KeyService) -> AsyncIterator[Any]:
    """The admin server on a free port and a stub for it; stopped on exit."""
    port = free_port()
    server = await admin.start(service, TOKEN, "127.0.0.1", port)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield keys_pb2_grpc.KeyAdminStub(channel)  # type: ignore[no-untyped-call]
    finally:
        await server.stop(None)


@contextlib.asynccontextmanager
async def sqlite_service(path: Path) -> AsyncIterator[tuple[KeyService, KeyStore, FakeClock]]:
    store, clock = SqliteKeyStore(path), FakeClock(T0)
    try:
        yield KeyService(store, PEPPER, POLICY, clock), store, clock
    finally:
        await store.close()


async def refused(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def leaks(message: Any, *secrets: str) -> list[str]:
    """Which of ``secrets`` appear in a response, in its wire bytes or its text form."""
    wire, text = message.SerializeToString(), str(message)
    return [s[:12] for s in secrets if s.encode() in wire or s in text]


# --- who may call ---------------------------------------------------------------------------


def test_a_call_without_a_token_is_refused_audited_and_does_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with sqlite_service(tmp_path / "keys.db") as (service, store, _), admin_api(service) as stub:
            error = await refused(stub.Create(pb.CreateRequest(consumer="mallory", scopes=["*"]), timeout=5))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            assert error.details() == "admin token required"
            error = await refused(stub.List(pb.ListRequest(), metadata=(("x-actor", "mallory"),), timeout=5))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            assert await store.all() == []  # the refused Create wrote nothing
            denied = [(e.actor, e.action, e.detail, e.key_id) for e in await store.audit_log()]
            assert denied == [
                ("admin-api:anonymous", "admin_denied", "create", None),
                ("admin-api:mallory", "admin_denied", "list", None),
            ]

    run(scenario)


@pytest.mark.parametrize(
    "authorization",
    [f"Bearer {TOKEN}x", "Bearer wrong", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN[:-1]}", "Bearer "],
)
def test_a_wrong_token_is_refused(tmp_path: Path, authorization: str) -> None:
    async def scenario() -> None:
        async with sqlite_service(tmp_path / "keys.db") as (service, store, _), admin_api(service) as stub:
            metadata = (("authorization", authorization),)
            error = await refused(stub.Audit(pb.AuditRequest(), metadata=metadata, timeout=5))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            assert [e.action for e in await store.audit_log()] == ["admin_denied"]

    run(scenario)


def test_the_right_token_is_accepted(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with sqlite_service(tmp_path / "keys.db") as (service, _, _), admin_api(service) as stub:
            reply = await stub.Audit(pb.AuditRequest(), metadata=AS_ALICE, timeout=5)
            assert list(reply.events) == []  # an accepted call is not audited as a refusal

    run(scenario)


# --- the operations -------------------------------------------------------------------------


def test_key_message_is_the_public_record() -> None:
    record = KeyRecord(
        key_id="abc", digest="f" * 64, consumer="acme", scopes=("a", "b"), revoked=True, revoked_by="carol"
    )
    message = admin.key_message(record, T0)
    assert (message.key_id, message.status, message.revoked_by, list(message.scopes)) == (
        "abc",
        "revoked",
        "carol",
        ["a", "b"],
    )
    assert not leaks(message, "f" * 64)


def test_create_returns_the_key_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with sqlite_service(tmp_path / "keys.db") as (service, store, _), admin_api(service) as stub:
            request = pb.CreateRequest(
                consumer="acme", scopes=["orders:read"], plan="gold", version="v2", expires_in_seconds=3600
            )
            issued = await stub.Create(request, metadata=AS_ALICE, timeout=5)
            assert KEY_SHAPE.match(issued.key), issued.key
            record = issued.record
            assert (record.consumer, list(record.scopes), record.plan, record.version) == (
                "acme",
                ["orders:read"],
                "gold",
                "v2",
            )
            assert (record.status, record.created_by, record.expires_at) == ("active", "admin-api:alice", T0 + 3600)
            stored = await store.get(record.key_id)
            assert stored is not None
            assert stored.digest == apikeys.digest(PEPPER, issued.key)
            assert not leaks(issued.record, stored.digest)
            # never again: not in a listing, not in a lookup, not in the audit trail
            listing = await stub.List(pb.ListRequest(), metadata=AS_ALICE, timeout=5)
            shown = await stub.Get(pb.GetRequest(key_id=record.key_id), metadata=AS_ALICE, timeout=5)
            audit = await stub.Audit(pb.AuditRequest(), metadata=AS_ALICE, timeout=5)
            for reply in (listing, shown, audit):
                assert not leaks(reply, issued.key, stored.digest)
            assert [(e.action, e.actor, e.key_id) for e in audit.events] == [
                ("create", "admin-api:alice", record.key_id)
            ]

    run(scenario)


def test_list_and_get_never_show_a_key_or_digest(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with sqlite_service(tmp_path / "keys.db") as (service, _, clock), admin_api(service) as stub:
            first = await service.create(consumer="acme", scopes=["orders:read"], actor="cli")
            clock.now += 1
            second = await service.create(consumer="globex", scopes=[], actor="cli", expires_in=10)
            clock.now += 20
            listing = await stub.List(pb.ListRequest(), metadata=AS_ALICE, timeout=5)
            assert [(k.key_id, k.consumer, k.status) for k in listing.keys] == [
                (first.record.key_id, "acme", "active"),
                (second.record.key_id, "globex", "expired"),
            ]
            shown = await stub.Get(pb.GetRequest(key_id=first.record.key_id), metadata=AS_ALICE, timeout=5)
            assert (shown.key_id, shown.created_by, shown.created_at) == (first.record.key_id, "cli", T0)
            secrets = (first.key, second.key, first.record.digest, second.record.digest)
            assert not leaks(listing, *secrets)
            assert not leaks(shown, *secrets)

    run(scenario)


def test_revoke(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with sqlite_service(tmp_path / "keys.db") as (service, store, clock), admin_api(service) as stub:
            issued = await service.create(consumer="acme", scopes=[], actor="cli")
            clock.now += 5
            request = pb.RevokeRequest(key_id=issued.record.key_id, reason="leaked")
            revoked = await stub.Revoke(request, metadata=AS_ALICE, timeout=5)
            assert (revoked.status, revoked.revoked_by, revoked.revoked_at) == ("revoked", "admin-api:alice", T0 + 5)
            stored = await store.get(issued.record.key_id)
            assert stored is not None
            assert stored.revoked
            assert (await store.audit_log())[-1].detail == "leaked"

    run(scenario)


def test_rotate_with_grace(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with sqlite_service(tmp_path / "keys.db") as (service, store, clock), admin_api(service) as stub:
            old = await service.create(consumer="acme", scopes=["orders:read"], actor="cli")
            clock.now += 10
            request = pb.RotateRequest(key_id=old.record.key_id, grace_seconds=3600)
            reply = await stub.Rotate(request, metadata=AS_ALICE, timeout=5)
            assert reply.retired.key_id == old.record.key_id
            assert reply.retired.expires_at == T0 + 10 + 3600
            assert reply.retired.successor == reply.successor.record.key_id
            assert reply.retired.status == "active"  # still in its grace
            new_key = reply.successor.key
            assert KEY_SHAPE.match(new_key)
            assert new_key != old.key
            found = await store.get(reply.successor.record.key_id)
            parsed = apikeys.parse(new_key)
            checked = apikeys.check(
                new_key, parsed, found, pepper=PEPPER, prefix="sg", environment="live", now=clock.now
            )
            assert checked == apikeys.OK
            assert not leaks(reply.retired, old.key, old.record.digest)

    run(scenario)


def test_audit_over_the_api(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with sqlite_service(tmp_path / "keys.db") as (service, _, clock), admin_api(service) as stub:
            issued = await service.create(consumer="acme", scopes=["orders:read"], actor="cli")
            clock.now += 1
            await service.revoke(issued.record.key_id, actor="cli", reason="test")
            reply = await stub.Audit(pb.AuditRequest(), metadata=AS_ALICE, timeout=5)
            assert [(e.at, e.actor, e.action, e.key_id, e.consumer) for e in reply.events] == [
                (T0, "cli", "create", issued.record.key_id, "acme"),
                (T0 + 1, "cli", "revoke", issued.record.key_id, "acme"),
            ]
            last = await stub.Audit(pb.AuditRequest(limit=1), metadata=AS_ALICE, timeout=5)
            assert [e.action for e in last.events] == ["revoke"]
            assert not leaks(reply, issued.key, issued.record.digest)

    run(scenario)


def test_export_then_import_into_another_server(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with (
            sqlite_service(tmp_path / "a.db") as (source, _, _),
            sqlite_service(tmp_path / "b.db") as (target, target_store, _),
            admin_api(source) as from_stub,
            admin_api(target) as to_stub,
        ):
            issued = await source.create(consumer="acme", scopes=["orders:read"], actor="cli", plan="gold")
            exported = await from_stub.Export(pb.ExportRequest(), metadata=AS_ALICE, timeout=5)
            rows = [json.loads(line) for line in exported.records_jsonl.splitlines()]
            assert [r["key_id"] for r in rows] == [issued.record.key_id]
            assert issued.key not in exported.records_jsonl
            request = pb.ImportRequest(records_jsonl=exported.records_jsonl)
            imported = await to_stub.Import(request, metadata=AS_ALICE, timeout=5)
            assert imported.imported == 1
            found = await target_store.get(issued.record.key_id)
            assert found is not None
            assert (found.consumer, found.plan) == ("acme", "gold")
            parsed = apikeys.parse(issued.key)
            verdict = apikeys.check(issued.key, parsed, found, pepper=PEPPER, prefix="sg", environment="live", now=T0)
            assert verdict == apikeys.OK
            events = (await target_store.audit_log())[-1]
            assert (events.action, events.actor) == ("import", "admin-api:alice")

    run(scenario)


# --- errors -------------------------------------------------------------------------------


def test_an_unknown_id_is_not_found(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with sqlite_service(tmp_path / "keys.db") as (service, _, _), admin_api(service) as stub:
            calls = [
                stub.Get(pb.GetRequest(key_id="nosuchkey"), metadata=AS_ALICE, timeout=5),
                stub.Revoke(pb.RevokeRequest(key_id="nosuchkey"), metadata=AS_ALICE, timeout=5),
                stub.Rotate(pb.RotateRequest(key_id="nosuchkey", grace_seconds=1), metadata=AS_ALICE, timeout=5),
            ]
            for call in calls:
                error = await refused(call)
                assert error.code() == grpc.StatusCode.NOT_FOUND
                assert error.details() == "no key with id 'nosuchkey'"

    run(scenario)


def test_bad_input_is_invalid_argument_and_changes_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with sqlite_service(tmp_path / "keys.db") as (service, store, _), admin_api(service) as stub:
            issued = await service.create(consumer="acme", scopes=[], actor="cli")
            before = await store.all()
            bad = [
                (
                    stub.Rotate(
                        pb.RotateRequest(key_id=issued.record.key_id, grace_seconds=-1), metadata=AS_ALICE, timeout=5
                    ),
                    "grace_seconds must not be negative",
                ),
                (stub.Create(pb.CreateRequest(consumer="  "), metadata=AS_ALICE, timeout=5), "consumer must not be"),
                (stub.Import(pb.ImportRequest(records_jsonl="{nope"), metadata=AS_ALICE, timeout=5), "not JSON lines"),
                (
                    stub.Import(pb.ImportRequest(records_jsonl='{"key_id": "x"}\n'), metadata=AS_ALICE, timeout=5),
                    "record 0",
                ),
            ]
            for call, message in bad:
                error = await refused(call)
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert message in (error.details() or "")
            assert await store.all() == before
            assert [e.action for e in await store.audit_log()] == ["create"]

    run(scenario)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_store_outage_is_unavailable() -> None:
    async def scenario() -> None:
        store = RedisKeyStore(f"redis://127.0.0.1:{closed_port()}/0", timeout=0.5)
        try:
            async with admin_api(KeyService(store, PEPPER, POLICY, FakeClock(T0))) as stub:
                calls = [
                    stub.List(pb.ListRequest(), metadata=AS_ALICE, timeout=5),
                    stub.Get(pb.GetRequest(key_id="a"), metadata=AS_ALICE, timeout=5),
                    stub.Create(pb.CreateRequest(consumer="acme"), metadata=AS_ALICE, timeout=5),
                    stub.Audit(pb.AuditRequest(), metadata=AS_ALICE, timeout=5),
                    stub.Export(pb.ExportRequest(), metadata=AS_ALICE, timeout=5),
                ]
                for call in calls:
                    error = await refused(call)
                    assert error.code() == grpc.StatusCode.UNAVAILABLE
                    assert error.details() == "key store unavailable"
                # a refusal still refuses when it cannot be audited
                error = await refused(stub.List(pb.ListRequest(), timeout=5))
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            await store.close()

    run(scenario)
