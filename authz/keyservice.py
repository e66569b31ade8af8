"""Key management: create, rotate, revoke, list, show, audit, export, import.

One class serves the ``sidegate keys`` CLI and the gRPC admin API alike. Every change is one
atomic store write with its audit event (who, what, when — never the key). A new key is
returned once, to the caller, and is never stored or logged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from authz import apikeys
from authz.apikeys import KeyRecord
from authz.errors import KeyNotFound
from authz.keystore import AuditEvent, KeyStore
from sidegate.config import ApiKeys

Clock = Callable[[], float]


@dataclass(frozen=True)
class NewKey:
    """A key as issued: ``key`` is the only copy of the secret there will ever be."""

    record: KeyRecord
    key: str


class KeyService:
    def __init__(self, store: KeyStore, pepper: bytes, policy: ApiKeys, clock: Clock) -> None:
        self.store = store
        self.pepper = pepper
        self.policy = policy
        self.clock = clock

    def _issue(self, **fields: Any) -> NewKey:
        key_id, key = apikeys.new_key(self.policy.prefix, self.policy.environment)
        record = KeyRecord(key_id=key_id, digest=apikeys.digest(self.pepper, key), **fields)
        return NewKey(record, key)

    async def create(
        self,
        *,
        consumer: str,
        scopes: Sequence[str],
        actor: str,
        plan: str | None = None,
        version: str | None = None,
        expires_in: float | None = None,
    ) -> NewKey:
        if not consumer.strip():
            raise ValueError("consumer must not be empty")
        now = self.clock()
        new = self._issue(
            consumer=consumer,
            scopes=tuple(scopes),
            plan=plan,
            version=version,
            expires_at=None if expires_in is None else now + expires_in,
            created_at=now,
            created_by=actor,
        )
        await self.store.save(
            [new.record], AuditEvent(now, actor, "create", new.record.key_id, consumer, _scopes(scopes))
        )
        return new

    async def get(self, key_id: str) -> KeyRecord:
        record = await self.store.get(key_id)
        if record is None:
            raise KeyNotFound(f"no key with id {key_id!r}")
        return record

    async def revoke(self, key_id: str, *, actor: str, reason: str = "") -> KeyRecord:
        record = await self.get(key_id)
        if record.revoked:
            return record
        now = self.clock()
        revoked = replace(record, revoked=True, revoked_at=now, revoked_by=actor)
        await self.store.save([revoked], AuditEvent(now, actor, "revoke", key_id, record.consumer, reason))
        return revoked

    async def rotate(self, key_id: str, *, actor: str, grace: float) -> tuple[KeyRecord, NewKey]:
        """Issue a successor; the old key keeps working ``grace`` seconds more, then expires."""
        old = await self.get(key_id)
        now = self.clock()
        if old.status(now) != apikeys.ACTIVE:
            raise ValueError(f"key {key_id} is {old.status(now)}: only an active key can be rotated")
        new = self._issue(
            consumer=old.consumer,
            scopes=old.scopes,
            plan=old.plan,
            version=old.version,
            expires_at=old.expires_at,
            created_at=now,
            created_by=actor,
        )
        ends = now + grace if old.expires_at is None else min(old.expires_at, now + grace)
        retired = replace(old, rotated_at=now, rotated_by=actor, successor=new.record.key_id, expires_at=ends)
        detail = f"successor={new.record.key_id} grace={grace:g}s"
        await self.store.save([retired, new.record], AuditEvent(now, actor, "rotate", key_id, old.consumer, detail))
        return retired, new

    async def list_keys(self) -> list[KeyRecord]:
        return await self.store.all()

    async def audit_log(self, limit: int = 1000) -> list[AuditEvent]:
        return await self.store.audit_log(limit)

    async def export(self) -> list[dict[str, Any]]:
        """Every record with its digest (useless without the pepper) and no key: for backup and moves."""
        return [record.to_dict() for record in await self.store.all()]

    async def import_records(self, rows: Iterable[dict[str, Any]], *, actor: str) -> int:
        records = []
        for index, row in enumerate(rows):
            try:
                record = KeyRecord.from_dict(row)
            except TypeError as exc:
                raise ValueError(f"record {index}: {exc}") from None
            if not record.key_id or len(record.digest) != 64:
                raise ValueError(f"record {index}: needs key_id and a 64-hex-digit digest")
            records.append(record)
        if records:
            now = self.clock()
            event = AuditEvent(now, actor, "import", None, None, f"{len(records)} records")
            await self.store.save(records, event)
        return len(records)

    async def import_plaintext(self, keys: Sequence[PlaintextKey], *, actor: str) -> tuple[list[KeyRecord], int]:
        """Store the digests of keys another gateway issued (never the keys): the new records, and
        how many were already here (kept as they are: a revoked one stays revoked). Problems name
        the entry's position, never its key."""
        if not self.policy.imported:
            raise ValueError("api_keys.imported is not true in gateway.yaml: authz would refuse imported keys")
        now = self.clock()
        records: dict[str, KeyRecord] = {}
        present = 0
        for index, each in enumerate(keys, start=1):
            where = f"entry {index}"
            if not each.key or len(each.key) > apikeys.IMPORTED_MAX_CHARS or each.key != each.key.strip():
                raise ValueError(f"{where}: the key must be 1 to {apikeys.IMPORTED_MAX_CHARS} characters, no spaces")
            parsed = apikeys.parse(each.key)
            if parsed is not None and parsed.prefix == self.policy.prefix:
                raise ValueError(f"{where}: a key in Sidegate's own format: move those with export and import")
            if not each.consumer.strip():
                raise ValueError(f"{where}: consumer must not be empty")
            key_id = apikeys.imported_id(self.pepper, each.key)
            if key_id in records:
                raise ValueError(f"{where}: the same key as an earlier entry")
            if await self.store.get(key_id) is not None:
                present += 1
                continue
            records[key_id] = KeyRecord(
                key_id=key_id,
                digest=apikeys.digest(self.pepper, each.key),
                consumer=each.consumer,
                scopes=each.scopes,
                plan=each.plan,
                expires_at=each.expires_at,
                created_at=now,
                created_by=actor,
            )
        if records:
            event = AuditEvent(now, actor, "import", None, None, f"{len(records)} plaintext keys hashed")
            await self.store.save(list(records.values()), event)
        return list(records.values()), present


@dataclass(frozen=True)
class PlaintextKey:
    """A key another gateway issued, as ``sidegate keys import --plaintext`` reads it."""

    key: str = field(repr=False)
    consumer: str
    scopes: tuple[str, ...] = ()
    plan: str | None = None
    expires_at: float | None = None


def _scopes(scopes: Sequence[str]) -> str:
    return "scopes=" + " ".join(scopes)
