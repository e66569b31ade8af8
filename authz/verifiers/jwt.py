"""The verifier of JWT bearer tokens: the verified-token memo, then ``authz.jwt`` with the keys.

1. The memo of verified tokens, keyed by the token's SHA-256: a hit is one dict lookup and one
   ``exp`` comparison, then a check that this API accepts its issuer. A verdict holds only while
   the key that verified it is in its issuer's key set: when a refreshed JWKS no longer has a
   ``kid``, every cached verdict of that kid is dropped at the next request, and the token is
   checked again (and refused). Removing a key is what an IdP does after a compromise.
2. The token's claimed ``iss`` picks one of the API's issuers, and ``authz.jwt`` checks it with
   that issuer's keys only. An unknown ``kid`` asks the issuer's ``KeySource`` to refetch: the
   first one at once, then at most one per ``unknown_kid_refetch`` (``authz.jwks``).
3. An issuer configured with introspection but no keys has its JWTs introspected.

An IdP that cannot be reached when its answer is needed (no keys ever fetched) is a 503, not a
401: the token may well be valid.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from authz import credentials, errors, jwt
from authz.credentials import Credential
from authz.decision import Identity
from authz.errors import Denial
from authz.jwt import KeySet, Verified
from authz.memo import Memo, digest
from authz.verifiers import accepted, token_problem
from authz.verifiers.introspection import IntrospectionVerifier
from sidegate.config import Api, Gateway


class KeySource(Protocol):
    """An issuer's current keys (``jwks.JwksSource``; a fixed set in tests and benchmarks)."""

    keys: KeySet | None

    async def refetch(self) -> KeySet | None:
        """Fresh keys for an unknown kid, or None (rate-limited, or the IdP failed)."""
        ...


class JwtVerifier:
    kind = credentials.JWT

    def __init__(
        self,
        gateway: Gateway,
        clock: Callable[[], float],
        *,
        sources: Mapping[str, KeySource],
        secrets: Mapping[str, bytes] | None = None,
        introspection: IntrospectionVerifier | None = None,
        max_entries: int = 100_000,
    ) -> None:
        self.issuers = dict(gateway.issuers)  # read at start, with the key sources
        self.clock = clock
        self.sources = dict(sources)
        self.secrets = dict(secrets or {})
        self.introspection = introspection
        self.cache: Memo[bytes, Verified] = Memo(max_entries, clock)
        self._by_url = {issuer.issuer: name for name, issuer in gateway.issuers.items()}
        # The key set each issuer's cached verdicts were last checked against.
        self._checked: dict[str, KeySet | None] = {name: s.keys for name, s in self.sources.items()}

    async def verify(self, credential: Credential, api: Api) -> Identity | Denial:
        token = credential.value
        key = digest(token)
        hit = self.cache.get(key)
        if hit is not None and hit.kid is not None:
            issuer = hit.identity.issuer or ""
            source = self.sources.get(issuer)
            if source is not None and source.keys is not self._checked.get(issuer):
                self._rekeyed(issuer, source.keys)
                hit = self.cache.get(key)
        if hit is not None:
            if hit.identity.issuer in api.auth.jwt:
                return hit.identity
            return errors.INVALID_TOKEN[jwt.ISSUER_UNKNOWN]
        result = await self._verify(token, key, api)
        if isinstance(result, Verified):
            return result.identity
        return result if isinstance(result, Denial) else errors.INVALID_TOKEN[result]

    def _rekeyed(self, issuer: str, keys: KeySet | None) -> None:
        """``issuer``'s key set changed: drop its cached verdicts whose key is gone."""
        self._checked[issuer] = keys
        if keys is None:
            return
        kids = set(keys.kids)

        def still_signed(verified: Verified) -> bool:
            if verified.identity.issuer != issuer or verified.kid is None:
                return True
            return verified.kid in kids if verified.kid else False  # no kid: check it again

        self.cache.drop(still_signed)

    async def _verify(self, token: str, key: bytes, api: Api) -> Verified | Denial | str:
        issuers = accepted(api, self.issuers)
        problem = token_problem(token, issuers)
        if problem is not None:
            return problem
        limit = max(issuer.max_token_bytes for _, issuer in issuers)
        parsed = jwt.parse(token, limit)
        if isinstance(parsed, str):
            return parsed
        iss = jwt.peek_issuer(parsed)
        if iss is None:
            return jwt.ISS_MISSING if "iss" not in parsed.claims else jwt.CLAIM_INVALID
        name = self._by_url.get(iss)
        if name is None or name not in dict(issuers):
            return jwt.ISSUER_UNKNOWN
        issuer = self.issuers[name]
        if not issuer.has_keys:
            if self.introspection is None:
                return jwt.MALFORMED
            return await self.introspection.introspect(name, token, key)
        source = self.sources.get(name)
        keys = source.keys if source is not None else None
        secret = self.secrets.get(name)
        result = jwt.verify(parsed, issuer, name=name, keys=keys, secret=secret, now=self.clock())
        if result in (jwt.KID_UNKNOWN, jwt.KEYS_UNAVAILABLE) and source is not None:
            fresh = await source.refetch()
            if fresh is not None:
                result = jwt.verify(parsed, issuer, name=name, keys=fresh, secret=secret, now=self.clock())
        if result == jwt.KEYS_UNAVAILABLE:
            return errors.JWKS_UNAVAILABLE
        if isinstance(result, Verified):
            self.cache.put(key, result, result.expires)
        return result

    def reload(self, gateway: Gateway) -> None:
        """Issuers are read at start (a new one needs a restart); the APIs are read per request."""
