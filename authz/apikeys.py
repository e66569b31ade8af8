"""API keys: their format, their digest, their record, and the pure check of one key.

A key reads ``<prefix>_<environment>_<id>_<secret>`` (``sg_live_k7f3q2…_…``). The id is public
and finds the record in O(1); the secret holds 160 random bits. The store keeps only
``HMAC-SHA-256(pepper, key)``; the pepper is a server-side secret, so a stolen store alone
cannot confirm a guessed key. Comparison is constant-time (``hmac.compare_digest``).
"""

from __future__ import annotations

import base64
import dataclasses
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ID_BYTES = 10  # 80 bits: collisions are not a concern, guessing one is useless without the secret
SECRET_BYTES = 20  # 160 bits of secret
# four parts split by "_", the last two base32; used with fullmatch: no trailing newline sneaks through
_KEY = re.compile(r"([^_]*)_([^_]*)_([a-z2-7]+)_([a-z2-7]+)")
ACTIVE, REVOKED, EXPIRED = "active", "revoked", "expired"


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


@dataclass(frozen=True)
class ParsedKey:
    prefix: str
    environment: str
    key_id: str
    secret: str


def new_key(prefix: str, environment: str) -> tuple[str, str]:
    """A fresh ``(key_id, key)``. The key is shown once and never stored."""
    key_id = _b32(secrets.token_bytes(ID_BYTES))
    return key_id, f"{prefix}_{environment}_{key_id}_{_b32(secrets.token_bytes(SECRET_BYTES))}"


def parse(key: str) -> ParsedKey | None:
    """Split a presented key; None when it is not shaped like one of ours."""
    found = _KEY.fullmatch(key) if len(key) <= 200 else None
    return ParsedKey(*found.groups()) if found else None


IMPORTED_MAX_CHARS = 512  # the longest key imported from another gateway


def imported_id(pepper: bytes, key: str) -> str:
    """The record id of a key imported from another gateway (``sidegate keys import --plaintext``):
    derived from the whole key with the pepper, so it tells nothing of the key; 26 base32
    characters, never the length of an id Sidegate issues."""
    return _b32(hmac.digest(pepper, b"imported-key-id\0" + key.encode("utf-8"), "sha256")[:16])


def digest(pepper: bytes, key: str) -> str:
    return hmac.digest(pepper, key.encode("utf-8"), "sha256").hex()  # one-shot, in C


@dataclass(frozen=True)
class KeyRecord:
    """What the store knows of a key. Times are Unix seconds; ``None`` means never/unset."""

    key_id: str
    digest: str
    consumer: str
    scopes: tuple[str, ...] = ()
    plan: str | None = None
    version: str | None = None
    revoked: bool = False
    expires_at: float | None = None
    created_at: float = 0.0
    created_by: str = ""
    rotated_at: float | None = None
    rotated_by: str | None = None
    successor: str | None = None
    revoked_at: float | None = None
    revoked_by: str | None = None
    last_used_at: float | None = None

    def status(self, now: float) -> str:
        if self.revoked:
            return REVOKED
        if self.expires_at is not None and now >= self.expires_at:
            return EXPIRED
        return ACTIVE

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["scopes"] = list(self.scopes)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KeyRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["scopes"] = tuple(values.get("scopes") or ())
        return cls(**values)

    def public(self, now: float) -> dict[str, Any]:
        """The record as shown to people and exported: no digest, with the effective status."""
        out = self.to_dict()
        out.pop("digest")
        out["status"] = self.status(now)
        return out


# -- the check of one presented key (pure) -----------------------------------------------

OK, MALFORMED, WRONG_ENVIRONMENT, UNKNOWN = "ok", "malformed", "wrong_environment", "unknown"


def check(
    presented: str,
    parsed: ParsedKey | None,
    record: KeyRecord | None,
    *,
    pepper: bytes,
    prefix: str,
    environment: str,
    now: float,
) -> str:
    """``ok`` or why the key is refused: malformed, wrong_environment, unknown, revoked, expired."""
    if parsed is None or parsed.prefix != prefix:
        return MALFORMED
    if parsed.environment != environment:
        return WRONG_ENVIRONMENT
    return check_digest(presented, record, pepper=pepper, now=now)


def check_digest(presented: str, record: KeyRecord | None, *, pepper: bytes, now: float) -> str:
    """``ok``, unknown, revoked or expired: the record's digest and status (an imported key has no
    format to check)."""
    if record is None or not hmac.compare_digest(record.digest, digest(pepper, presented)):
        return UNKNOWN
    status = record.status(now)
    return OK if status == ACTIVE else status
