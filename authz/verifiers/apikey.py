"""The verifier of API keys: the key cache, then the pure check of one key (``authz.apikeys``).

The key id finds the record in the key cache (``authz.keycache``: in memory, kept fresh by the
store's change feed). The presented key must be that record's (its HMAC digest, compared in
constant time), active and unexpired, in the configured prefix and environment. A key store that
cannot answer a cold miss is a 503. A key that passed is marked used (written in batches).
"""

from __future__ import annotations

from collections.abc import Callable

from authz import apikeys, credentials, errors
from authz.apikeys import KeyRecord
from authz.credentials import Credential
from authz.decision import Identity
from authz.errors import Denial, StoreUnavailable
from authz.keycache import KeyCache
from authz.memo import Memo
from sidegate.config import Api, ApiKeys, Gateway

IDENTITIES = 10_000  # key records whose identity is remembered


def identity_of(record: KeyRecord) -> Identity:
    return Identity("api_key", record.consumer, record.scopes, record.plan, record.key_id, record.version)


class ApiKeyVerifier:
    kind = credentials.API_KEY

    def __init__(self, keys: KeyCache, pepper: bytes, policy: ApiKeys, clock: Callable[[], float]) -> None:
        self.keys = keys
        self.pepper = pepper
        self.policy = policy
        self.clock = clock
        # key id → the record and its Identity: one Identity object per record, so the Checker's
        # decision memo hashes it once (Identity caches its hash).
        self._identities: Memo[str, tuple[KeyRecord, Identity]] = Memo(IDENTITIES)

    async def verify(self, credential: Credential, api: Api) -> Identity | Denial:
        policy = self.policy
        parsed = apikeys.parse(credential.value)
        imported = (
            policy.imported
            and (parsed is None or parsed.prefix != policy.prefix)
            and len(credential.value) <= apikeys.IMPORTED_MAX_CHARS
        )
        try:
            if imported:  # another gateway's key: its id is derived from it
                record = await self.keys.get(apikeys.imported_id(self.pepper, credential.value))
            else:
                record = await self.keys.get(parsed.key_id) if parsed is not None else None
        except StoreUnavailable:
            return errors.KEY_STORE_UNAVAILABLE
        if imported:
            verdict = apikeys.check_digest(credential.value, record, pepper=self.pepper, now=self.clock())
        else:
            verdict = apikeys.check(
                credential.value,
                parsed,
                record,
                pepper=self.pepper,
                prefix=policy.prefix,
                environment=policy.environment,
                now=self.clock(),
            )
        if verdict != apikeys.OK:
            return errors.INVALID_API_KEY[verdict]
        assert record is not None
        self.keys.used(record.key_id)
        known = self._identities.get(record.key_id)
        if known is not None and (known[0] is record or known[0] == record):
            return known[1]
        identity = identity_of(record)
        self._identities.put(record.key_id, (record, identity))
        return identity

    def reload(self, gateway: Gateway) -> None:
        self.policy = gateway.api_keys
