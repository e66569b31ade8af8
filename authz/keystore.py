"""Where API key records live: one interface, two backends.

* ``SqliteKeyStore`` — the embedded default (one host): a file under the state dir, WAL mode,
  calls run in a worker thread so the event loop never waits on the disk.
* ``RedisKeyStore`` — shared by every replica; all keys carry the ``{sidegate}`` hash tag so a
  change and its audit event commit in one MULTI, on one Redis Cluster shard too.

Every change writes the records and one audit event atomically. The audit trail is append-only
(SQLite triggers refuse UPDATE/DELETE; Redis keeps it in a stream) and never holds a key.
``changes()`` yields the ids that changed, so caches in every process drop them: Redis pushes
them by pub/sub; SQLite is polled through the audit sequence. ``None`` means "drop everything"
(after a reconnect, when messages may have been missed). ``last_used_at`` is kept apart from the
record so that a usage update can never overwrite a revocation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from authz.apikeys import KeyRecord
from authz.errors import StoreUnavailable

T = TypeVar("T")
POLL_INTERVAL = 0.2  # SQLite change feed: a revocation reaches every process well within 1 s


@dataclass(frozen=True)
class AuditEvent:
    at: float
    actor: str
    action: str  # create · rotate · revoke · import · admin_denied
    key_id: str | None = None
    consumer: str | None = None
    detail: str = ""


class KeyStore(Protocol):
    async def get(self, key_id: str) -> KeyRecord | None: ...
    async def save(self, records: Sequence[KeyRecord], event: AuditEvent) -> None: ...
    async def all(self) -> list[KeyRecord]: ...
    async def audit(self, event: AuditEvent) -> None: ...
    async def audit_log(self, limit: int = 1000) -> list[AuditEvent]: ...
    async def touch(self, used: Mapping[str, float]) -> None: ...
    def changes(self) -> AsyncIterator[set[str] | None]: ...
    async def close(self) -> None: ...


# --- SQLite ---------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (key_id TEXT PRIMARY KEY, record TEXT NOT NULL, last_used_at REAL);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
    key_id TEXT, consumer TEXT, detail TEXT NOT NULL DEFAULT ''
);
CREATE TRIGGER IF NOT EXISTS audit_append_only_u BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_append_only_d BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
"""


def _changes_after(cursor: int, db: sqlite3.Connection) -> list[tuple[int, str | None, str]]:
    return db.execute("SELECT seq, key_id, action FROM audit WHERE seq > ? ORDER BY seq", (cursor,)).fetchall()


def _final_revocation(stored: KeyRecord | None, record: KeyRecord) -> KeyRecord:
    """A revocation is final: a write racing it (a rotation read before it) never undoes it."""
    if stored is not None and stored.revoked and not record.revoked:
        return dataclasses.replace(record, revoked=True, revoked_at=stored.revoked_at, revoked_by=stored.revoked_by)
    return record


def _event_row(event: AuditEvent) -> tuple[Any, ...]:
    return (event.at, event.actor, event.action, event.key_id, event.consumer, event.detail)


class SqliteKeyStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=5.0)
        self._db.execute("PRAGMA busy_timeout=5000")
        # Several processes may open a new store at once (workers, replicas, the CLI): switching
        # to WAL takes a lock the busy timeout does not cover, so retry it briefly.
        for attempt in range(50):
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.executescript(_SCHEMA)
                break
            except sqlite3.OperationalError:
                if attempt == 49:
                    raise StoreUnavailable(f"sqlite: {self.path} stays locked") from None
                time.sleep(0.1)

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            with self._lock:
                return work(self._db)

        try:
            return await asyncio.to_thread(locked)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"sqlite: {exc}") from exc

    async def get(self, key_id: str) -> KeyRecord | None:
        row = await self._run(
            lambda db: db.execute("SELECT record, last_used_at FROM keys WHERE key_id = ?", (key_id,)).fetchone()
        )
        return None if row is None else _record(row[0], row[1])

    async def save(self, records: Sequence[KeyRecord], event: AuditEvent) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            try:
                for record in records:
                    row = db.execute("SELECT record FROM keys WHERE key_id = ?", (record.key_id,)).fetchone()
                    record = _final_revocation(_record(row[0], None) if row else None, record)  # noqa: PLW2901
                    db.execute(
                        "INSERT INTO keys (key_id, record) VALUES (?, ?) "
                        "ON CONFLICT(key_id) DO UPDATE SET record = excluded.record",
                        (record.key_id, _dump(record)),
                    )
                db.execute(
                    "INSERT INTO audit (at, actor, action, key_id, consumer, detail) VALUES (?,?,?,?,?,?)",
                    _event_row(event),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

        await self._run(work)

    async def all(self) -> list[KeyRecord]:
        rows = await self._run(lambda db: db.execute("SELECT record, last_used_at FROM keys ORDER BY rowid").fetchall())
        return [_record(r, used) for r, used in rows]

    async def audit(self, event: AuditEvent) -> None:
        await self._run(
            lambda db: db.execute(
                "INSERT INTO audit (at, actor, action, key_id, consumer, detail) VALUES (?,?,?,?,?,?)",
                _event_row(event),
            )
        )

    async def audit_log(self, limit: int = 1000) -> list[AuditEvent]:
        rows = await self._run(
            lambda db: db.execute(
                "SELECT at, actor, action, key_id, consumer, detail FROM audit ORDER BY seq DESC LIMIT ?", (limit,)
            ).fetchall()
        )
        return [AuditEvent(*row) for row in reversed(rows)]

    async def touch(self, used: Mapping[str, float]) -> None:
        await self._run(
            lambda db: db.executemany(
                "UPDATE keys SET last_used_at = max(coalesce(last_used_at, 0), ?) WHERE key_id = ?",
                [(at, key_id) for key_id, at in used.items()],
            )
        )

    async def _seq(self) -> int:
        row = await self._run(lambda db: db.execute("SELECT coalesce(max(seq), 0) FROM audit").fetchone())
        return int(row[0])

    async def changes(self) -> AsyncIterator[set[str] | None]:
        cursor = await self._seq()
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            try:
                rows = await self._run(functools.partial(_changes_after, cursor))
            except StoreUnavailable:
                continue
            if rows:
                cursor = rows[-1][0]
                # An import names no single key: every cache drops everything.
                yield None if any(action == "import" for _, _, action in rows) else {k for _, k, _ in rows if k}

    async def close(self) -> None:
        with self._lock:
            self._db.close()


# --- Redis ----------------------------------------------------------------------------

_TAG = "{sidegate}"
RECORD = _TAG + ":apikey:"
INDEX = _TAG + ":apikeys"
LAST_USED = _TAG + ":apikeys:last_used"
AUDIT = _TAG + ":audit"
CHANNEL = "sidegate:apikeys:changed"

# KEYS: the n record keys, INDEX, AUDIT. ARGV: n, n records (JSON), audit field/value pairs, channel.
_SAVE = """
local n = tonumber(ARGV[1])
for i = 1, n do
  local record = ARGV[1 + i]
  local new = cjson.decode(record)
  local old = redis.call('GET', KEYS[i])
  if old then
    local prev = cjson.decode(old)
    if prev['revoked'] == true and new['revoked'] ~= true then
      new['revoked'] = true
      new['revoked_at'] = prev['revoked_at']
      new['revoked_by'] = prev['revoked_by']
      record = cjson.encode(new)
    end
  end
  redis.call('SET', KEYS[i], record)
  redis.call('SADD', KEYS[n + 1], new['key_id'])
end
local fields = {}
for j = n + 2, #ARGV - 1 do fields[#fields + 1] = ARGV[j] end
redis.call('XADD', KEYS[n + 2], '*', unpack(fields))
for i = 1, n do redis.call('PUBLISH', ARGV[#ARGV], cjson.decode(ARGV[1 + i])['key_id']) end
return n
"""
# KEYS: LAST_USED. ARGV: key id, time pairs. A replica flushing an older use never moves it back.
_TOUCH = """
for i = 1, #ARGV, 2 do
  local current = redis.call('HGET', KEYS[1], ARGV[i])
  if (not current) or tonumber(current) < tonumber(ARGV[i + 1]) then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return 0
"""


class RedisKeyStore:
    def __init__(self, url: str, timeout: float = 1.0) -> None:
        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, health_check_interval=10
        )
        self._url = url
        self._timeout = timeout
        self._save = self._redis.register_script(_SAVE)
        self._touch = self._redis.register_script(_TOUCH)

    async def _call(self, work: Callable[[], Any]) -> Any:
        try:
            return await work()
        except (redis_errors.RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc.__class__.__name__}") from exc

    async def get(self, key_id: str) -> KeyRecord | None:
        async def work() -> Any:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.get(RECORD + key_id)
                pipe.hget(LAST_USED, key_id)
                return await pipe.execute()

        raw, used = await self._call(work)
        return None if raw is None else _record(raw, float(used) if used else None)

    async def save(self, records: Sequence[KeyRecord], event: AuditEvent) -> None:
        """Records, their audit event and the change notice in one script: atomic, and a
        revocation already stored is kept (see ``_final_revocation``)."""
        keys = [RECORD + r.key_id for r in records] + [INDEX, AUDIT]
        audit = [part for pair in _stream_fields(event).items() for part in pair]
        args = [len(records), *(_dump(r) for r in records), *audit, CHANNEL]
        await self._call(lambda: self._save(keys=keys, args=args))

    async def all(self) -> list[KeyRecord]:
        async def work() -> list[KeyRecord]:
            ids = sorted(_text(member) for member in await self._redis.smembers(INDEX))
            if not ids:
                return []
            raws = await self._redis.mget([RECORD + i for i in ids])
            used = await self._redis.hmget(LAST_USED, ids)
            return [_record(r, float(u) if u else None) for r, u in zip(raws, used, strict=True) if r is not None]

        records: list[KeyRecord] = await self._call(work)
        return sorted(records, key=lambda r: r.created_at)

    async def audit(self, event: AuditEvent) -> None:
        await self._call(lambda: self._redis.xadd(AUDIT, _stream_fields(event)))

    async def audit_log(self, limit: int = 1000) -> list[AuditEvent]:
        entries = await self._call(lambda: self._redis.xrevrange(AUDIT, count=limit))
        events = []
        for _id, fields in reversed(entries):
            data = {k.decode(): v.decode() for k, v in fields.items()}
            events.append(
                AuditEvent(
                    at=float(data["at"]),
                    actor=data["actor"],
                    action=data["action"],
                    key_id=data.get("key_id") or None,
                    consumer=data.get("consumer") or None,
                    detail=data.get("detail", ""),
                )
            )
        return events

    async def touch(self, used: Mapping[str, float]) -> None:
        if used:
            args = [part for key_id, at in used.items() for part in (key_id, repr(at))]
            await self._call(lambda: self._touch(keys=[LAST_USED], args=args))

    async def changes(self) -> AsyncIterator[set[str] | None]:
        """Ids from the pub/sub channel; after any (re)connect, ``None``: drop everything."""
        backoff = 0.05
        while True:
            listener = aioredis.Redis.from_url(self._url, socket_connect_timeout=self._timeout)
            pubsub = listener.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANNEL)
                yield None  # whatever was published while we were away is unknown
                backoff = 0.05
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message["type"] == "message":
                        data = message["data"]
                        yield {data.decode() if isinstance(data, bytes) else str(data)}
            except (redis_errors.RedisError, OSError):
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
            finally:
                await pubsub.aclose()
                await listener.aclose()

    async def close(self) -> None:
        await self._redis.aclose()


def _dump(record: KeyRecord) -> str:
    data = record.to_dict()
    data.pop("last_used_at")
    return json.dumps(data, separators=(",", ":"))


def _record(raw: str | bytes, last_used_at: float | None) -> KeyRecord:
    data = json.loads(raw)
    data["last_used_at"] = last_used_at
    return KeyRecord.from_dict(data)


def _stream_fields(event: AuditEvent) -> dict[Any, Any]:
    return {k: "" if v is None else str(v) for k, v in asdict(event).items()}


def open_store(redis_url: str | None, state_dir: Path) -> KeyStore:
    """Redis when a URL is configured (shared by replicas), else SQLite under the state dir."""
    if redis_url:
        return RedisKeyStore(redis_url)
    return SqliteKeyStore(state_dir / "keys.db")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
