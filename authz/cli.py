"""``sidegate keys``: API-key management for security teams, straight on the key store.

    sidegate keys --config F create --consumer C --scopes "orders:read orders:write" [--plan P]
                                    [--expires 90d] [--version V]
    sidegate keys --config F list | show ID | revoke ID [--reason R] | rotate ID --grace 24h
    sidegate keys --config F audit [--limit N] | export [-o FILE] | import FILE
    sidegate keys --config F import --plaintext FILE    keys another gateway issued (CSV or JSON lines)

Tables for people, ``--json`` for scripts. ``create`` and ``rotate`` print the new key once, on
its own line on stdout (so ``KEY=$(sidegate keys … create …)`` works); everything else a person
should read goes to stderr. The store is the one authz uses: Redis with ``--redis`` /
``SIDEGATE_REDIS_URL`` / ``state.redis``, else SQLite under the state dir (``--state-dir`` /
``SIDEGATE_STATE_DIR`` / ``state.dir``), and the same pepper.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import dataclasses
import datetime as dt
import getpass
import io
import json
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from authz.apikeys import KeyRecord
from authz.errors import KeyNotFound, StoreUnavailable
from sidegate import config
from sidegate.config import parse_duration
from sidegate.errors import SettingsError, SidegateError
from sidegate.settings import Settings, from_gateway

if TYPE_CHECKING:  # the store's modules import redis: only the commands that open one load them
    from authz.keyservice import KeyService, PlaintextKey


def add_parser(sub: Any) -> None:
    keys = sub.add_parser("keys", help="manage API keys (create, list, show, revoke, rotate, audit, export, import)")
    keys.add_argument("--config", "-c", type=Path, help="gateway.yaml (key format); default SIDEGATE_CONFIG")
    keys.add_argument("--state-dir", type=Path, help="where the embedded key store and pepper live (.sidegate)")
    keys.add_argument("--redis", dest="redis_url", help="Redis URL of a shared key store")
    keys.add_argument("--json", action="store_true", help="machine-readable output")
    keys.add_argument("--actor", help="who is acting, for the audit trail (default cli:USER@HOST)")
    ops = keys.add_subparsers(dest="operation", required=True)

    create = ops.add_parser("create", help="issue a key (printed once)")
    create.add_argument("--consumer", required=True)
    create.add_argument("--scopes", default="", help='space-separated, e.g. "orders:read orders:write"')
    create.add_argument("--plan")
    create.add_argument("--expires", help="lifetime, e.g. 90d (default: never)")
    create.add_argument("--version", help="pin the consumer to this API version")
    ops.add_parser("list", help="every key, without secrets")
    show = ops.add_parser("show", help="one key's record")
    show.add_argument("key_id")
    revoke = ops.add_parser("revoke", help="stop a key now, on every replica within a second")
    revoke.add_argument("key_id")
    revoke.add_argument("--reason", default="")
    rotate = ops.add_parser("rotate", help="issue a successor; the old key works until the grace ends")
    rotate.add_argument("key_id")
    rotate.add_argument("--grace", required=True, help="how long the old key keeps working, e.g. 24h")
    audit = ops.add_parser("audit", help="the audit trail, oldest first")
    audit.add_argument("--limit", type=int, default=1000)
    export = ops.add_parser("export", help="records as JSON lines (digests, never keys)")
    export.add_argument("--output", "-o", type=Path)
    load = ops.add_parser("import", help="records from `export` (JSON lines; - for stdin), or --plaintext keys")
    load.add_argument("file", nargs="?")
    load.add_argument(
        "--plaintext",
        metavar="FILE",
        help="keys another gateway issued: CSV (key,consumer,scopes[,plan,expires]) or JSON lines; hashed, never kept",
    )


def _when(seconds: float | None) -> str:
    if not seconds:
        return "-"
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() + "\n")


def _duration(flag: str, value: str) -> float:
    try:
        return parse_duration(value)
    except ValueError:
        raise SettingsError(f"{flag}: not a duration: {value!r} (use e.g. 30m, 24h, 90d)") from None


def _show(record: KeyRecord, now: float, out: TextIO) -> None:
    public = record.public(now)
    for name in ("expires_at", "created_at", "rotated_at", "revoked_at", "last_used_at"):
        public[name] = _when(public[name])
    public["scopes"] = " ".join(record.scopes)
    width = max(len(k) for k in public)
    for key, value in public.items():
        out.write(f"{key.ljust(width)}  {'-' if value in (None, '') else value}\n")


Out = TextIO


async def _create(args: argparse.Namespace, service: KeyService, actor: str, now: float, out: Out) -> None:
    expires = _duration("--expires", args.expires) if args.expires else None
    new = await service.create(
        consumer=args.consumer,
        scopes=args.scopes.split(),
        actor=actor,
        plan=args.plan,
        version=args.version,
        expires_in=expires,
    )
    if args.json:
        out.write(json.dumps({"key": new.key, "record": new.record.public(now)}) + "\n")
        return
    out.write(new.key + "\n")
    print(f"created key {new.record.key_id} for {args.consumer}: store it now, it is not shown again", file=sys.stderr)


async def _list(args: argparse.Namespace, service: KeyService, actor: str, now: float, out: Out) -> None:
    records = await service.list_keys()
    if args.json:
        out.write(json.dumps([r.public(now) for r in records]) + "\n")
        return
    rows = [("ID", "CONSUMER", "PLAN", "SCOPES", "STATUS", "EXPIRES", "LAST USED")]
    rows += [
        (
            r.key_id,
            r.consumer,
            r.plan or "-",
            " ".join(r.scopes) or "-",
            r.status(now),
            _when(r.expires_at),
            _when(r.last_used_at),
        )
        for r in records
    ]
    _table(rows, out)


async def _show_op(args: argparse.Namespace, service: KeyService, actor: str, now: float, out: Out) -> None:
    record = await service.get(args.key_id)
    if args.json:
        out.write(json.dumps(record.public(now)) + "\n")
    else:
        _show(record, now, out)


async def _revoke(args: argparse.Namespace, service: KeyService, actor: str, now: float, out: Out) -> None:
    record = await service.revoke(args.key_id, actor=actor, reason=args.reason)
    if args.json:
        out.write(json.dumps(record.public(now)) + "\n")
    else:
        print(f"revoked {record.key_id} ({record.consumer})", file=sys.stderr)


async def _rotate(args: argparse.Namespace, service: KeyService, actor: str, now: float, out: Out) -> None:
    retired, new = await service.rotate(args.key_id, actor=actor, grace=_duration("--grace", args.grace))
    if args.json:
        out.write(json.dumps({"key": new.key, "record": new.record.public(now), "retired": retired.public(now)}) + "\n")
        return
    out.write(new.key + "\n")
    until = _when(retired.expires_at)
    print(f"rotated {retired.key_id} → {new.record.key_id}; the old key works until {until}", file=sys.stderr)


async def _audit(args: argparse.Namespace, service: KeyService, actor: str, now: float, out: Out) -> None:
    events = await service.audit_log(args.limit)
    if args.json:
        out.write(json.dumps([dataclasses.asdict(e) for e in events]) + "\n")
        return
    rows = [("TIME", "ACTOR", "ACTION", "KEY", "CONSUMER", "DETAIL")]
    rows += [(_when(e.at), e.actor, e.action, e.key_id or "-", e.consumer or "-", e.detail) for e in events]
    _table(rows, out)


async def _export(args: argparse.Namespace, service: KeyService, actor: str, now: float, out: Out) -> None:
    lines = "".join(json.dumps(row) + "\n" for row in await service.export())
    if args.output:
        args.output.write_text(lines)
    else:
        out.write(lines)


def _expires(value: object, where: str) -> float | None:
    """Unix seconds, or an ISO 8601 date or time (UTC unless it says otherwise); empty is never."""
    if value in (None, ""):
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
        try:
            when = dt.datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()
    raise SettingsError(f"{where}: expires: not Unix seconds or an ISO 8601 time")


def _text(value: object, where: str, name: str) -> str | None:
    if value is None or isinstance(value, str):
        return value or None
    raise SettingsError(f"{where}: {name}: not a string")


def plaintext_keys(text: str, source: str) -> list[PlaintextKey]:
    """Keys from another gateway: JSON lines (``{"key", "consumer", "scopes", "plan", "expires"}``)
    or CSV with a header row naming those columns. Problems name the line, never a key."""
    from authz.keyservice import PlaintextKey  # noqa: PLC0415 - see TYPE_CHECKING above

    rows: list[tuple[str, dict[str, Any]]] = []
    if text.lstrip().startswith("{"):
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise SettingsError(f"{source}:{number}: not a JSON object") from None
            if not isinstance(row, dict):
                raise SettingsError(f"{source}:{number}: not a JSON object")
            rows.append((f"{source}:{number}", row))
    else:
        reader = csv.DictReader(io.StringIO(text))
        missing = {"key", "consumer"} - set(reader.fieldnames or ())
        if missing:
            raise SettingsError(f"{source}:1: the CSV header names no {' or '.join(sorted(missing))} column")
        rows = [(f"{source}:{reader.line_num}", dict(row)) for row in reader]
    keys = []
    for where, row in rows:
        unknown = set(row) - {"key", "consumer", "scopes", "plan", "expires"}
        if unknown:
            raise SettingsError(f"{where}: unknown field {sorted(str(u) for u in unknown)[0]!r}")
        scopes = row.get("scopes") or ()
        if isinstance(scopes, str):
            scopes = scopes.split()
        if not isinstance(scopes, list | tuple) or not all(isinstance(x, str) for x in scopes):
            raise SettingsError(f"{where}: scopes: a space-separated string or a list of strings")
        keys.append(
            PlaintextKey(
                key=_text(row.get("key"), where, "key") or "",
                consumer=_text(row.get("consumer"), where, "consumer") or "",
                scopes=tuple(scopes),
                plan=_text(row.get("plan"), where, "plan"),
                expires_at=_expires(row.get("expires"), where),
            )
        )
    return keys


async def _import(args: argparse.Namespace, service: KeyService, actor: str, now: float, out: Out) -> None:
    if (args.file is None) == (args.plaintext is None):
        raise SettingsError("import takes one of FILE (from `export`) or --plaintext FILE")
    if args.plaintext is not None:
        source = args.plaintext
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
        try:
            records, present = await service.import_plaintext(plaintext_keys(text, source), actor=actor)
        except ValueError as exc:
            raise SettingsError(f"{source}: {exc}") from None
        if args.json:
            out.write(json.dumps({"imported": [r.public(now) for r in records], "already_present": present}) + "\n")
        else:
            _table([("ID", "CONSUMER", "SCOPES"), *((r.key_id, r.consumer, " ".join(r.scopes)) for r in records)], out)
        print(f"imported {len(records)} keys ({present} already present); none is kept in plaintext", file=sys.stderr)
        return
    text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
    try:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise SettingsError(f"{args.file}: not JSON lines: {exc}") from None
    count = await service.import_records(rows, actor=actor)
    print(f"imported {count} records", file=sys.stderr)


OPERATIONS = {
    "create": _create,
    "list": _list,
    "show": _show_op,
    "revoke": _revoke,
    "rotate": _rotate,
    "audit": _audit,
    "export": _export,
    "import": _import,
}


def run(args: argparse.Namespace) -> int:
    """Run one ``sidegate keys`` operation; the exit status (errors are one line on stderr)."""
    path = Settings.from_env(config=args.config).config
    if path is None:
        raise SettingsError("keys needs the gateway.yaml: --config FILE or SIDEGATE_CONFIG")
    gateway = config.load(path)
    # The store and pepper `sidegate up` uses with the same file: its state: section, unless overridden.
    settings = Settings.from_env(
        base=from_gateway(gateway), config=path, state_dir=args.state_dir, redis_url=args.redis_url
    )
    actor = args.actor or f"cli:{getpass.getuser()}@{socket.gethostname()}"
    from authz.keyservice import KeyService  # noqa: PLC0415 - see TYPE_CHECKING above
    from authz.keystore import open_store  # noqa: PLC0415

    async def main() -> int:
        store = open_store(settings.redis_url, settings.state_dir)
        try:
            service = KeyService(store, settings.pepper(), gateway.api_keys, time.time)
            await OPERATIONS[args.operation](args, service, actor, time.time(), sys.stdout)
            return 0
        finally:
            await store.close()

    try:
        return asyncio.run(main())
    except KeyNotFound as exc:
        raise SidegateError(str(exc)) from None
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    except StoreUnavailable as exc:
        raise SidegateError(f"key store unavailable ({exc})") from None
    except OSError as exc:
        raise SidegateError(f"{exc.filename or ''}: {exc.strerror}") from None
