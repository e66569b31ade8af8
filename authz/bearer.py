"""Bearer tokens (RFC 6750) for the APIs that accept them: the cache, then a JWT or introspection.

``Bearer.verify(token, api)`` answers an ``Identity`` or a ``Denial``:

1. The verified-token cache (``tokencache``), keyed by the token's SHA-256: a hit is one dict
   lookup and one ``exp`` comparison, then only a check that this API accepts its issuer.
2. A JWT (three segments): its claimed ``iss`` picks one of the API's issuers, and ``jwt``
   checks it with that issuer's keys only. An unknown ``kid`` may trigger one rate-limited
   JWKS refetch (``jwks``) and a second check. A valid token is cached until its ``exp``.
   An issuer configured with introspection but no keys has its JWTs introspected.
3. Anything else is an opaque token, introspected at the API's introspection issuer (an API
   has at most one: an opaque token names no issuer, so it is sent to no other).

An IdP that cannot be reached when its answer is needed (no keys ever fetched, introspection
down) is a 503, not a 401: the token may well be valid.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from typing import Protocol

from authz import errors, jwt
from authz.decision import Identity
from authz.errors import Denial, IdpUnavailable
from authz.introspection import Introspector
from authz.jwks import Http, JwksSource
from authz.jwt import KeySet, Verified
from authz.tokencache import TokenCache, digest
from sidegate import logs
from sidegate.config import Api, Gateway
from sidegate.errors import SettingsError

log = logging.getLogger("authz.bearer")
_B64TOKEN = re.compile(r"^[A-Za-z0-9._~+/-]+=*$")  # RFC 6750 §2.1


class KeySource(Protocol):
    """An issuer's current keys (``jwks.JwksSource``; a fixed set in tests and benchmarks)."""

    keys: KeySet | None

    async def refetch(self) -> KeySet | None:
        """Fresh keys for an unknown kid, or None (rate-limited, or the IdP failed)."""
        ...


class Bearer:
    def __init__(
        self,
        gateway: Gateway,
        clock: Callable[[], float],
        *,
        sources: Mapping[str, KeySource],
        secrets: Mapping[str, bytes] | None = None,
        introspectors: Mapping[str, Introspector] | None = None,
        max_entries: int = 100_000,
    ) -> None:
        self.issuers = gateway.issuers
        self.clock = clock
        self.sources = dict(sources)
        self.secrets = dict(secrets or {})
        self.introspectors = dict(introspectors or {})
        self.cache: TokenCache[Verified] = TokenCache(clock, max_entries)
        self._by_url = {issuer.issuer: name for name, issuer in gateway.issuers.items()}

    async def verify(self, token: str, api: Api) -> Identity | Denial:
        """Who ``token`` names, if ``api`` accepts it; else why not."""
        key = digest(token)
        hit = self.cache.get(key)
        if hit is not None:
            if hit.identity.issuer in api.auth.jwt:
                return hit.identity
            return errors.INVALID_TOKEN[jwt.ISSUER_UNKNOWN]
        result = await self._verify(token, key, api)
        if isinstance(result, str):
            return errors.INVALID_TOKEN[result]
        if isinstance(result, Denial):
            return result
        return result.identity

    async def _verify(self, token: str, key: bytes, api: Api) -> Verified | Denial | str:
        # Read from ``api`` on every miss, not precomputed: a reload may change the APIs (the
        # issuers themselves are read at start).
        accepted = [(name, self.issuers[name]) for name in api.auth.jwt if name in self.issuers]
        limit = max((issuer.max_token_bytes for _, issuer in accepted), default=0)
        if len(token) > limit:
            return jwt.TOO_LARGE
        if not _B64TOKEN.match(token):
            return jwt.MALFORMED
        if token.count(".") != 2:
            name = next((name for name, issuer in accepted if issuer.introspection), None)
            return jwt.MALFORMED if name is None else await self._introspect(name, token, key)
        parsed = jwt.parse(token, limit)
        if isinstance(parsed, str):
            return parsed
        iss = jwt.peek_issuer(parsed)
        if iss is None:
            return jwt.ISS_MISSING if "iss" not in parsed.claims else jwt.CLAIM_INVALID
        name = self._by_url.get(iss)
        if name is None or name not in dict(accepted):
            return jwt.ISSUER_UNKNOWN
        issuer = self.issuers[name]
        if not issuer.has_keys:
            return await self._introspect(name, token, key)
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

    async def _introspect(self, name: str, token: str, key: bytes) -> Verified | Denial | str:
        introspector = self.introspectors.get(name)
        if introspector is None:
            return jwt.MALFORMED
        try:
            return await introspector.introspect(token, key)
        except IdpUnavailable as exc:
            log.warning("introspection failed", extra=logs.fields(issuer=name, problem=str(exc)))
            return errors.INTROSPECTION_UNAVAILABLE


# --- wiring -----------------------------------------------------------------------------------

_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}  # RFC 7518 §3.2: at least the hash size


def _secret(environ: Mapping[str, str], variable: str, where: str) -> str:
    value = environ.get(variable, "")
    if not value:
        raise SettingsError(f"{where}: environment variable {variable} is not set")
    return value


def build(
    gateway: Gateway, http: Http, clock: Callable[[], float], environ: Mapping[str, str]
) -> tuple[Bearer, list[JwksSource]]:
    """A ``Bearer`` for every issuer of ``gateway``, and the key sources to run in the background.

    Secrets come from the environment variables the issuers name; a missing or short one is a
    ``SettingsError`` at start, never a surprise at the first request.
    """
    sources: list[JwksSource] = []
    secrets: dict[str, bytes] = {}
    introspectors: dict[str, Introspector] = {}
    for name, issuer in gateway.issuers.items():
        if issuer.discovery or issuer.jwks_uri is not None:
            sources.append(JwksSource(name, issuer, http, clock))
        if issuer.shared_secret_env is not None:
            where = f"issuers.{name}.shared_secret_env"
            secret = _secret(environ, issuer.shared_secret_env, where).encode()
            need = max(_HMAC_MIN_BYTES.get(alg, 0) for alg in issuer.algorithms)
            if len(secret) < need:
                raise SettingsError(f"{where}: {issuer.shared_secret_env} must hold at least {need} bytes")
            secrets[name] = secret
        if issuer.introspection is not None:
            where = f"issuers.{name}.introspection.client_secret_env"
            client_secret = _secret(environ, issuer.introspection.client_secret_env, where)
            introspectors[name] = Introspector(name, issuer, client_secret, http, clock)
    bearer = Bearer(gateway, clock, sources={s.name: s for s in sources}, secrets=secrets, introspectors=introspectors)
    return bearer, sources
